"""The kernels of the runtime's ``aten`` provider (see :mod:`accelc.runtime.aten`, which claims
nodes without loading torch): each op of ONNX's and ORT Training's CNN training graphs on ATen."""

from __future__ import annotations

import functools
import math
import zlib

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from . import aten_elementwise as ew
from .aten import MS, OWN, attrs, domain_of
from .aten_pool import MaxPool, MaxPoolGrad, _avg_pool, _global_avg, _global_max
from .kernels import FRESH, UNKNOWN, VIEW, BuildContext, NodeKernel, on_device, store
from .torch_ops import ConvKernel

DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


def _ints(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


# ---------------------------------------------------------------------------------------------
# kernels: each a function (kernel, env) -> outputs (a tuple, None for an output not computed)


class Op(NodeKernel):
    """A node whose kernel is a function of its input tensors (``None`` for an omitted input)
    returning its outputs; outputs nobody reads may be returned as None. ATen's kernels read and
    write either memory layout (an elementwise op keeps its input's)."""

    any_layout = True
    takes_donations = True

    def __init__(self, node: onnx.NodeProto, fn, a: dict, device: str = "cpu"):
        super().__init__(node)
        self.stateless = fn is not _dropout  # Dropout draws from its own generator
        self.device = device  # where the graph runs (a Constant's values go there)
        self.fn = fn
        self.a = a
        self.memory = _memory(fn, node)
        self.free = ()  # during a run: per input, whether its buffer may take the output
        self.bound: dict = {}  # during a run: the caller's preallocated buffers (by output name)

    def run(self, env: dict, bound: dict) -> None:
        ins = [env[i] if i else None for i in self.inputs]
        self.bound = bound
        if self.donate:
            self.free = tuple(d and name not in bound for d, name in zip(self.donate, self.inputs))
        try:
            outs = self.fn(self, *ins)
        finally:
            self.free = ()
            self.bound = {}
        if not isinstance(outs, tuple):
            outs = (outs,)
        for name, t, want in zip(self.outputs, outs, self.wanted):
            if want and t is not None:  # wanted: read later, or a graph output (bound ones included)
                store(name, t, env, bound)
        return None


def _identity(k, x):
    return x


def _cast(k, x):
    return x.to(DTYPES[k.a["to"]])


def _shape(k, x):
    s = list(x.shape)
    start, end = k.a.get("start", 0), k.a.get("end")
    return torch.tensor(s[start:end] if end is not None else s[start:], dtype=torch.int64)


def _reshape(k, x, shape):
    want = _ints(shape)
    if not k.a.get("allowzero", 0):
        want = [x.shape[i] if v == 0 else v for i, v in enumerate(want)]
    return x.reshape(want)


def _flatten(k, x):
    axis = k.a.get("axis", 1)
    if axis < 0:
        axis += x.dim()
    lead = 1
    for d in x.shape[:axis]:
        lead *= d
    return x.reshape(lead, -1)


def _expand(k, x, shape):
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


def _scale(k, x, s):  # com.microsoft::Scale
    return x / s if k.a.get("scale_down", 0) else x * s


def _axes(k, axes_input, x) -> list[int] | None:
    axes = _ints(axes_input) if axes_input is not None else list(k.a.get("axes", []))
    if not axes:
        return None if not k.a.get("noop_with_empty_axes", 0) else []
    return [a + x.dim() if a < 0 else a for a in axes]


def _reduce(fn):
    def run(k, x, axes=None):
        ax = _axes(k, axes, x)
        keep = bool(k.a.get("keepdims", 1))
        if ax == []:
            return x
        if ax is None:
            ax = list(range(x.dim()))
        return fn(x, ax, keep)

    return run


def _bound_out(k, i: int):
    """The caller's preallocated buffer of the node's output ``i`` during its run, or None."""
    return k.bound.get(k.outputs[i]) if i < len(k.outputs) else None


def _into(k, shape, dtype):
    """The node's preallocated output buffer when it fits (a gradient the optimizer reads): the
    kernel writes the result straight into it, with no transient of the gradient's size."""
    out = _bound_out(k, 0)
    if out is not None and tuple(out.shape) == tuple(shape) and out.dtype == dtype and out.is_contiguous():
        return out
    return None


def _gemm(k, a, b, c=None):
    if k.a.get("transA", 0):
        a = a.t()
    if k.a.get("transB", 0):
        b = b.t()
    alpha, beta = float(k.a.get("alpha", 1.0)), float(k.a.get("beta", 1.0))
    if c is not None and beta != 0.0:
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)
    into = _into(k, (a.shape[0], b.shape[1]), torch.result_type(a, b)) if a.dim() == b.dim() == 2 else None
    out = torch.mm(a, b, out=into) if into is not None else torch.mm(a, b)
    return out if alpha == 1.0 else out.mul_(alpha)


