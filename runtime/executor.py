"""Run a training graph whose claimed nodes execute in accelc's node kernels, the rest on ORT.

Nodes claimed by a registered kernel provider (:mod:`accelc.runtime.kernels`) cut the lowered
training graph into ORT segments: a node's segment is the lowest that runs after everything it
reads (a claimed node runs right after the segment that produces its inputs). One step runs
segment 0, the kernels that follow it, segment 1, ... Tensors move between ORT and torch by
pointer (IOBinding on torch tensors for inputs, DLPack on ORT's outputs): no copies. ``bound``
buffers (the gradients) are written in place. Kernel outputs nobody reads are marked unwanted, so
kernels can leave them out. A kernel may hand any Python object to a later kernel through the step's
environment (only tensors cross into ORT segments).
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from .config import ExecConfig
from .kernels import FRESH, ORT, VIEW, BuildContext, NodeKernel, on_device, providers

_HEAP_KEPT: list = []
_HUGE_OFF: list = []


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next step instead of handing it back (once
    per process, on Linux with glibc; False elsewhere). A training step frees and allocates the
    same activations every step; below 32 MB (M_MMAP_THRESHOLD, the most glibc takes) they come
    from the heap, freed memory stays there (M_TRIM_THRESHOLD the largest value an int holds, 2
    GiB: the heap's free top is not handed back below that), and the heap grows by at least
    M_TOP_PAD (128 MB) at a time, so a step does not pay page faults to map and zero its
    activations again.

    Until 2026-12-07 the trim threshold was passed as 16 GB, which a C int cannot hold: glibc got
    0, and trimmed whatever free top lay above the pad at every free. Measured then, on the 2-core
    AVX2 EPYC, one process per run, 4 pairs interleaved, 5 steps each after 5 untimed
    (torchvision resnet50, batch 16, 128x128, NHWC): with 0, 6,148-24,834 minor page faults per
    step and 1,089-1,190 ms/step (medians of the processes); with 2 GiB, 2 faults and 1,021-1,121
    ms. Peak memory (torchvision VGG11-BN, 224x224, batch 32, NCHW, one run each): 3,948 MB with
    0, 4,275 MB with 2 GiB, torch eager 4,812-4,843. Every allocation from the heap (M_MMAP_MAX
    0) also removed the page faults of mobilenet_v2's 48 MB activations (mapped and faulted in at
    some steps in some processes; none in 4 processes of 4 with it), though not always VGG11-BN's
    (one process of two still faulted 1.8 GB per step), and raised that peak to 4,903 MB: not set.

    Measured before, with the threshold at 0 (resnet50, NCHW, medians of 3 rounds): no settings
    1301 ms/step, pad 64 MB 1186, 128 MB 1166, 256 MB 1123, 1 GB 1106, torch eager 1180-1255 —
    the pad was then all of the free top the heap kept."""
    if _HEAP_KEPT:
        return _HEAP_KEPT[0]
    ok = False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim, m_top_pad, m_mmap = -1, -2, -3  # glibc's mallopt parameters
        # mallopt takes a C int, and ctypes wraps a larger value silently (16 GB became 0)
        assert all(0 <= v < 1 << 31 for v in (MMAP_THRESHOLD, TRIM_THRESHOLD, TOP_PAD))
        ok = bool(libc.mallopt(m_mmap, MMAP_THRESHOLD)) and bool(libc.mallopt(m_trim, TRIM_THRESHOLD))
        ok = ok and bool(libc.mallopt(m_top_pad, TOP_PAD))
    except (OSError, AttributeError):  # not glibc: nothing to set
        ok = False
    _HEAP_KEPT.append(ok)
    return ok


MMAP_THRESHOLD = 32 << 20  # bytes, the most glibc takes
TRIM_THRESHOLD = (1 << 31) - 1  # bytes: mallopt takes an int
TOP_PAD = 128 << 20


