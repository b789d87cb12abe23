"""Run a training graph whose reuse nodes execute in accelc's native kernels, the rest on ORT.

The lowered training graph is cut at the ``ai.accelc.reuse`` nodes into ORT segments: a node's
segment is the lowest that runs after everything it reads (a reuse node runs right after the
segment that produces its inputs). One step runs segment 0, the reuse nodes that follow it,
segment 1, ... Tensors move between ORT and torch by pointer (IOBinding on torch tensors for
inputs, DLPack on ORT's outputs): no copies. ``bound`` buffers (the gradients) are written in
place.

Reuse nodes run :func:`accelc.runtime.reuse_kernels.reuse_forward` / ``reuse_backward`` with the
settings in their metadata (``accelc.reuse.config``); outputs nobody reads are not computed (a
skipped reused layer computes no weight gradient). Per node the executor keeps the time it took
and the remain ratio, for the reuse report.
"""
from __future__ import annotations

import json
import os
import time
from collections import defaultdict

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from .reuse_kernels import ConvGeom, ReuseSpec, reuse_backward, reuse_forward

DOMAIN = "ai.accelc.reuse"
CONFIG_KEY = "accelc.reuse.config"


def has_reuse(model: onnx.ModelProto) -> bool:
    return any(n.domain == DOMAIN for n in model.graph.node)


def _config(node) -> dict:
    return json.loads({p.key: p.value for p in node.metadata_props}[CONFIG_KEY])


class ReuseNode:
    """A native reuse node (forward or backward) of one layer."""

    def __init__(self, node: onnx.NodeProto, planes: dict, impl: str):
        c = _config(node)
        g = c["geom"]
        self.layer = c["layer"]
        self.node = node
        self.backward = node.op_type.startswith("ReuseConvGrad_")
        self.geom = ConvGeom(g["C"], g["Co"], g["kh"], g["kw"], tuple(g["stride"]), tuple(g["pads"]),
                             tuple(g["dilation"]))
        self.spec = ReuseSpec(c["L"], c["H"], c["scope"], c["input_grad"])
        self.planes = planes.get(node.input[3]) if not self.backward else None
        self.impl = impl
        self.inputs = list(node.input)
        self.outputs = list(node.output)