def _matmul(k, a, b):
    return torch.matmul(a, b)


def _transpose(k, x):
    perm = k.a.get("perm") or list(range(x.dim()))[::-1]
    return x.permute(perm)


def _concat(k, *xs):
    axis = k.a["axis"]
    xs = [x for x in xs if x is not None]
    out = torch.cat(xs, axis)
    if len(k.outputs) > 1:  # ConcatTraining: the inputs' lengths along the axis
        return out, torch.tensor([x.shape[axis] for x in xs], dtype=torch.int64)
    return out


def _split(k, x, split=None, *_):  # SplitTraining may add num_outputs
    axis = k.a.get("axis", 0)
    n = len(k.outputs)
    if split is not None:
        sizes = _ints(split)
    elif "split" in k.a:
        sizes = list(k.a["split"])
    else:
        total = x.shape[axis]
        chunk = -(-total // n)
        sizes = [min(chunk, total - i * chunk) for i in range(n)]
    return tuple(torch.split(x, sizes, axis))


def _unsqueeze(k, x, axes=None):
    ax = _ints(axes) if axes is not None else list(k.a["axes"])
    rank = x.dim() + len(ax)
    for a in sorted(a + rank if a < 0 else a for a in ax):
        x = x.unsqueeze(a)
    return x


def _squeeze(k, x, axes=None):
    ax = _ints(axes) if axes is not None else list(k.a.get("axes", []))
    if not ax:
        return x.squeeze()
    for a in sorted((a + x.dim() if a < 0 else a for a in ax), reverse=True):
        x = x.squeeze(a)
    return x


def _slice(k, x, starts, ends, axes=None, steps=None):
    st, en = _ints(starts), _ints(ends)
    ax = _ints(axes) if axes is not None else list(range(len(st)))
    sp = _ints(steps) if steps is not None else [1] * len(st)
    idx = [slice(None)] * x.dim()
    for s, e, a, p in zip(st, en, ax, sp):
        if p <= 0:
            raise NotImplementedError("Slice with a non-positive step")
        a = a + x.dim() if a < 0 else a
        n = x.shape[a]
        s = max(0, min(n, s + n if s < 0 else s))
        e = max(0, min(n, e + n if e < 0 else e))
        idx[a] = slice(s, e, p)
    return x[tuple(idx)]


def _where(k, c, a, b):
    return torch.where(c, a, b)


def _softmax(k, x):
    return torch.softmax(x, k.a.get("axis", -1))


def _softmax_grad(k, dy, y):
    """com.microsoft::SoftmaxGrad_13(dY, Y): Y·(dY − Σ dY·Y) along ``axis`` (Softmax-13's one axis)."""
    axis = k.a.get("axis", -1)
    return torch.ops.aten._softmax_backward_data(dy, y, axis + y.dim() if axis < 0 else axis, y.dtype)


def _leaky_relu(k, x):
    return torch.nn.functional.leaky_relu(x, k.a.get("alpha", 0.01))


def _leaky_relu_grad(k, dy, y):
    """com.microsoft::LeakyReluGrad(dY, Y): dY where Y > 0, else alpha·dY (as ORT: from the output)."""
    return torch.where(y > 0, dy, dy * k.a.get("alpha", 0.01))


def _gather(k, x, idx):
    axis = k.a.get("axis", 0)
    axis = axis + x.dim() if axis < 0 else axis
    i = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, i.reshape(-1))
    return out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1 :]))


def _pad(k, x, pads=None, value=None, axes=None):
    if k.a.get("mode", "constant") != "constant" or axes is not None:
        raise NotImplementedError("Pad: only constant mode on all axes")
    p = _ints(pads) if pads is not None else list(k.a["pads"])
    r = x.dim()
    tp = []
    for d in reversed(range(r)):
        tp += [p[d], p[d + r]]
    return F.pad(x, tp, value=float(value) if value is not None and value.numel() else 0.0)


def _dropout_keep(r: float) -> float:
    """1-ratio in float32: ORT's Dropout and DropoutGrad divide by it (a product with its reciprocal
    differs in the last bit)."""
    return float(np.float32(1.0) - np.float32(r))