def no_huge_page_stalls() -> bool:
    """Stop numpy asking the kernel for transparent huge pages on its large arrays (once per
    process; False where this numpy cannot). numpy advises huge pages (``madvise``) for every array
    of 4 MiB or more; where the kernel's THP ``defrag`` setting is ``madvise`` (this project's
    machines: ``/sys/kernel/mm/transparent_hugepage/defrag``), the first touch of such an array
    may stop to compact memory. Measured 2026-12-07 on a 2-core AVX2 EPYC, the zoo VGG at 28×28,
    skip's frozen-prefix cache (``Engine.infer`` to the third conv block for 8,000 rows, 400 MB
    of float32; 4 calls per process, 4 processes each in two interleaved series): with numpy's
    advice 7.4–9.3 s in the first two calls and 3.8–5.5 s in the later ones, without it 3.0–3.5 s
    in every call. A batch of the cached activations (64 rows of 64×16×16, exactly 4 MiB) was
    advised at every step. torch's CPU allocator advises nothing."""
    if _HUGE_OFF:
        return _HUGE_OFF[0]
    core = getattr(np, "_core", None) or getattr(np, "core", None)  # numpy 2 / numpy 1
    setter = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    ok = setter is not None
    if ok:
        setter(False)
    _HUGE_OFF.append(ok)
    return ok


def prepared(model: onnx.ModelProto, config: ExecConfig) -> onnx.ModelProto:
    """``model`` after the ``prepare`` rewrites of the providers active under ``config``."""
    for p in providers().values():
        if p.prepare is not None and config.impl(p.name) != ORT:
            model = p.prepare(model)
    return model


def claimed(model: onnx.ModelProto, config: ExecConfig) -> dict[int, object]:
    """Position in the graph -> the provider that runs that node, for this configuration."""
    active = [p for p in providers().values() if config.impl(p.name) != ORT]
    out = {}
    if not active:
        return out
    for k, n in enumerate(model.graph.node):
        for p in active:
            if p.claims(n):
                out[k] = p
                break
    return out


def coverage(model: onnx.ModelProto, config: ExecConfig) -> dict:
    """Which of a graph's nodes accelc's kernels would run under ``config`` (nothing is built):
    ``{"nodes", "kernel_nodes", "fell_back": {op: count}}``."""
    model = prepared(model, config)
    owners = claimed(model, config)
    fell: dict[str, int] = defaultdict(int)
    for k, n in enumerate(model.graph.node):
        if k not in owners:
            fell[n.op_type] += 1
    return {"nodes": len(model.graph.node), "kernel_nodes": len(owners), "fell_back": dict(fell)}


def fell_back(models, config: ExecConfig) -> dict[str, int]:
    """Op kind -> nodes no kernel claims, over ``models`` (e.g. a training and an evaluation graph)
    under ``config``."""
    out: dict[str, int] = defaultdict(int)
    for model in models:
        for op, n in coverage(model, config)["fell_back"].items():
            out[op] += n
    return dict(out)


