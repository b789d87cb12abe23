"""Pass ``rescale``: kernel rescaling — train first at low resolution with downscaled kernels,
then rescale the kernels to full size and go on.

Paper: Gusmão, Francini, Lepsøy, Magli, "Fast training of convolutional neural networks via
kernel rescaling" (2016): pre-train on images downscaled by s with kernels downscaled by s, then
rescale the kernels to full size (spatial scaling property of convolution: conv(down(x), down(k))
≈ down(conv(x, k)) with the right amplitude) and continue; ≈20% less training time, accuracy kept.

What the pass builds (our choices where the paper's text was not available, all options):

* a low-resolution stage of the model, compiled as its own ORT artifact set in ``stage-low/``:
  the input shrinks by s; conv kernels of size ≥ ``min_kernel`` are resampled at spacing s
  (tent/bilinear weights, which form a partition of unity, so the kernel's sum — its response to
  a flat input — is kept: this is anti-aliased down-sampling followed by the ×s² amplitude
  normalisation); a kernel of radius r becomes radius ceil(r/s); strides stay (every feature map
  shrinks by s) and "same" padding follows the new kernel; 3×3 and 1×1 kernels keep their size;
* a flatten→Gemm head is resampled as a spatial kernel over the final feature map (block sums:
  each low-resolution position stands for s×s full-resolution ones); a global-pooling head needs
  nothing. Where pooling rounds down (VGG at 28×28: 28→14→7→3, at 14: 14→7→3→1) the low-resolution
  final map is not the full one divided by s; the head is then resampled between the two sizes
  the shapes give (area weights down, interpolation up, both keeping the weights' sum, so a flat
  feature map gets the same response at both resolutions);
* the up-rescale (runtime, at the switch): kernels are interpolated back to full size (bilinear
  or bicubic) ×1/s², the Gemm weight likewise; BatchNorm and biases carry over;
* the plan asks the run-time algorithm :class:`accelc.passes.rescale.algorithm.Rescale` to train the
  low-resolution stage first and switch at a fixed epoch, a fraction of the run, or when the
  low-resolution validation loss stops improving (the paper's idea).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...compiler import provenance
from ...compiler.artifacts import Artifacts, generate
from ...compiler.compile import legalized
from ...compiler.errors import AccelcError
from ...compiler.model import check_model, infer_shapes
from ...compiler.pass_api import Pass, PassResult
from .options import PLAN_FIELDS, RescaleOptions  # noqa: F401 (the pass's options, re-exported)

PASS = "rescale"
PASS_THROUGH = ("Dropout", "Identity")  # ops between Flatten and the head that keep its features
GLOBAL_POOLS = ("GlobalAveragePool", "GlobalMaxPool")
SPATIAL_GROWTH = ("Resize", "Upsample", "ConvTranspose", "Pad", "Expand", "Tile", "Concat", "Reshape")
STAGE_DIR = "stage-low"


# ----------------------------------------------------------------------------- 1-D resampling
def _tent(d: np.ndarray, s: float) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(d) / s)


def _cubic(d: np.ndarray, a: float = -0.5) -> np.ndarray:
    d = np.abs(d)
    return np.where(
        d <= 1, (a + 2) * d**3 - (a + 3) * d**2 + 1, np.where(d < 2, a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a, 0.0)
    )


def small_size(k: int, s: int) -> int:
    """Kernel size after shrinking by s: radius r -> ceil(r / s) (odd sizes stay centred)."""
    if k % 2 == 1:
        return 2 * math.ceil((k // 2) / s) + 1
    return max(1, math.ceil(k / s))


def kernel_down_matrix(k: int, s: int) -> np.ndarray:
    """D [k', k]: w' = D w. Tent weights at spacing s; columns sum to 1, so sum(w') == sum(w)."""
    ks = small_size(k, s)
    u = np.arange(k) - (k - 1) / 2
    j = np.arange(ks) - (ks - 1) / 2
    return _tent(u[None, :] - s * j[:, None], s)


def kernel_up_matrix(k: int, s: int, method: str = "bilinear") -> np.ndarray:
    """U [k, k']: w = U w' — interpolate w' at positions u/s; every column is normalised to sum 1,
    which is the 1/s amplitude factor per dimension inside the kernel and keeps sum(w) == sum(w')
    also for taps at the border of the support."""
    ks = small_size(k, s)
    u = np.arange(k) - (k - 1) / 2
    j = np.arange(ks) - (ks - 1) / 2
    d = u[:, None] / s - j[None, :]
    w = _tent(d, 1.0) if method == "bilinear" else _cubic(d)
    return w / w.sum(axis=0, keepdims=True)


def map_down_matrix(n: int, s: int, m: int | None = None) -> np.ndarray:
    """Feature-map positions n -> m (n/s by default) by area sums: a low-res position stands for
    the full-resolution positions it covers, n/m of them (block sums of s when m = n/s); every
    column sums to 1, so the weights' sum is kept."""
    m = n // s if m is None else m
    lo = np.arange(n)[None, :] * m / n  # full position u covers [u, u+1) * m/n in low-res units
    j = np.arange(m)[:, None]
    overlap = np.clip(np.minimum(lo + m / n, j + 1) - np.maximum(lo, j), 0.0, None)
    return overlap / (m / n)


def map_up_matrix(n: int, s: int, method: str = "bilinear", m: int | None = None) -> np.ndarray:
    """m (n/s by default) -> n: interpolate at (u + 0.5)·m/n - 0.5 (edges clamped), each low-res
    weight spread over the positions it stands for (columns sum to 1: ×1/s when m = n/s)."""
    ns = n // s if m is None else m
    pos = (np.arange(n) + 0.5) * ns / n - 0.5
    j = np.arange(ns)
    d = pos[:, None] - j[None, :]
    w = _tent(d, 1.0) if method == "bilinear" else _cubic(d)
    # clamp: fold weight that falls outside onto the edge positions
    lo, hi = pos < 0, pos > ns - 1
    w[lo] = 0
    w[lo, 0] = 1
    w[hi] = 0
    w[hi, ns - 1] = 1
    w = w / w.sum(axis=1, keepdims=True)
    return w / w.sum(axis=0, keepdims=True)  # each low-res weight spreads over its s positions (×1/s)


def resample_kernel(w: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Apply row matrix a to the kernel's H axis and b to its W axis: [O, I, H, W] -> [O, I, H', W']."""
    return np.einsum("ph,oihw,qw->oipq", a, w, b).astype(np.float32)


# ----------------------------------------------------------------------------- the model rewrite
def _attrs(n) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in n.attribute}


def _set_attr(n, name, value):
    for i, a in enumerate(n.attribute):
        if a.name == name:
            del n.attribute[i]
            break
    n.attribute.append(helper.make_attribute(name, value))


def plan_rescale(model: onnx.ModelProto, input_name: str, s: int, min_kernel: int) -> dict:
    """Find what changes: {param: {"kind": "conv"|"gemm", ...}} plus the conv attribute changes."""
    shapes = infer_shapes(model, 1)
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    plan = {"params": {}, "convs": {}}
    check_reshapes(model, inits)
    for n in model.graph.node:
        if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits:
            w = inits[n.input[1]]
            k = list(w.dims[2:])
            if len(k) != 2:
                raise AccelcError(f"cannot rescale: Conv '{n.name}' is not 2-D")
            a = _attrs(n)
            if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise AccelcError(f"cannot rescale: Conv '{n.name}' uses auto_pad")
            if max(a.get("dilations", [1, 1])) > 1 and max(k) >= min_kernel:
                raise AccelcError(f"cannot rescale: dilated Conv '{n.name}'")
            if min(k) >= min_kernel:
                ks = [small_size(x, s) for x in k]
                pads = list(a.get("pads", [0, 0, 0, 0]))
                new_pads = [
                    ((ks[i % 2] - 1) // 2) if pads[i] == (k[i % 2] - 1) // 2 else round(pads[i] / s) for i in range(4)
                ]
                plan["params"][n.input[1]] = {"kind": "conv", "full": list(w.dims), "small": list(w.dims[:2]) + ks}
                plan["convs"][n.name] = {"kernel_shape": ks, "pads": new_pads}
        src = flatten_head(n, producers, inits)
        if src is not None:
            fshape = shapes.get(src.input[0])
            if not fshape or len(fshape) != 4:
                raise AccelcError(f"cannot rescale: the shape before Flatten '{src.name}' is unknown")
            _, c, h, w_ = fshape
            tb = n.op_type == "Gemm" and _attrs(n).get("transB", 0) == 1
            plan["params"][n.input[1]] = {
                "kind": "gemm",
                "flatten": src.input[0],
                "chw": [c, h, w_],
                "transB": tb,
                "full": list(inits[n.input[1]].dims),
            }
    return plan


def check_reshapes(model: onnx.ModelProto, inits: dict) -> None:
    """Refuse a Reshape whose fixed shape would not follow a smaller feature map."""
    for n in model.graph.node:
        if n.op_type == "Reshape" and len(n.input) > 1 and n.input[1] in inits:
            shape = numpy_helper.to_array(inits[n.input[1]])
            if len(shape) > 2 or (len(shape) == 2 and shape[-1] not in (-1, 0)):
                raise AccelcError(
                    f"cannot rescale: Reshape '{n.name}' has a fixed shape {list(shape)} that would "
                    f"not follow the smaller feature map (use Flatten or a global pool)"
                )


def flatten_head(node, producers: dict, inits: dict):
    """The Flatten feeding ``node`` when ``node`` is a Gemm/MatMul head over a spatial feature map
    (Flatten -> [Dropout, Identity] -> Gemm), else None (not a head, or a global-pooling head: the
    Gemm then sees C values at any resolution)."""
    if node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
        return None
    src = producers.get(node.input[0])
    while src is not None and src.op_type in PASS_THROUGH:  # Flatten -> Dropout -> Gemm
        src = producers.get(src.input[0])
    if src is None or src.op_type != "Flatten" or after_global_pool(src.input[0], producers, inits):
        return None
    return src


def _is_global_pool(node, inits) -> bool:
    if node.op_type in GLOBAL_POOLS:
        return True
    if node.op_type in ("ReduceMean", "ReduceMax"):  # over the spatial axes, as timm's heads export it
        axes = _attrs(node).get("axes")
        if axes is None and len(node.input) > 1 and node.input[1] in inits:
            axes = numpy_helper.to_array(inits[node.input[1]]).tolist()
        return axes is not None and {a % 4 for a in axes} >= {2, 3}
    return False


def after_global_pool(tensor: str, producers: dict, inits: dict) -> bool:
    """Whether ``tensor`` comes from a global pool through ops that cannot make a 1x1 map larger
    again (activations, norms, 1x1 convs, transposes: the heads of ConvNeXt, MobileNetV3,
    GhostNet, RexNet). Such a head sees the same features at any input resolution."""
    node = producers.get(tensor)
    for _ in range(32):
        if node is None or node.op_type in SPATIAL_GROWTH:
            return False
        if _is_global_pool(node, inits):
            return True
        data = [i for i in node.input if i and i not in inits]
        node = producers.get(data[0]) if data else None
    return False


def gemm_to_spatial(w: np.ndarray, chw, transB: bool) -> np.ndarray:
    wt = w if transB else w.T  # [out, C*h*w]
    c, h, ww = chw
    return wt.reshape(wt.shape[0], c, h, ww)


def spatial_to_gemm(x: np.ndarray, transB: bool) -> np.ndarray:
    flat = x.reshape(x.shape[0], -1)
    return np.ascontiguousarray(flat if transB else flat.T).astype(np.float32)


def small_chw(spec: dict, s: int) -> list[int]:
    """The low-resolution final feature map of a Gemm head: the size the low-resolution model's
    shapes give (plans of older artifacts: the full size divided by s)."""
    c, h, w = spec["chw"]
    return list(spec.get("small_chw") or [c, h // s, w // s])


def down_param(w: np.ndarray, spec: dict, s: int) -> np.ndarray:
    if spec["kind"] == "conv":
        k = w.shape[2:]
        return resample_kernel(w, kernel_down_matrix(k[0], s), kernel_down_matrix(k[1], s))
    c, h, ww = spec["chw"]
    _, hs, ws = small_chw(spec, s)
    x = gemm_to_spatial(w, spec["chw"], spec["transB"])
    return spatial_to_gemm(resample_kernel(x, map_down_matrix(h, s, hs), map_down_matrix(ww, s, ws)), spec["transB"])


def up_param(w_small: np.ndarray, spec: dict, s: int, method: str = "bilinear") -> np.ndarray:
    if spec["kind"] == "conv":
        k = spec["full"][2:]
        return resample_kernel(w_small, kernel_up_matrix(k[0], s, method), kernel_up_matrix(k[1], s, method))
    c, h, ww = spec["chw"]
    _, hs, ws = small_chw(spec, s)
    x = gemm_to_spatial(w_small, [c, hs, ws], spec["transB"])
    return spatial_to_gemm(
        resample_kernel(x, map_up_matrix(h, s, method, hs), map_up_matrix(ww, s, method, ws)), spec["transB"]
    )


def _divisors_hint(dims, s: int, works) -> str:
    """What to do about spatial input sizes ``dims`` (C, H, W) that s does not divide: the smaller
    factors that divide them and with which the model rescales (``works(f)``), or the model
    exported at the next sizes s divides."""
    c, sizes = dims[0], dims[1:]
    ok = [f for f in range(2, min(4, min(sizes)) + 1) if all(d % f == 0 for d in sizes) and f != s and works(f)]
    near = [d + (-d) % s for d in sizes]
    hint = (
        f"export the model at {'x'.join(map(str, near))} "
        f"(accelc export MODEL --input-shape {c},{','.join(map(str, near))}) to keep s={s}"
    )
    return (f"use --rescale-factor {' or '.join(map(str, ok))}, or " if ok else "") + hint


def window_too_large(model: onnx.ModelProto, shapes: dict) -> str | None:
    """The first Conv or pool whose (padded) input is smaller than its (dilated) window, named for
    the message: shape inference still gives such a node a 1x1 output, ORT refuses to run it."""
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type not in ("Conv", "MaxPool", "AveragePool", "LpPool") or n.input[0] not in shapes:
            continue
        a = _attrs(n)
        k = list(
            a.get("kernel_shape") or (list(inits[n.input[1]].dims[2:]) if n.input[1:2] and n.input[1] in inits else [])
        )
        hw = shapes[n.input[0]][2:]
        if len(k) != len(hw):
            continue
        pads = list(a.get("pads") or [0] * (2 * len(k)))
        dil = list(a.get("dilations") or [1] * len(k))
        for i, (size, kk) in enumerate(zip(hw, k)):
            if size + pads[i] + pads[i + len(k)] < (kk - 1) * dil[i] + 1:
                return f"{n.op_type} '{n.name}' ({'x'.join(map(str, hw))}, window {'x'.join(map(str, k))})"
    return None


def low_resolution_model(
    model: onnx.ModelProto, input_name: str, s: int, min_kernel: int
) -> tuple[onnx.ModelProto, dict]:
    """The forward model at 1/s resolution with resampled kernels and Gemm weights."""
    plan = plan_rescale(model, input_name, s, min_kernel)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        if vi.name == input_name:
            dims = vi.type.tensor_type.shape.dim
            sizes = [d.dim_value for d in dims[2:]]
            chw = [d.dim_value for d in dims[1:]]
            for d in dims[2:]:
                if d.dim_value % s:
                    raise AccelcError(
                        f"cannot rescale: input size {'x'.join(map(str, sizes))} is not divisible by s={s}; "
                        + _divisors_hint(chw, s, lambda f: _rescales(model, input_name, f, min_kernel))
                    )
                d.dim_value //= s
    for n in m.graph.node:
        ch = plan["convs"].get(n.name)
        if ch:
            _set_attr(n, "kernel_shape", ch["kernel_shape"])
            _set_attr(n, "pads", ch["pads"])
    shapes = infer_shapes(m, 1)
    small = window_too_large(m, shapes)
    if small:
        raise AccelcError(
            f"cannot rescale: at 1/{s} resolution the feature map before {small} is smaller than its window; "
            "use a smaller --rescale-factor"
        )
    heads = {p: sp for p, sp in plan["params"].items() if sp["kind"] == "gemm"}
    if heads:  # the final feature map at low resolution, as the shapes give it (pooling may round down)
        for p, sp in heads.items():
            low = shapes.get(sp["flatten"])
            if not low or len(low) != 4:
                raise AccelcError(f"cannot rescale: the low-resolution shape before the head '{p}' is unknown")
            if min(low[2:]) < 1:
                raise AccelcError(
                    f"cannot rescale: at 1/{s} resolution the final feature map vanishes "
                    f"({sp['chw'][1]}x{sp['chw'][2]} -> {low[2]}x{low[3]}); use a smaller --rescale-factor"
                )
            sp["small_chw"] = [int(low[1]), int(low[2]), int(low[3])]
    for i, t in enumerate(m.graph.initializer):
        spec = plan["params"].get(t.name)
        if spec:
            small = down_param(numpy_helper.to_array(t), spec, s)
            nt = numpy_helper.from_array(small, t.name)
            provenance.tag(
                nt,
                PASS,
                note="tent down-sampling ×s² (partition of unity)",
                **{"accelc.original_shape": "x".join(map(str, spec["full"])), "accelc.s": str(s)},
            )
            m.graph.initializer[i].CopyFrom(nt)
    for n in m.graph.node:
        ch = plan["convs"].get(n.name)
        if ch:
            provenance.tag(n, PASS, note=f"low-resolution stage: kernel resampled to {ch['kernel_shape']} (s={s})")
    for vi in list(m.graph.value_info):
        m.graph.value_info.remove(vi)
    if m.ir_version < 10:
        m.ir_version = 10
    return m, plan


def _rescales(model: onnx.ModelProto, input_name: str, s: int, min_kernel: int) -> bool:
    try:
        low_resolution_model(model, input_name, s, min_kernel)
    except AccelcError:
        return False
    return True


# ----------------------------------------------------------------------------- the pass


def compile_stage(art: Artifacts, model: onnx.ModelProto, what: str, at: str) -> Artifacts:
    """``model`` (``art``'s forward model at another input size) checked, legalised and compiled as
    ``art`` was (its loss, optimizer, learning rate and batch size): a stage of ``art``. ``what``
    and ``at`` name it in the refusals ("the low-resolution model", "at 1/2 resolution")."""
    info = art.info
    try:
        st_info = check_model(model, info.sha256)
    except AccelcError as e:
        raise AccelcError(f"cannot rescale: {what} is invalid: {e}") from None
    try:
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as e:
        where = re.search(r"node name: ([^)]+)\): .*?(Dimension mismatch[^.\n]*|[A-Z][^.\n]*)", str(e))
        detail = f"{where.group(1)}: {where.group(2)}" if where else str(e).splitlines()[0][:160]
        detail = re.sub(r"\b[A-Za-z]+Error\] ", "", detail)  # onnx's error class, not the reason
        raise AccelcError(
            f"cannot rescale: {at} the shapes do not fit ({detail}); a layer sized for the full "
            f"resolution (an exported adaptive pool, a fixed reshape) cannot follow the smaller feature map"
        ) from None
    try:
        legal = legalized(dataclasses.replace(st_info, warnings=[]))
        st_art, _ = generate(
            legal,
            art.config["loss"],
            art.config["optimizer"],
            art.config["lr"],
            art.config["batch_size"],
        )
    except AccelcError as e:
        raise AccelcError(f"cannot rescale: {what} cannot be trained: {e}") from None
    st_art.info = dataclasses.replace(legal, warnings=list(st_info.warnings))
    return st_art


class RescalePass(Pass):
    def run(self, art: Artifacts, options: RescaleOptions) -> PassResult:
        if options.mode == "progressive":
            from .progressive import compile_progressive

            return compile_progressive(self.method, art, options)
        s = options.factor
        if s == 1:
            return PassResult(art, False, [{"summary": "s=1: nothing to rescale"}])
        info = art.info
        # from the model as given: its legalised form may hold sizes folded at the full resolution
        low_model, plan = low_resolution_model(info.source or info.model, info.input_name, s, options.min_kernel)
        low_art = compile_stage(art, low_model, "the low-resolution model", f"at 1/{s} resolution")
        art.stages[STAGE_DIR] = low_art
        spec = {k: v for k, v in plan["params"].items()}
        art.plan.append(
            self.method.plan_entry(
                options, stage=STAGE_DIR, params=spec, input_hw=[d // s for d in info.input_shape[1:]]
            )
        )
        changes = [
            {
                "param": p,
                "summary": f"{p}: {'x'.join(map(str, v['full']))} -> "
                + (
                    "x".join(map(str, v["small"]))
                    if v["kind"] == "conv"
                    else "head over a "
                    + "x".join(map(str, small_chw(v, s)[1:]))
                    + f" map (from {v['chw'][1]}x{v['chw'][2]})"
                ),
            }
            for p, v in plan["params"].items()
        ]
        changes.append(
            {
                "summary": f"low-resolution stage at {'x'.join(str(d // s) for d in info.input_shape[1:])} "
                f"compiled to {STAGE_DIR}/"
            }
        )
        return PassResult(art, True, changes)

    def ensures(self, before: Artifacts, after: Artifacts, options: RescaleOptions) -> str | None:
        """Down-then-up rescaling returns every resampled parameter's full shape (the manager
        validates the stage itself); progressive: every stage holds the full model's parameters,
        shape for shape."""
        spec = after.plan[-1]
        if options.mode == "progressive":
            from .progressive import check_stages

            return check_stages(after, spec)
        inits = {t.name: numpy_helper.to_array(t) for t in before.info.model.graph.initializer}
        s = options.factor
        for p, sp in spec["params"].items():
            back = up_param(down_param(inits[p], sp, s), sp, s, options.method)
            if list(back.shape) != list(inits[p].shape):
                raise AccelcError(f"rescale self-check failed: '{p}' comes back as {back.shape}")
        return f"{len(spec['params'])} parameter(s) rescale both ways"