def _dropout(k, x, ratio=None, training=None):
    """Dropout: identity unless ``training_mode`` is true and the ratio positive. The mask comes from
    the node's own generator, seeded from its ``seed`` attribute (else its name): every new runner of
    the graph draws the same masks in the same order, as a new ORT session does (the bits are
    torch's, not ORT's: the same distribution)."""
    r = float(ratio) if ratio is not None else float(k.a.get("ratio", 0.5))
    if training is None or not bool(training) or r == 0.0:
        mask = torch.ones(x.shape, dtype=torch.bool, device=x.device) if len(k.outputs) > 1 and k.wanted[1] else None
        return x, mask
    gen = k.__dict__.get("gen")
    if gen is None:
        seed = k.a.get("seed")
        gen = k.gen = torch.Generator(device=x.device)
        gen.manual_seed(int(seed) if seed is not None else zlib.crc32(k.node.name.encode()))
    mask = torch.rand(x.shape, generator=gen, device=x.device) >= r
    return x * mask / _dropout_keep(r), mask


def _dropout_grad(k, dy, mask, ratio=None, training=None):
    """As ORT's DropoutGrad: dY·mask/(1-ratio), whatever ``training_mode`` says (its gradient
    builder emits it only for a training Dropout)."""
    r = float(ratio) if ratio is not None else 0.5
    if r == 0.0:
        return dy * mask
    return dy * mask / _dropout_keep(r)


def _constant(k):
    """A Constant node's value, placed as initializers are (:func:`~accelc.runtime.kernels.on_device`)."""
    return on_device(_constant_value(k.a), k.device)


def _constant_value(a: dict) -> torch.Tensor:
    if "value" in a:
        from onnx import numpy_helper

        return torch.from_numpy(numpy_helper.to_array(a["value"]).copy())
    for key, dt in (("value_float", torch.float32), ("value_int", torch.int64)):
        if key in a:
            return torch.tensor(a[key], dtype=dt)
    for key, dt in (("value_floats", torch.float32), ("value_ints", torch.int64)):
        if key in a:
            return torch.tensor(list(a[key]), dtype=dt)
    raise NotImplementedError("Constant without a value")


def _size(k, x):
    return torch.tensor(x.numel(), dtype=torch.int64)


def _slice_grad(k, dy, shape, starts, ends, axes=None, steps=None):
    """com.microsoft::SliceGrad: dY scattered into zeros of the sliced input's shape."""
    dx = torch.zeros(_ints(shape), dtype=dy.dtype, device=dy.device)
    view = _slice(k, dx, starts, ends, axes, steps)
    view.copy_(dy)
    return dx


def _clip_grad(k, dy, x, lo, hi):
    """The fused gradient of Clip: dY where lo <= X <= hi, else 0.

    One pass (ATen's ``hardtanh_backward``, which passes dY where below < X < above) with the
    bounds moved out to the nearest values of X's dtype outside [lo, hi], so the bounds themselves
    pass as in ORT's chain: the same values as ``dY * (lo <= X <= hi)`` for finite X and dY, the
    result written over dY or X where the runner donated one. Measured on mobilenet_v2 (batch 32,
    128x128, 35 ReLU6, 2-core AVX2 EPYC, interleaved in one process): 349 ms/step against 372
    with the exact three-pass form below. Where they differ: a zero of the mask gives +0.0 (the
    chain gives -0.0 for negative dY, NaN for non-finite dY) and a NaN X gives 0.0 or dY
    (ATen's vector and scalar loops differ; the chain gives NaN·0) -- torch autograd's own
    gradient of ReLU6 runs this kernel too. The three-pass form (clamp, ``eq_``, ``mul_``: bit-equal to
    the chain, NaN and signed zeros included) runs for other dtypes, tensor bounds, and where a
    bound's neighbour is subnormal while this thread flushes subnormals to zero."""
    scalar = all(b is not None and b.numel() == 1 for b in (lo, hi))
    if not scalar or dy.shape != x.shape or dy.dtype != x.dtype or not x.is_floating_point():
        return dy * ((x >= lo) & (x <= hi))
    lo, hi = float(lo), float(hi)
    bounds = _open_bounds(lo, hi, x.dtype) if x.dtype in (torch.float32, torch.float64) else None
    if bounds is None or (bounds[2] and not _subnormals_kept(x.dtype)):
        m = torch.clamp(x, lo, hi)
        m.eq_(x)
        return m.mul_(dy)
    out = ew.donor(k, (dy, x), dy.shape, dy.dtype) if k.free else None
    if out is not None:
        return torch.ops.aten.hardtanh_backward.grad_input(dy, x, bounds[0], bounds[1], grad_input=out)
    return torch.ops.aten.hardtanh_backward(dy, x, bounds[0], bounds[1])