class SegmentedRunner:
    """Executes a lowered training graph with claimed nodes (see the module doc)."""

    def __init__(self, model: onnx.ModelProto, session_options, ort_providers, config: ExecConfig, owners=None):
        """``owners``: :func:`claimed` for this model and config, when the caller has it already."""
        import onnxruntime as ort  # heavy

        # ORT's intra-op threads spin after each run by default; with kernels running between
        # segments that spinning steals the cores they need (set once: ORT warns on a second set)
        try:
            spinning = session_options.get_session_config_entry("session.intra_op.allow_spinning")
        except Exception:  # not set yet
            spinning = None
        if spinning != "0":
            session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        g = model.graph
        inits = {t.name: t for t in g.initializer}
        # protobuf hands out a new wrapper per access: hold the nodes once, key them by position
        nodes_all = list(g.node)
        owners = claimed(model, config) if owners is None else owners
        producer, level = {}, {}
        kernel_after = defaultdict(list)  # segment index -> claimed nodes that run after it
        seg_nodes = defaultdict(list)
        for k, n in enumerate(nodes_all):  # the graph is topologically sorted
            src = [level[producer[i]] + (1 if producer[i] in owners else 0) for i in n.input if i in producer]
            lv = max(src or [0])
            # a claimed node reading another claimed node's output directly runs after it, same slot
            (kernel_after if k in owners else seg_nodes)[lv].append(k)
            level[k] = lv
            for o in n.output:
                if o:
                    producer[o] = k
        kernel_reads = {i for k in owners for i in nodes_all[k].input if i}
        constants = {
            i: on_device(torch.from_numpy(numpy_helper.to_array(inits[i]).copy()), config.device)
            for i in kernel_reads
            if i in inits
        }
        self.kernels: dict[int, NodeKernel] = {
            k: p.build(nodes_all[k], BuildContext(constants, config.impl(p.name), config.device))
            for k, p in owners.items()
        }
        n_levels = max(list(seg_nodes) + list(kernel_after) + [0]) + 1
        graph_outputs = [o.name for o in g.output]
        consumers_after = defaultdict(set)  # tensor -> levels (segments) that read it
        for k, n in enumerate(nodes_all):
            if k not in owners:
                for i in n.input:
                    consumers_after[i].add(level[k])
        functions = {(f.domain, f.name): f for f in model.functions}
        plans = []  # (level, nodes, inputs, outputs) of every ORT segment
        for lv in range(n_levels):
            nodes = [nodes_all[k] for k in seg_nodes.get(lv, [])]
            if nodes:
                produced = {o for n in nodes for o in n.output if o}
                needed = []
                for n in nodes:
                    for i in n.input:
                        if i and i not in produced and i not in needed and i not in inits:
                            needed.append(i)
                outs = sorted(
                    o
                    for o in produced
                    if o in graph_outputs or o in kernel_reads or any(x > lv for x in consumers_after.get(o, ()))
                )
                plans.append((lv, nodes, needed, outs))
        typed = _value_types(model, {t for _, _, ins, outs in plans for t in ins + outs})
        self.segments = []
        self.order = []  # ("seg", k) / ("kernel", NodeKernel)
        by_level = {lv: (nodes, needed, outs) for lv, nodes, needed, outs in plans}
        for lv in range(n_levels):
            if lv in by_level:
                nodes, needed, outs = by_level[lv]
                used_inits = list({i: inits[i] for n in nodes for i in n.input if i in inits}.values())
                sub = helper.make_graph(
                    nodes, f"segment{lv}", [_vi(i, typed) for i in needed], [_vi(o, typed) for o in outs], used_inits
                )
                # ORT's MaxPoolGrad takes its output shape from value_info: carry it for inner tensors
                sub.value_info.extend(
                    _vi(o, typed) for n in nodes for o in n.output if o and o not in outs and o in typed
                )
                used_f = [functions[(n.domain, n.op_type)] for n in nodes if (n.domain, n.op_type) in functions]
                domains = {n.domain for n in nodes} | {"", "ai.onnx"}
                sm = helper.make_model(
                    sub,
                    opset_imports=[o for o in model.opset_import if o.domain in domains],
                    functions=list({id(f): f for f in used_f}.values()),
                )
                sm.ir_version = model.ir_version
                sess = ort.InferenceSession(sm.SerializeToString(), session_options, providers=ort_providers)
                bools = {o for o in outs if o in typed and typed[o].tensor_type.elem_type == onnx.TensorProto.BOOL}
                self.segments.append(
                    {
                        "session": sess,
                        "inputs": needed,
                        "outputs": outs,
                        "bool": bools,
                        "out_shapes": {},
                        "ops": [n.op_type for n in nodes],
                    }
                )
                self.order.append(("seg", len(self.segments) - 1))
            for k in kernel_after.get(lv, []):
                self.order.append(("kernel", self.kernels[k]))
        reads_anywhere = set(graph_outputs) | kernel_reads | set(consumers_after)
        for kern in self.kernels.values():
            kern.wanted = [bool(o) and o in reads_anywhere for o in kern.outputs]
        self.graph_outputs = graph_outputs
        self._outputs = set(graph_outputs)
        self.inputs = [i.name for i in g.input if i.name not in inits]
        self.constants = constants
        self.free_after = self._liveness()
        self.donated = self._donations()
        if self.kernels:
            keep_freed_memory()
            no_huge_page_stalls()
        self.steps = 0  # runs so far, and the milliseconds they spent in ORT segments
        self.ort_ms = 0.0

    def fallback_ops(self) -> dict[str, int]:
        """Op kind -> how many of its nodes run in ORT segments (no kernel claimed them)."""
        out: dict[str, int] = defaultdict(int)
        for seg in self.segments:
            for op in seg["ops"]:
                out[op] += 1
        return dict(out)

    def report(self) -> dict:
        """What ran where: nodes on accelc's kernels, ORT segments, the op kinds that fell back to
        ORT and the milliseconds per run those segments took."""
        return {
            "kernel_nodes": len(self.kernels),
            "ort_segments": len(self.segments),
            "fell_back": self.fallback_ops(),
            "ort_ms_per_step": round(self.ort_ms / self.steps, 3) if self.steps else None,
            # kernel outputs written over an input that died there (runs so far, per run)
            "in_place_per_step": round(sum(k.in_place for k in self.kernels.values()) / self.steps, 1)
            if self.steps
            else None,
        }

    def _liveness(self) -> dict:
        """Step position -> the tensors nothing reads after it. Dropped from the step's environment
        there, so a tensor lives as long as inside one ORT session, not for the whole step."""
        last = {}
        for idx, (kind, item) in enumerate(self.order):
            seg = self.segments[item] if kind == "seg" else None
            for name in seg["inputs"] if seg else [i for i in item.inputs if i]:
                last[name] = idx
            for name in seg["outputs"] if seg else [o for o in item.outputs if o]:
                last.setdefault(name, idx)  # produced and never read: dropped at once
        free = defaultdict(list)
        for name, idx in last.items():
            if name not in self.graph_outputs:
                free[idx].append(name)
        return dict(free)

    def _donations(self) -> int:
        """Give each kernel its inputs whose memory it may write its output into
        (``NodeKernel.donate``): those whose every alias dies at that kernel. Returns how many
        inputs were donated.

        Memory is followed statically: a FRESH kernel's outputs (:data:`~.kernels.FRESH`) each
        start their own memory, a VIEW kernel's output 0 shares its first input's, and anything an
        ORT segment or an UNKNOWN kernel reads or writes, the step's feeds, the constants and the
        graph's outputs are never reused. An input is donated to a kernel when the kernel is the
        last reader of every tensor on that memory, reads it once and reads no other view of it.
        Whether the memory is still shared when the kernel runs (the caller's bound buffers, a
        view torch made) is checked again then (:func:`~.kernels.reusable`)."""
        parent: dict[str, str] = {}

        def root(n):
            while parent.get(n, n) != n:
                n = parent[n]
            return n

        def union(a, b):
            ra, rb = root(a), root(b)
            if ra != rb:
                parent[ra] = rb

        unsafe = set(self.inputs) | set(self.constants) | self._outputs
        last = {}
        for idx, (kind, item) in enumerate(self.order):
            if kind == "seg":
                seg = self.segments[item]
                names = [n for n in seg["inputs"] + seg["outputs"] if n]
                unsafe.update(names)
                for n in names:
                    last[n] = idx
                continue
            ins = [i for i in item.inputs if i]
            outs = [o for o in item.outputs if o]
            for n in ins + outs:
                last[n] = idx
            if item.memory == VIEW and item.inputs and item.inputs[0]:
                for o in outs:
                    union(o, item.inputs[0])
            elif item.memory != FRESH:
                unsafe.update(ins + outs)
        members = defaultdict(list)
        for n in last:
            members[root(n)].append(n)
        bad = {root(n) for n in unsafe}
        end = {r: max(last[m] for m in ms) for r, ms in members.items()}
        count = 0
        for idx, (kind, item) in enumerate(self.order):
            if kind != "kernel" or not item.takes_donations:
                continue
            roots = [root(i) if i else None for i in item.inputs]
            give = []
            for i, r in zip(item.inputs, roots):
                ok = bool(i) and r not in bad and end[r] == idx and roots.count(r) == 1
                give.append(ok)
            item.donate = tuple(give) if any(give) else ()
            count += sum(give)
        return count

    def run(
        self, feeds: dict, bound: dict | None = None, env_out: dict | None = None, on_ready=None, run_options=None
    ) -> tuple[dict, dict]:
        """feeds: name -> torch tensor (CPU). bound: output name -> preallocated tensor.
        ``run_options``: ORT's, for every segment (e.g. :func:`accelc.runtime.session.run_options`).

        Returns (graph outputs, per-kernel statistics of this step). ``env_out``, when given,
        receives every tensor of the step (for debugging and node-level checks). ``on_ready``,
        when given, is called after each segment or kernel with the ``bound`` outputs it has just
        written (e.g. to start communicating gradients while the rest of the backward runs)."""
        env = dict(self.constants)
        env.update(feeds)
        bound = bound or {}
        stats = {}
        self.steps += 1
        # none reused where the caller reads every tensor afterwards, or binds a buffer that is not
        # a graph output (the static plan knows graph outputs only)
        keep_all = env_out is not None or any(b not in self._outputs for b in bound)
        for idx, (kind, item) in enumerate(self.order):
            if kind == "seg":
                t0 = time.perf_counter()
                self._run_segment(self.segments[item], env, bound, run_options)
                self.ort_ms += (time.perf_counter() - t0) * 1e3
            else:
                if not item.any_layout:
                    _nchw_inputs(item, env)
                t0 = time.perf_counter()
                if keep_all and item.donate:
                    donate, item.donate = item.donate, ()
                    try:
                        st = item.run(env, bound)
                    finally:
                        item.donate = donate
                else:
                    st = item.run(env, bound)
                if st is not None:
                    st.setdefault("ms", (time.perf_counter() - t0) * 1e3)
                    stats[item.key] = st
            if on_ready is not None:
                written = self.segments[item]["outputs"] if kind == "seg" else item.outputs
                done = [o for o in written if o and o in bound]
                if done:
                    on_ready(done)
            if env_out is not None:  # keep everything for the caller
                env_out.update(env)
            else:
                for name in self.free_after.get(idx, ()):
                    env.pop(name, None)
        return {o: env[o] for o in self.graph_outputs}, stats

    def _run_segment(self, seg: dict, env: dict, bound: dict, run_options=None) -> None:
        """One ORT segment. Its outputs are torch tensors: after the first run with inputs of
        these shapes, torch allocates them and ORT writes into them, so a tensor that outlives the
        segment is freed (and handed back to the system) when the step drops it. Only what ORT
        needs inside a segment stays in ORT's arena, which ``run_options`` may shrink after
        each run. (Outputs ORT allocated would hold their arena chunks, and the arena its high-water
        mark, beside torch's own tensors: with the arena shrink, torchvision VGG11-BN 224x224
        batch 32 peaked at 5.1 GB, against 5.6 GB with ORT's outputs.)"""
        sess = seg["session"]
        io = sess.io_binding()
        key = []
        for name in seg["inputs"]:
            t = env[name]
            if not t.is_contiguous():
                t = env[name] = t.contiguous()
            key.append(tuple(t.shape))
            io.bind_input(name, "cpu", 0, _np(t.dtype), tuple(t.shape), t.data_ptr())
        key = tuple(key)
        known = seg["out_shapes"].get(key)  # None: not seen yet, or outputs whose shapes vary
        made, staged = {}, {}
        for name in seg["outputs"]:
            b = bound.get(name)
            if b is not None and not b.is_contiguous():  # ORT writes NCHW: an NHWC weight's gradient
                b = staged[name] = torch.empty(b.shape, dtype=b.dtype)  # goes in after the run
            if b is None and known is not None and name in known:
                b = made[name] = torch.empty(known[name][0], dtype=known[name][1])
            if b is not None:
                io.bind_output(name, "cpu", 0, _np(b.dtype), tuple(b.shape), b.data_ptr())
            else:
                io.bind_output(name, "cpu")
        try:
            sess.run_with_iobinding(io, run_options)
        except Exception as e:
            if not made or "shape" not in str(e).lower():
                raise
            # an output's shape depends on the data, not only on the input shapes: ORT allocates
            # this segment's outputs from now on
            seg["out_shapes"].clear()
            seg["dynamic"] = True
            made.clear()
            del io
            return self._run_segment(seg, env, bound, run_options)
        shapes = {}
        for name, v in zip(seg["outputs"], io._iobinding.get_outputs()):
            if name in bound or name in made:
                if name in staged:
                    bound[name].copy_(staged[name])
                env[name] = bound[name] if name in bound else made[name]
                continue
            t = torch.utils.dlpack.from_dlpack(v.to_dlpack())
            if name in seg["bool"] and t.dtype == torch.uint8:  # ORT hands bool over as uint8
                t = t.view(torch.bool)
            env[name] = t
            if t.dtype in _NP and t.numel():  # ORT takes no empty buffer; numpy has no bfloat16
                shapes[name] = (tuple(t.shape), t.dtype)
        if known is None and not seg.get("dynamic") and len(seg["out_shapes"]) < 16:
            seg["out_shapes"][key] = shapes


