"""Progressive resizing (``--rescale-mode progressive``), compile time: one stage per input size the
resolution ramp can ask for (:mod:`.ramp`), each compiled as the kernel mode's low-resolution stage
is, with the SAME parameters as the full model, shape for shape:

* kernels are kept at every size (no resampling): a convolution is defined at any input size;
* a flatten→Gemm head is made resolution-agnostic: before its Flatten, the stage's final feature
  map [N, C, h, w] is mapped to the full-size final map's [N, C, H, W] by an adaptive average pool
  (torch's ``adaptive_avg_pool2d``: output cell i averages input cells floor(i·h/H) ..
  ceil((i+1)·h/H) - 1 on each axis), written as two MatMuls with constant matrices,
  ``A_h @ x @ A_wᵀ``, so the Gemm keeps its full-size weights; a global-pooling head needs nothing.
  Why not ONNX ``Resize``: ORT Training 1.19.2 builds a ``ResizeGrad`` for it, which its CPU build
  does not implement (the training graph does not load). Why not ``AveragePool``: the stage's map
  is smaller than the full one, and a pool only shrinks. A MatMul with a constant trains on every
  engine (ORT's kernels, accelc's), and the rows of each matrix sum to 1, so a flat feature map
  reaches the head with the same values at every size.

* with ``--rescale-large-kernels shrink`` or ``pi``, a convolution whose kernel is odd, at least
  ``--rescale-min-kernel`` and centred by its pads reads, at a size below full, its full-size
  weight resized in the graph, ``P_h @ W @ P_wᵀ`` with constant matrices, to the size the kernel
  mode would give it (radius divided by the input's scale, rounded up), centred again:
  ``shrink`` with the kernel mode's tent weights (the kernel's sum kept), ``pi`` with FlexiViT's
  pseudo-inverse resize (Beyer et al. 2023): the least-squares solution of ``<D x, w'> = <x, w>``
  for every patch x, D weighing the pixels around the window as an antialiased bilinear resize
  does (:func:`image_down_matrix`). The parameter keeps its full shape and learns through the
  resize. Other convolutions (auto_pad, dilation, even or uncentred kernels) keep theirs.

The switch between stages then needs no parameter update, and the optimizer's moments carry over.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...compiler import provenance
from ...compiler.artifacts import Artifacts
from ...compiler.errors import AccelcError, show
from ...compiler.model import infer_shapes
from ...compiler.pass_api import PassResult
from .ramp import ramp_step, stage_dir, stage_sizes
from .rewrite import (
    PASS,
    _attrs,
    _set_attr,
    _tent,
    check_reshapes,
    compile_stage,
    flatten_head,
    kernel_down_matrix,
    small_size,
    window_too_large,
)

MAX_STAGES = 32  # one compile (and one validation) per stage: more asks for a larger --rescale-step


def adaptive_pool_matrix(n_out: int, n_in: int) -> np.ndarray:
    """A [n_out, n_in]: ``A @ v`` is torch's ``adaptive_avg_pool1d(v, n_out)`` (rows sum to 1)."""
    a = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        a[i, lo:hi] = 1.0 / (hi - lo)
    return a


def _const(name: str, value: np.ndarray, note: str = "adaptive average pool matrix of a resolution-agnostic head"):
    node = helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(value, name))
    provenance.tag(node, PASS, note=note)
    return node


def _pool_to(m: onnx.ModelProto, flatten: onnx.NodeProto, hw: tuple, full: tuple) -> None:
    """Insert, before ``flatten``, the adaptive average pool of its [N, C, h, w] input to the full
    size's [N, C, H, W] (a MatMul per axis whose size differs)."""
    src, tag = flatten.input[0], f"accelc.rescale.{flatten.name or flatten.output[0]}"
    nodes, x = [], src
    if hw[0] != full[0]:  # [H, h] @ [N, C, h, w] -> [N, C, H, w] (MatMul broadcasts the matrix)
        nodes.append(_const(f"{tag}.pool_h", adaptive_pool_matrix(full[0], hw[0])))
        nodes.append(helper.make_node("MatMul", [nodes[-1].output[0], x], [f"{tag}.pooled_h"], name=f"{tag}/pool_h"))
        x = nodes[-1].output[0]
    if hw[1] != full[1]:  # [N, C, H, w] @ [w, W] -> [N, C, H, W]
        nodes.append(_const(f"{tag}.pool_w", adaptive_pool_matrix(full[1], hw[1]).T.copy()))
        nodes.append(helper.make_node("MatMul", [x, nodes[-1].output[0]], [f"{tag}.pooled_w"], name=f"{tag}/pool_w"))
        x = nodes[-1].output[0]
    for n in nodes:
        if n.op_type == "MatMul":
            provenance.tag(
                n,
                PASS,
                note=f"resolution-agnostic head: adaptive average pool {hw[0]}x{hw[1]} -> {full[0]}x{full[1]} "
                "(the Gemm keeps its full-size weights)",
            )
    flatten.input[0] = x
    _insert_before(m, flatten, nodes)