class SegmentedRunner:
    """Executes a lowered training graph containing reuse nodes (see module doc)."""

    def __init__(self, model: onnx.ModelProto, session_options, providers, impl: str = "native"):
        import onnxruntime as ort
        # ORT's intra-op threads spin after each run by default; with native kernels running between
        # segments that spinning steals the cores they need.
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        g = model.graph
        inits = {t.name: t for t in g.initializer}
        planes = {n: torch.from_numpy(numpy_helper.to_array(t).copy()) for n, t in inits.items()
                  if n.startswith("accelc.reuse.") and n.endswith(".planes")}
        producer, level = {}, {}
        native_after = defaultdict(list)  # segment index -> reuse nodes that run after it
        seg_nodes = defaultdict(list)
        for n in g.node:  # the graph is topologically sorted
            src = [level[id(producer[i])] + (1 if producer[i].domain == DOMAIN else 0)
                   for i in n.input if i in producer]
            if n.domain == DOMAIN:
                lv = max([s - 0 for s in src] or [0])
                # a reuse node reading another reuse node's output directly runs after it, same slot
                native_after[lv].append(n)
            else:
                lv = max(src or [0])
                seg_nodes[lv].append(n)
            level[id(n)] = lv
            for o in n.output:
                if o:
                    producer[o] = n
        self.native = {id(n): ReuseNode(n, planes, impl) for lv in native_after for n in native_after[lv]}
        n_levels = max(list(seg_nodes) + list(native_after) + [0]) + 1
        graph_outputs = [o.name for o in g.output]
        consumers_after = defaultdict(set)  # tensor -> levels (segments) that read it
        native_reads = set()
        for n in g.node:
            for i in n.input:
                if n.domain == DOMAIN:
                    native_reads.add(i)
                else:
                    consumers_after[i].add(level[id(n)])
        typed = _value_types(model)
        self.segments = []
        self.order = []  # ("seg", k) / ("native", ReuseNode)
        for k in range(n_levels):
            nodes = seg_nodes.get(k, [])
            if nodes:
                produced = {o for n in nodes for o in n.output if o}
                needed = []
                for n in nodes:
                    for i in n.input:
                        if i and i not in produced and i not in needed and i not in inits:
                            needed.append(i)
                outs = [o for o in produced if o in graph_outputs or o in native_reads
                        or any(lv > k for lv in consumers_after.get(o, ()))]
                used_inits = [inits[i] for n in nodes for i in n.input if i in inits]
                seen = set()
                used_inits = [t for t in used_inits if not (t.name in seen or seen.add(t.name))]
                sub = helper.make_graph(nodes, f"segment{k}",
                                        [_vi(i, typed) for i in needed], [_vi(o, typed) for o in sorted(outs)],
                                        used_inits)
                # ORT's MaxPoolGrad takes its output shape from value_info: carry it for inner tensors
                sub.value_info.extend(_vi(o, typed) for n in nodes for o in n.output
                                      if o and o not in outs and o in typed)
                sm = helper.make_model(sub, opset_imports=[o for o in model.opset_import if o.domain != DOMAIN])
                sm.ir_version = model.ir_version
                if os.environ.get("ACCELC_DUMP_SEGMENTS"):
                    onnx.save(sm, os.path.join(os.environ["ACCELC_DUMP_SEGMENTS"], f"segment{k}.onnx"))
                sess = ort.InferenceSession(sm.SerializeToString(), session_options, providers=providers)
                self.segments.append({"session": sess, "inputs": needed, "outputs": sorted(outs)})
                self.order.append(("seg", len(self.segments) - 1))
            for n in native_after.get(k, []):
                self.order.append(("native", self.native[id(n)]))
        reads_anywhere = set(graph_outputs) | native_reads | set(consumers_after)
        for rn in self.native.values():
            rn.wanted = [bool(o) and o in reads_anywhere for o in rn.outputs]
        self.graph_outputs = graph_outputs
        self.constants = {i: torch.from_numpy(numpy_helper.to_array(inits[i]).copy())
                          for i in native_reads if i in inits}
        self.stats = defaultdict(lambda: {"ms": 0.0, "calls": 0, "remain": 0.0})

    def run(self, feeds: dict, bound: dict | None = None) -> dict:
        """feeds: name -> torch tensor (CPU). bound: output name -> preallocated tensor."""
        env = dict(self.constants)
        env.update(feeds)
        bound = bound or {}
        ctxs = {}
        for kind, item in self.order:
            if kind == "seg":
                seg = self.segments[item]
                sess = seg["session"]
                io = sess.io_binding()
                for name in seg["inputs"]:
                    t = env[name]
                    if not t.is_contiguous():
                        t = env[name] = t.contiguous()
                    io.bind_input(name, "cpu", 0, _np(t.dtype), tuple(t.shape), t.data_ptr())
                for name in seg["outputs"]:
                    b = bound.get(name)
                    if b is not None:
                        io.bind_output(name, "cpu", 0, _np(b.dtype), tuple(b.shape), b.data_ptr())
                    else:
                        io.bind_output(name, "cpu")
                sess.run_with_iobinding(io)
                for name, v in zip(seg["outputs"], io._iobinding.get_outputs()):
                    env[name] = bound[name] if name in bound else torch.utils.dlpack.from_dlpack(v.to_dlpack())
            else:
                self._run_native(item, env, bound, ctxs)
        return {o: env[o] for o in self.graph_outputs}

    def _run_native(self, rn: ReuseNode, env: dict, bound: dict, ctxs: dict) -> None:
        t0 = time.perf_counter()
        st = self.stats[(rn.layer, "backward" if rn.backward else "forward")]
        if not rn.backward:
            x, w, b = env[rn.inputs[0]], env[rn.inputs[1]], env[rn.inputs[2]]
            y, ctx = reuse_forward(x, w, b, rn.planes, rn.geom, rn.spec, impl=rn.impl)
            env[rn.outputs[0]] = y
            ctxs[rn.outputs[1]] = ctx
            st["remain"] += ctx.remain_ratio
        else:
            dy, x, w = env[rn.inputs[0]], env[rn.inputs[1]], env[rn.inputs[2]]
            ctx = ctxs[rn.inputs[3]]
            spec = rn.spec
            want_dx = rn.wanted[0]
            dx, dw, db = reuse_backward(dy, x, w, ctx, rn.geom, spec, impl=rn.impl, need_dx=want_dx,
                                        need_dw=rn.wanted[1])
            for name, t, want in zip(rn.outputs, (dx, dw, db), rn.wanted):
                if not want:
                    continue
                if name in bound:
                    bound[name].copy_(t)
                    t = bound[name]
                env[name] = t
        st["ms"] += (time.perf_counter() - t0) * 1e3
        st["calls"] += 1

    def take_stats(self) -> dict:
        out = {f"{k[0]}|{k[1]}": dict(v) for k, v in self.stats.items()}
        self.stats.clear()
        return out


def _value_types(model: onnx.ModelProto) -> dict:
    types = {vi.name: vi.type for vi in model.graph.value_info if vi.type.tensor_type.elem_type}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.type.tensor_type.elem_type and vi.name not in types:
            types[vi.name] = vi.type
    return types


def _vi(name: str, types: dict):
    """Typed (and, where inference knew it, shaped) value info: some ORT contrib kernels' shape
    functions crash on inputs of unknown rank."""
    t = types.get(name)
    if t is None:
        return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
    vi = onnx.ValueInfoProto()
    vi.name = name
    vi.type.CopyFrom(t)
    return vi


def _np(dtype):
    return {torch.float32: np.float32, torch.int64: np.int64, torch.int32: np.int32,
            torch.bool: np.bool_}[dtype]