def _nchw_inputs(kernel: NodeKernel, env: dict) -> None:
    """A kernel that reads NCHW only gets its 4-D inputs in NCHW (see :mod:`.layout`)."""
    for name in kernel.inputs:
        t = env.get(name) if name else None
        if isinstance(t, torch.Tensor) and t.dim() == 4 and not t.is_contiguous():
            env[name] = t.contiguous()


def _value_types(model: onnx.ModelProto, boundary: set) -> dict:
    """Types (and shapes, where known) of the graph's tensors. ONNX shape inference does not know
    ORT's contrib ops (e.g. ConcatTraining's int64 ``per_input_length`` output), so every segment
    boundary tensor it leaves untyped is typed by ORT itself: a session of the whole graph with
    those tensors as outputs (created, never run)."""
    types = {vi.name: vi.type for vi in model.graph.value_info if vi.type.tensor_type.elem_type}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.type.tensor_type.elem_type and vi.name not in types:
            types[vi.name] = vi.type
    missing = sorted(t for t in boundary if t not in types)
    if missing:
        for name, elem in _ort_types(model, missing).items():
            types[name] = helper.make_tensor_type_proto(elem, None)
    return types


_ORT_TYPES = {
    "tensor(float)": onnx.TensorProto.FLOAT,
    "tensor(double)": onnx.TensorProto.DOUBLE,
    "tensor(float16)": onnx.TensorProto.FLOAT16,
    "tensor(int64)": onnx.TensorProto.INT64,
    "tensor(int32)": onnx.TensorProto.INT32,
    "tensor(int8)": onnx.TensorProto.INT8,
    "tensor(uint8)": onnx.TensorProto.UINT8,
    "tensor(bool)": onnx.TensorProto.BOOL,
}


def _ort_types(model: onnx.ModelProto, names: list) -> dict:
    import onnxruntime as ort  # heavy

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    wanted = set(names)
    return {o.name: _ORT_TYPES[o.type] for o in sess.get_outputs() if o.name in wanted and o.type in _ORT_TYPES}


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


_NP = {
    torch.float32: np.float32,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.bool: np.bool_,
    torch.float16: np.float16,
    torch.float64: np.float64,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.int16: np.int16,
}


def _np(dtype):
    return _NP[dtype]