def _insert_before(m: onnx.ModelProto, node: onnx.NodeProto, nodes: list) -> None:
    at = list(m.graph.node).index(node)
    for k, n in enumerate(nodes):
        m.graph.node.insert(at + k, n)


def image_down_matrix(k: int, s: float) -> tuple[np.ndarray, int]:
    """(D [k', n], offset): the pixels of a patch centred on a k-tap kernel, resized by 1/s to the
    k' = ``small_size(k, s)`` pixels the small kernel reads, as an antialiased bilinear resize
    weighs them (a tent of half-width s around each small pixel's centre, at s·j from the
    patch's centre, rows normalised to 1), over the tents' whole support: n ≥ k pixels, of which
    the kernel's k taps are columns offset .. offset + k - 1. (The small grid is taken centred on
    the kernel: for a convolution, whose windows overlap, the alignment of the two grids varies
    from window to window, so this is the patch-level model FlexiViT's resize is built on.)"""
    ks = small_size(k, s)
    j = np.arange(ks) - (ks - 1) / 2
    n = k + 2 * int(np.ceil(s * ks))  # wider than any tent reaches; trimmed below, symmetrically
    u = np.arange(n) - (n - 1) / 2
    d = _tent(u[None, :] - s * j[:, None], s)
    used = np.flatnonzero(d.any(axis=0))
    cut = min(used[0], n - 1 - used[-1], (n - k) // 2)
    d = d[:, cut : n - cut]
    return d / d.sum(axis=1, keepdims=True), (n - 2 * cut - k) // 2


def kernel_resize_matrix(k: int, s: float, how: str) -> np.ndarray:
    """P [k', k]: the small kernel is ``P w`` per axis. ``shrink``: the kernel mode's tent weights
    (sum kept); ``pi``: the least-squares solution of ``Dᵀ w' = w`` over the resize's whole
    support (:func:`image_down_matrix`; w is 0 outside its k taps), i.e. of ``<D x, w'> = <x, w>``
    for every patch x: ``pinv(Dᵀ)``, restricted to the kernel's columns."""
    if how == "shrink":
        return kernel_down_matrix(k, s).astype(np.float64)
    d, off = image_down_matrix(k, s)
    return np.linalg.pinv(d.T)[:, off : off + k]


def _resizable(n, k: list, min_kernel: int) -> bool:
    """A 2-D Conv whose kernel is odd and at least ``min_kernel`` on both axes, centred by its pads
    (no auto_pad, no dilation): its output keeps its size when the kernel shrinks. Others (e.g. a
    patchify convolution, stride ≥ kernel and no pads) keep their kernels."""
    a = _attrs(n)
    if len(k) != 2 or min(k) < min_kernel or any(x % 2 == 0 for x in k):
        return False
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or max(a.get("dilations", [1, 1])) > 1:
        return False
    return list(a.get("pads", [0, 0, 0, 0])) == [(k[0] - 1) // 2, (k[1] - 1) // 2] * 2


def _resize_kernels(m: onnx.ModelProto, hw: tuple, full: tuple, how: str, min_kernel: int) -> dict:
    """Every Conv of ``m`` that :func:`_resizable` admits reads its weight resized to the input's
    scale (see the module); an axis whose size stays is left as it is. Returns
    {parameter: {"from": [kh, kw], "to": [kh', kw']}}."""
    if how == "keep":
        return {}
    inits = {t.name: t for t in m.graph.initializer}
    scale = (full[0] / hw[0], full[1] / hw[1])
    resized = {}
    for n in list(m.graph.node):
        if n.op_type != "Conv" or len(n.input) < 2 or n.input[1] not in inits:
            continue
        w = inits[n.input[1]]
        k = [int(v) for v in w.dims[2:]]
        if not _resizable(n, k, min_kernel):
            continue
        ks = [small_size(k[i], scale[i]) for i in range(2)]
        if ks == k:
            continue
        pads = [(ks[0] - 1) // 2, (ks[1] - 1) // 2] * 2
        dt = helper.tensor_dtype_to_np_dtype(w.data_type)
        tag = f"accelc.rescale.{n.output[0]}"
        ph, pw = (np.eye(k[i]) if ks[i] == k[i] else kernel_resize_matrix(k[i], scale[i], how) for i in range(2))
        note = f"{how} resize of the {k[0]}x{k[1]} kernel '{n.input[1]}' to {ks[0]}x{ks[1]} at {hw[0]}x{hw[1]}"
        nodes = [_const(f"{tag}.resize_h", ph.astype(dt), note), _const(f"{tag}.resize_w", pw.T.astype(dt), note)]
        nodes.append(
            helper.make_node("MatMul", [nodes[0].output[0], n.input[1]], [f"{tag}.w_h"], name=f"{tag}/resize_h")
        )
        nodes.append(
            helper.make_node("MatMul", [nodes[2].output[0], nodes[1].output[0]], [f"{tag}.w"], name=f"{tag}/resize_w")
        )
        for x in nodes[2:]:
            provenance.tag(x, PASS, note=note + " (the parameter keeps its full shape)")
        resized[n.input[1]] = {"from": k, "to": ks}
        n.input[1] = nodes[-1].output[0]
        _set_attr(n, "kernel_shape", ks)
        _set_attr(n, "pads", pads)
        _insert_before(m, n, nodes)
    return resized


def progressive_model(
    model: onnx.ModelProto, input_name: str, hw: tuple, large_kernels: str = "keep", min_kernel: int = 5
) -> tuple[onnx.ModelProto, dict, dict]:
    """The forward model at input size ``hw`` with the full model's parameters: kernels kept (or
    resized in the graph, ``large_kernels``), every flatten→Gemm head fed the full-size final map
    through an adaptive average pool. Returns it, {head parameter: {"from": [h, w], "to": [H, W]}}
    for the heads that got a pool and {parameter: {"from": [kh, kw], "to": [kh', kw']}} for the
    kernels resized."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    check_reshapes(model, inits)
    heads = {}
    for n in model.graph.node:
        src = flatten_head(n, producers, inits)
        if src is not None:
            heads[n.input[1]] = src.name or src.output[0]
    full = infer_shapes(model, 1)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        if vi.name == input_name:
            for d, size in zip(vi.type.tensor_type.shape.dim[2:], hw):
                d.dim_value = int(size)
    for vi in list(m.graph.value_info):
        m.graph.value_info.remove(vi)
    vi = next(v for v in model.graph.input if v.name == input_name)
    full_hw = tuple(int(d.dim_value) for d in vi.type.tensor_type.shape.dim[2:])
    kernels = _resize_kernels(m, tuple(hw), full_hw, large_kernels, min_kernel)
    shapes = infer_shapes(m, 1)
    small = window_too_large(m, shapes)
    if small:
        raise AccelcError(f"the feature map before {small} is smaller than its window")
    pooled = {}
    flattens = {n.name or n.output[0]: n for n in m.graph.node if n.op_type == "Flatten"}
    for param, fname in heads.items():
        node = flattens[fname]
        big, low = full.get(node.input[0]), shapes.get(node.input[0])
        if not big or not low or len(big) != 4 or len(low) != 4:
            raise AccelcError(f"the shape before Flatten '{fname}' (the head '{param}') is unknown")
        if min(low[2:]) < 1:
            raise AccelcError(f"the final feature map vanishes ({big[2]}x{big[3]} -> {low[2]}x{low[3]})")
        if tuple(low[2:]) != tuple(big[2:]):
            _pool_to(m, node, tuple(low[2:]), tuple(big[2:]))
            pooled[param] = {"from": [int(v) for v in low[2:]], "to": [int(v) for v in big[2:]]}
    if m.ir_version < 10:
        m.ir_version = 10
    return m, pooled, kernels


def _stage_model(model: onnx.ModelProto, input_name: str, hw: tuple, sizes: list, options) -> tuple:
    """:func:`progressive_model`, its refusal naming the size and the smallest start that works."""
    kw = {"large_kernels": options.large_kernels, "min_kernel": options.min_kernel}
    try:
        return progressive_model(model, input_name, hw, **kw)
    except AccelcError as e:
        ok = None
        for later in sizes[sizes.index(hw) + 1 :]:
            try:
                progressive_model(model, input_name, later, **kw)
                ok = later
                break
            except AccelcError:
                continue
        hint = (
            f"use a larger --rescale-start-scale (the ramp's sizes from {ok[0]}x{ok[1]} work)"
            if ok
            else "the model trains at its full size only"
        )
        raise AccelcError(f"cannot rescale progressively: at {hw[0]}x{hw[1]} {e}; {hint}") from None


def compile_progressive(method, art: Artifacts, options) -> PassResult:
    """The pass in progressive mode: a stage per ramp size, compiled into ``stage-HxW/``."""
    info = art.info
    full = tuple(int(d) for d in info.input_shape[1:])
    step = ramp_step(full, options)
    sizes = stage_sizes(full, options.start_scale, step)
    if not sizes:
        return PassResult(art, False, [{"summary": f"no input size below {full[0]}x{full[1]} on the ramp"}])
    if min(min(hw) for hw in sizes) < 1 or min(sizes[0]) < step:
        raise AccelcError(
            f"cannot rescale progressively: --rescale-start-scale {options.start_scale:g} of {full[0]}x{full[1]} "
            f"is below one --rescale-step ({step} px"
            + (
                f": --rescale-step {options.step} grown to fit --rescale-max-stages {options.max_stages}); use a "
                "larger start scale or more stages"
                if step != options.step
                else "); use a larger start scale or a smaller step"
            )
        )
    if len(sizes) > MAX_STAGES:
        raise AccelcError(
            f"cannot rescale progressively: the ramp {sizes[0][0]}x{sizes[0][1]} -> {full[0]}x{full[1]} in steps of "
            f"{step} px has {len(sizes)} sizes below full, each a stage to compile (at most {MAX_STAGES}); "
            f"use a larger --rescale-step"
        )
    source = info.source or info.model  # as given: the legalised form may hold sizes folded at full size
    stages, changes = [], []
    for hw in sizes:
        at = f"at {hw[0]}x{hw[1]}"
        name = stage_dir(hw)
        start = hw == sizes[0]
        try:
            if start:  # refused with the smallest start that works
                model, pooled, kernels = _stage_model(source, info.input_name, hw, sizes, options)
            else:
                kw = {"large_kernels": options.large_kernels, "min_kernel": options.min_kernel}
                model, pooled, kernels = progressive_model(source, info.input_name, hw, **kw)
            art.stages[name] = compile_stage(art, model, f"the {hw[0]}x{hw[1]} stage", at)
        except AccelcError as e:
            if start:
                raise
            # a size above the start that cannot be trained (e.g. a ceil-mode pool with partial
            # windows at that size's parity) is left out: the ramp trains at the largest compiled
            # size below it instead (ProgressiveRescale._size)
            reason = str(e).removeprefix("cannot rescale: ")
            changes.append(
                {
                    "summary": f"stage {hw[0]}x{hw[1]} left out ({show(reason, 300)}): epochs the ramp puts "
                    f"there train at {stages[-1]['hw'][0]}x{stages[-1]['hw'][1]}"
                }
            )
            continue
        stages.append({"hw": list(hw), "dir": name, "heads": pooled, "kernels": kernels})
        pools = "; ".join(
            [
                f"head '{p}' over an adaptive average pool {v['from'][0]}x{v['from'][1]} -> {v['to'][0]}x{v['to'][1]}"
                for p, v in pooled.items()
            ]
            + [
                f"kernel '{p}' {v['from'][0]}x{v['from'][1]} -> {v['to'][0]}x{v['to'][1]} ({options.large_kernels})"
                for p, v in kernels.items()
            ]
        )
        changes.append({"summary": f"stage {hw[0]}x{hw[1]} compiled to {name}/" + (f" ({pools})" if pools else "")})
    art.plan.append(
        method.plan_entry(
            options,
            stage=stages[0]["dir"],
            params={},
            input_hw=list(sizes[0]),
            full_hw=list(full),
            stages=stages,
        )
    )
    changes.append(
        {
            "summary": f"progressive resizing: {len(stages)} stage(s) from {sizes[0][0]}x{sizes[0][1]} to "
            f"{full[0]}x{full[1]} in steps of {step} px"
            + (
                f" (--rescale-step {options.step} grown to fit --rescale-max-stages {options.max_stages})"
                if step != options.step
                else ""
            )
            + ", every parameter kept at its full shape"
        }
    )
    return PassResult(art, True, changes)


def _param_shapes(art: Artifacts) -> dict:
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in art.eval.graph.input}
    return {p: shapes.get(p) for p in art.info.params}


def check_stages(after: Artifacts, spec: dict) -> str:
    """Every stage trains the full model's parameters, shape for shape (what lets the switch keep
    values and optimizer moments), and takes the input size its plan entry says."""
    want = _param_shapes(after)
    for st in spec["stages"]:
        stage = after.stages[st["dir"]]
        got = _param_shapes(stage)
        if got != want:
            diff = next(p for p in set(want) | set(got) if want.get(p) != got.get(p))
            raise AccelcError(
                f"rescale self-check failed: stage {st['dir']} holds '{diff}' as {got.get(diff)}, "
                f"the full model as {want.get(diff)}"
            )
        if list(stage.info.input_shape[1:]) != st["hw"]:
            raise AccelcError(f"rescale self-check failed: stage {st['dir']} takes {stage.info.input_shape}")
    return f"{len(spec['stages'])} stage(s) hold the full model's {len(want)} parameter(s), shape for shape"