@functools.lru_cache(maxsize=64)
def _open_bounds(lo: float, hi: float, dtype: torch.dtype) -> tuple[float, float, bool] | None:
    """(below, above, subnormal): the nearest values of ``dtype`` below ``lo`` and above ``hi``
    (so below < X < above exactly where lo <= X <= hi) and whether either is subnormal; None
    where a bound is not a finite value of ``dtype`` or lo > hi."""
    t = torch.tensor([lo, hi], dtype=dtype)
    if not bool(torch.isfinite(t).all()) or t.tolist() != [lo, hi] or lo > hi:
        return None
    out = torch.nextafter(t, torch.tensor([-math.inf, math.inf], dtype=dtype))
    tiny = torch.finfo(dtype).tiny
    return out[0].item(), out[1].item(), bool(((out != 0) & (out.abs() < tiny)).any())


def _subnormals_kept(dtype: torch.dtype) -> bool:
    """Whether this thread's arithmetic sees subnormal values of ``dtype`` (not flushed to zero,
    e.g. by ``torch.set_flush_denormal(True)``). The calling thread's mode only: torch sets it on
    the thread that asks, and ATen's worker threads keep the one they started with, so a process
    whose workers flush while this thread does not (FTZ/DAZ set before the pool started, cleared
    after) would drop the gradient at X == 0 exactly in the workers' part of the tensor."""
    return bool((torch.tensor([torch.finfo(dtype).tiny], dtype=dtype) / 2 > 0).item())


def _quick_gelu(k, x):
    """com.microsoft::QuickGelu: x·sigmoid(alpha·x) (ORT's fusion of SiLU when alpha is 1)."""
    alpha = float(k.a.get("alpha", 1.702))
    return x * torch.sigmoid(x * alpha) if alpha != 1.0 else F.silu(x)


def _quick_gelu_grad(k, dy, x):
    alpha = float(k.a.get("alpha", 1.702))
    if alpha == 1.0:
        return ew.silu_grad(k, dy, x)
    s = torch.sigmoid(x * alpha)
    return dy * (s + x * alpha * s * (1.0 - s))


# --- normalisation -----------------------------------------------------------------------


def _bn_train(k, x, scale, bias, mean, var):
    """ORT's BatchNormInternal (training mode): Y, the running statistics moved by ``momentum``
    (ONNX's convention: new = m·old + (1-m)·batch, with the biased batch variance, as ORT does),
    the batch mean and the inverse standard deviation."""
    eps, m = float(k.a.get("epsilon", 1e-5)), float(k.a.get("momentum", 0.9))
    y, save_mean, inv_std = torch.ops.aten.native_batch_norm(x, scale, bias, None, None, True, 0.0, eps)
    rm = rv = None
    if k.wanted[1] or k.wanted[2]:
        # m·old + (1-m)·batch as one lerp each (to float32 rounding), into the caller's buffers
        # when it bound them: 4 small ops instead of 8 and 2 copies, 14-18 against 28-39 us per
        # layer (256 channels, 2-core AVX2 EPYC; resnet50 has 53 layers)
        rm = _lerp(save_mean, mean, m, _bound_out(k, 1))
        vb = inv_std.pow(-2).sub_(eps)
        rv = _lerp(vb, var, m, _bound_out(k, 2))
    return y, rm, rv, save_mean, inv_std


def _lerp(start, end, w: float, out):
    if out is not None and out.shape == start.shape and out.dtype == start.dtype == end.dtype:
        return torch.lerp(start, end, w, out=out)
    return torch.lerp(start, end.to(start.dtype), w)


def _bn_grad(k, dy, x, scale, save_mean, inv_std):
    mask = [bool(w) for w in (k.wanted + [False] * 3)[:3]]
    dx, dw, db = torch.ops.aten.native_batch_norm_backward(
        dy, x, scale, None, None, save_mean, inv_std, True, float(k.a.get("epsilon", 1e-5)), mask
    )
    return dx, dw, db


def _bn_eval(k, x, scale, bias, mean, var):
    if k.a.get("training_mode", 0):
        return _bn_train(k, x, scale, bias, mean, var)
    eps = float(k.a.get("epsilon", 1e-5))
    return torch.ops.aten.native_batch_norm(x, scale, bias, mean, var, False, 0.0, eps)[0]


