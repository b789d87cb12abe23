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


EXEC_KEY = "accelc.exec"


def has_reuse(model: onnx.ModelProto) -> bool:
    return any(n.domain == DOMAIN for n in model.graph.node)


def _onednn(node) -> bool:
    return node.op_type in ("Conv", "ConvGrad") and any(
        p.key == EXEC_KEY and p.value == "onednn" for p in node.metadata_props)


def has_native(model: onnx.ModelProto, conv_engine: str = "onednn") -> bool:
    """Whether the graph has nodes accelc runs itself (reuse nodes; oneDNN-marked convs)."""
    return has_reuse(model) or (conv_engine == "onednn" and any(_onednn(n) for n in model.graph.node))


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


class OneDNNConv:
    """A Conv or ConvGrad node marked ``accelc.exec = onednn``: the same mathematics on oneDNN's
    kernels (torch's convolution / convolution_backward)."""

    def __init__(self, node: onnx.NodeProto):
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        self.node = node
        self.layer = node.name
        self.backward = node.op_type == "ConvGrad"
        self.inputs = list(node.input)
        self.outputs = list(node.output)
        pads = list(a.get("pads", [0, 0, 0, 0]))
        self.stride = list(a.get("strides", [1, 1]))
        self.dilation = list(a.get("dilations", [1, 1]))
        self.group = int(a.get("group", 1))
        self.sym = pads[0] == pads[2] and pads[1] == pads[3]
        self.pads = pads
        self.padding = [pads[0], pads[1]] if self.sym else [0, 0]

    def _in(self, x):
        if self.sym:
            return x
        pt, pl, pb, pr = self.pads
        return torch.nn.functional.pad(x, (pl, pr, pt, pb))

    def run(self, env: dict, bound: dict) -> None:
        if not self.backward:
            x, w = env[self.inputs[0]], env[self.inputs[1]]
            b = env[self.inputs[2]] if len(self.inputs) > 2 and self.inputs[2] else None
            y = torch.nn.functional.conv2d(self._in(x), w, b, self.stride, self.padding, self.dilation, self.group)
            _store(self.outputs[0], y, env, bound)
            return
        dy, x, w = env[self.inputs[0]], env[self.inputs[1]], env[self.inputs[2]]
        mask = [bool(i < len(self.outputs) and self.outputs[i] and self.wanted[i]) for i in range(3)]
        dx, dw, db = torch.ops.aten.convolution_backward(
            dy, self._in(x), w, [w.shape[0]] if mask[2] else None, self.stride, self.padding, self.dilation,
            False, [0, 0], self.group, mask)
        if mask[0] and not self.sym:
            pt, pl = self.pads[0], self.pads[1]
            dx = dx[:, :, pt:pt + x.shape[2], pl:pl + x.shape[3]]
        for i, t in enumerate((dx, dw, db)):
            if mask[i]:
                _store(self.outputs[i], t, env, bound)


def _store(name, t, env, bound):
    if name in bound:
        bound[name].copy_(t)
        t = bound[name]
    env[name] = t.contiguous()


class SegmentedRunner:
    """Executes a lowered training graph containing reuse nodes (see module doc)."""

    def __init__(self, model: onnx.ModelProto, session_options, providers, impl: str = "native",
                 conv_engine: str = "onednn"):
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
        # protobuf hands out a new wrapper per access: hold the nodes once, key them by position
        nodes_all = list(g.node)
        pos = {id(n): k for k, n in enumerate(nodes_all)}
        native_ids = {pos[id(n)] for n in nodes_all
                      if n.domain == DOMAIN or (conv_engine == "onednn" and _onednn(n))}
        for n in nodes_all:  # the graph is topologically sorted
            src = [level[pos[id(producer[i])]] + (1 if pos[id(producer[i])] in native_ids else 0)
                   for i in n.input if i in producer]
            if pos[id(n)] in native_ids:
                lv = max(src or [0])
                # a reuse node reading another reuse node's output directly runs after it, same slot
                native_after[lv].append(n)
            else:
                lv = max(src or [0])
                seg_nodes[lv].append(n)
            level[pos[id(n)]] = lv
            for o in n.output:
                if o:
                    producer[o] = n
        self.native = {pos[id(n)]: (ReuseNode(n, planes, impl) if n.domain == DOMAIN else OneDNNConv(n))
                       for lv in native_after for n in native_after[lv]}
        n_levels = max(list(seg_nodes) + list(native_after) + [0]) + 1
        graph_outputs = [o.name for o in g.output]
        consumers_after = defaultdict(set)  # tensor -> levels (segments) that read it
        native_reads = set()
        for n in nodes_all:
            for i in n.input:
                if pos[id(n)] in native_ids:
                    native_reads.add(i)
                else:
                    consumers_after[i].add(level[pos[id(n)]])
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
                bools = {o for o in outs if o in typed and typed[o].tensor_type.elem_type == onnx.TensorProto.BOOL}
                self.segments.append({"session": sess, "inputs": needed, "outputs": sorted(outs), "bool": bools})
                self.order.append(("seg", len(self.segments) - 1))
            for n in native_after.get(k, []):
                self.order.append(("native", self.native[pos[id(n)]]))
        reads_anywhere = set(graph_outputs) | native_reads | set(consumers_after)
        for rn in self.native.values():
            rn.wanted = [bool(o) and o in reads_anywhere for o in rn.outputs]
        self.graph_outputs = graph_outputs
        self.keep_env = False
        self.last_env: dict = {}
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
                    if name in bound:
                        env[name] = bound[name]
                        continue
                    t = torch.utils.dlpack.from_dlpack(v.to_dlpack())
                    if name in seg["bool"] and t.dtype == torch.uint8:  # ORT hands bool over as uint8
                        t = t.view(torch.bool)
                    env[name] = t
            elif isinstance(item, OneDNNConv):
                item.run(env, bound)
            else:
                self._run_native(item, env, bound, ctxs)
        if self.keep_env:  # debugging and tests: every tensor of the last step
            self.last_env = env
        return {o: env[o] for o in self.graph_outputs}

    def _run_native(self, rn: ReuseNode, env: dict, bound: dict, ctxs: dict) -> None:
        t0 = time.perf_counter()
        st = self.stats[(rn.layer, "backward" if rn.backward else "forward")]
        if not rn.backward:
            x, w, b = env[rn.inputs[0]], env[rn.inputs[1]], env[rn.inputs[2]]
            y, ctx = reuse_forward(x, w, b, rn.planes, rn.geom, rn.spec, impl=rn.impl)
            _store(rn.outputs[0], y, env, bound)
            ctxs[rn.outputs[1]] = ctx
            st["remain"] += ctx.remain_ratio
        else:
            dy, x, w = env[rn.inputs[0]], env[rn.inputs[1]], env[rn.inputs[2]]
            dx, dw, db = reuse_backward(dy, x, w, ctxs[rn.inputs[3]], rn.geom, rn.spec, impl=rn.impl,
                                        need_dx=rn.wanted[0], need_dw=rn.wanted[1])
            for name, t, want in zip(rn.outputs, (dx, dw, db), rn.wanted):
                if want:
                    _store(name, t, env, bound)
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
    return {torch.float32: np.float32, torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_,
            torch.float16: np.float16, torch.float64: np.float64, torch.int8: np.int8, torch.uint8: np.uint8,
            torch.int16: np.int16}[dtype]