def _layer_norm(k, x, scale, bias=None):
    axis = k.a.get("axis", -1)
    axis = axis + x.dim() if axis < 0 else axis
    y, mean, rstd = torch.ops.aten.native_layer_norm(
        x, list(x.shape[axis:]), scale, bias, float(k.a.get("epsilon", 1e-5))
    )
    return y, mean, rstd


def _layer_norm_grad(k, dy, x, scale, mean, inv_std, *_):
    axis = k.a.get("axis", -1)
    axis = axis + x.dim() if axis < 0 else axis
    mask = [bool(w) for w in (k.wanted + [False] * 3)[:3]]
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(
        dy,
        x,
        list(x.shape[axis:]),
        mean,
        inv_std,
        scale,
        scale,
        mask,  # bias: only its shape is read
    )
    return dx, dw, db


def _gelu(k, x, *_):
    return F.gelu(x)


def _gelu_grad(k, dy, x, *_):
    return torch.ops.aten.gelu_backward(dy, x)


def _fused_matmul(k, a, b):
    """com.microsoft::FusedMatMul: alpha·op(A)·op(B), op transposing the last two axes."""
    if k.a.get("transA", 0):
        a = a.transpose(-1, -2)
    if k.a.get("transB", 0):
        b = b.transpose(-1, -2)
    out = torch.matmul(a, b)
    alpha = float(k.a.get("alpha", 1.0))
    return out if alpha == 1.0 else out.mul_(alpha)


# --- loss ------------------------------------------------------------------------------------

_REDUCTION = {"none": 0, "mean": 1, "sum": 2}


def _sce(k, scores, labels, weight=None):
    """SoftmaxCrossEntropyLoss: (loss, log_prob)."""
    log_prob = torch.log_softmax(scores, 1)
    red = k.a.get("reduction", "mean")
    loss = F.nll_loss(log_prob, labels, weight, ignore_index=k.a.get("ignore_index", -100), reduction=red)
    return loss, log_prob


def _sce_grad(k, dloss, log_prob, labels, weight=None):
    """com.microsoft::SoftmaxCrossEntropyLossGrad: d scores = dloss · (softmax - onehot) (/ the
    weight sum for ``mean``), through ATen's own NLL and log-softmax backward."""
    red = k.a.get("reduction", "mean")
    ignore = k.a.get("ignore_index", -100)
    if red == "mean":  # the weight of the counted labels, as nll_loss's forward computes it
        valid = labels != ignore
        if weight is None:
            total = valid.sum().to(log_prob.dtype)
        else:
            total = torch.where(valid, weight[labels.clamp(min=0)], 0.0).sum()
    else:
        total = torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)
    flat_lp = log_prob if log_prob.dim() == 2 else log_prob.movedim(1, -1).reshape(-1, log_prob.shape[1])
    flat_lab = labels.reshape(-1)
    dl = dloss.reshape(()) if red != "none" else dloss.reshape(-1)
    dlp = torch.ops.aten.nll_loss_backward(dl, flat_lp, flat_lab, weight, _REDUCTION[red], ignore, total)
    ds = torch.ops.aten._log_softmax_backward_data(dlp, flat_lp, 1, flat_lp.dtype)
    if log_prob.dim() != 2:
        shp = (log_prob.shape[0],) + tuple(log_prob.shape[2:]) + (log_prob.shape[1],)
        ds = ds.reshape(shp).movedim(-1, 1)
    return ds


# --- the table -------------------------------------------------------------------------------

UNARY = {
    "Neg": torch.neg,
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Log": torch.log,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Erf": torch.erf,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Not": torch.logical_not,
}
BINARY = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Pow": torch.pow,
    "Greater": torch.gt,
    "Less": torch.lt,
    "GreaterOrEqual": torch.ge,
    "LessOrEqual": torch.le,
    "Equal": torch.eq,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Max": torch.maximum,
    "Min": torch.minimum,
}

# (domain, op) -> kernel function; "" is ONNX's domain
TABLE: dict[tuple[str, str], object] = {
    ("", "Relu"): ew.relu,
    (MS, "ReluGrad"): ew.relu_grad,
    ("", "Div"): ew.div,
    ("", "Sum"): ew.add_n,
    ("", "Identity"): _identity,
    ("", "Cast"): _cast,
    ("", "Shape"): _shape,
    ("", "Reshape"): _reshape,
    ("", "Flatten"): _flatten,
    ("", "Expand"): _expand,
    (MS, "Scale"): _scale,
    ("", "ReduceSum"): _reduce(lambda x, ax, keep: torch.sum(x, ax, keep)),
    ("", "ReduceMean"): _reduce(lambda x, ax, keep: torch.mean(x, ax, keep)),
    ("", "ReduceMax"): _reduce(lambda x, ax, keep: torch.amax(x, ax, keep)),
    ("", "ReduceL2"): _reduce(lambda x, ax, keep: torch.linalg.vector_norm(x, 2, ax, keep)),
    ("", "ReduceSumSquare"): _reduce(lambda x, ax, keep: torch.sum(x * x, ax, keep)),
    ("", "Gemm"): _gemm,
    ("", "MatMul"): _matmul,
    ("", "Transpose"): _transpose,
    ("", "Concat"): _concat,
    (MS, "ConcatTraining"): _concat,
    ("", "Split"): _split,
    ("", "Unsqueeze"): _unsqueeze,
    ("", "Squeeze"): _squeeze,
    ("", "Slice"): _slice,
    ("", "Clip"): ew.clip,
    ("", "Where"): _where,
    ("", "Softmax"): _softmax,
    (MS, "SoftmaxGrad_13"): _softmax_grad,
    ("", "LeakyRelu"): _leaky_relu,
    (MS, "LeakyReluGrad"): _leaky_relu_grad,
    ("", "Gather"): _gather,
    ("", "Pad"): _pad,
    ("", "Dropout"): _dropout,
    ("", "Constant"): _constant,
    ("", "Size"): _size,
    (MS, "SplitTraining"): _split,
    (MS, "SliceGrad"): _slice_grad,
    (MS, "SigmoidGrad"): ew.sigmoid_grad,
    (MS, "TanhGrad"): ew.tanh_grad,
    (MS, "QuickGelu"): _quick_gelu,
    (OWN, "ClipGrad"): _clip_grad,
    ("", "LayerNormalization"): _layer_norm,
    (MS, "LayerNormalizationGrad"): _layer_norm_grad,
    (MS, "Gelu"): _gelu,
    (MS, "GeluGrad"): _gelu_grad,
    (MS, "FusedMatMul"): _fused_matmul,
    (MS, "QuickGeluGrad"): _quick_gelu_grad,
    (MS, "DropoutGrad"): _dropout_grad,
    (MS, "BatchNormInternal"): _bn_train,
    (MS, "BatchNormalizationGrad"): _bn_grad,
    ("", "BatchNormalization"): _bn_eval,
    ("", "AveragePool"): _avg_pool,
    ("", "GlobalAveragePool"): _global_avg,
    ("", "GlobalMaxPool"): _global_max,
    ("", "SoftmaxCrossEntropyLoss"): _sce,
    (MS, "SoftmaxCrossEntropyLossGrad"): _sce_grad,
}
for _n, _f in UNARY.items():
    TABLE[("", _n)] = ew.unary(_f, in_place=_n != "Not")
for _n, _f in BINARY.items():
    TABLE[("", _n)] = ew.binary(_f, in_place=_n in ("Add", "Sub", "Mul", "Pow", "Max", "Min"))
# what each kernel function's outputs share (NodeKernel.memory): these return views of (or the
# very tensor of) their first input; _constant returns the node's own constant; the rest of the
# table returns new tensors and keeps no input
_VIEWS = {
    _identity, _cast, _reshape, _flatten, _expand, _transpose, _split, _unsqueeze, _squeeze, _slice, _pad, _dropout,
}  # fmt: skip
_VIEWS.update(f for key, f in TABLE.items() if key[1].startswith("Reduce"))  # no axes: the input itself
_UNKNOWN = {_constant}


def _memory(fn, node: onnx.NodeProto) -> str:
    if fn in _UNKNOWN:
        return UNKNOWN
    if fn in _VIEWS or (fn is ew.add_n and len(node.input) < 2):
        return VIEW
    return FRESH


CLASSES = {("", "MaxPool"): MaxPool, ("", "MaxPoolGrad"): MaxPoolGrad}
CONV = {("", "Conv"), (MS, "ConvGrad")}


def build(node: onnx.NodeProto, ctx: BuildContext) -> NodeKernel:
    key = (domain_of(node), node.op_type)
    if key in CONV:
        return ConvKernel(node)
    if key in CLASSES:
        return CLASSES[key](node, attrs(node))
    return Op(node, TABLE[key], attrs(node), ctx.device)
