"""The elementwise kernels of the ``aten`` provider that write their result over a donated input
where they can (``NodeKernel.donate``, the runner's buffer reuse: docs/engine.md#buffer-reuse).

Each returns the same values as its out-of-place form (the same ATen kernel, with ``out=`` one of
its inputs) and falls back to that form when no donated input fits the result exactly."""

from __future__ import annotations

import torch

from .kernels import reusable


def donor(k, ins, shape, dtype, first: int | None = None):
    """The input (among the ``first`` ones, default all) whose buffer takes this node's result
    (of ``shape`` and ``dtype``), or None: one the runner donated (the node is the last reader of
    its memory) that fits it exactly, in the memory layout of every input of the result's shape.
    Elementwise ATen kernels may write over an input they read (the same elements): the result is
    bit-equal to the out-of-place one and in the layout that one would have (a result in another
    layout would change the arithmetic of the kernels after it), without a new buffer of its
    size, which a step would allocate, fault in and free (the runner's buffer reuse,
    docs/engine.md#buffer-reuse)."""
    shape = tuple(shape)
    strides = {t.stride() for t in ins if t is not None and tuple(t.shape) == shape}
    if len(strides) != 1:
        return None
    n = len(ins) if first is None else first
    for i in range(min(len(k.free), n)):
        t = ins[i]
        if k.free[i] and t is not None and reusable(t, shape, dtype) and not _ambiguous(t):
            k.in_place += 1
            return t
    return None


def _ambiguous(t) -> bool:
    """Dense in NCHW order with strides other than NCHW's own: a 4-D tensor with one channel or a
    1×1 map kept in channels_last strides. An op writing a new tensor gives it NCHW's strides, and
    the kernels after it (a convolution) choose their layout from the strides: kept, they would
    compute in another layout and round differently."""
    if not t.is_contiguous():
        return False
    expect, acc = [], 1
    for d in reversed(t.shape):
        expect.append(acc)
        acc *= d
    return tuple(reversed(expect)) != t.stride() and any(d > 1 for d in t.shape)


def relu(k, x):
    if k.free and donor(k, (x,), x.shape, x.dtype) is not None:
        return torch.relu_(x)
    return torch.relu(x)


def elementwise_out(k, ins, first: int | None = None):
    """The donated input (among the ``first`` ones, default all) that can take an elementwise
    result of ``ins`` (None: none can)."""
    if not k.free:
        return None
    try:
        shape = torch.broadcast_shapes(*(tuple(t.shape) for t in ins))
        dtype = ins[0].dtype if len(ins) == 1 else torch.result_type(ins[0], ins[1])
    except RuntimeError:
        return None
    if any(t.dtype != dtype for t in ins[2:]):
        return None
    return donor(k, ins, shape, dtype, first)


def binary(fn, in_place: bool):
    """An ONNX binary op on ``fn``; ``in_place`` for arithmetic (its result has its inputs' float
    dtype), never for comparisons and logic (a bool result: torch would write 0/1 into a float
    ``out``)."""

    def run(k, a, b):
        out = elementwise_out(k, (a, b)) if in_place and a.is_floating_point() else None
        return fn(a, b, out=out) if out is not None else fn(a, b)

    return run


def unary(fn, in_place: bool):
    """An ONNX unary op on ``fn``; ``in_place`` where its result has its input's dtype."""

    def run(k, x):
        out = elementwise_out(k, (x,)) if in_place and x.is_floating_point() else None
        return fn(x, out=out) if out is not None else fn(x)

    return run


def div(k, a, b):
    if a.is_floating_point():
        out = elementwise_out(k, (a, b))
        return torch.div(a, b, out=out) if out is not None else torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")


def add_n(k, *xs):
    """Sum of the inputs, added left to right (into a donated input's buffer where one fits:
    float addition is commutative, so the first add may take either operand's buffer)."""
    if len(xs) == 1:
        return xs[0]
    # only the first two may take the result: a later one is still to be read
    out = elementwise_out(k, xs, first=2) if xs[0].is_floating_point() else None
    if out is None:
        out = xs[0] + xs[1]
    else:
        torch.add(xs[0], xs[1], out=out)
    for x in xs[2:]:
        # in place only where out-of-place would give the same shape and dtype (no broadcast to a
        # larger shape, no promotion): then the two are the same add
        same = torch.broadcast_shapes(out.shape, x.shape) == out.shape and torch.result_type(out, x) == out.dtype
        out = out.add_(x) if same else out + x
    return out


def clip(k, x, lo=None, hi=None):
    lo = float(lo) if lo is not None else k.a.get("min")
    hi = float(hi) if hi is not None else k.a.get("max")
    out = elementwise_out(k, (x,)) if x.is_floating_point() else None
    return torch.clamp(x, lo, hi, out=out) if out is not None else torch.clamp(x, lo, hi)


def grad_into(op, *extra):
    """An elementwise gradient kernel ``op(dY, X, *extra)`` whose result may take a donated input's
    buffer (dY's or X's)."""

    def run(k, dy, x):
        out = donor(k, (dy, x), dy.shape, dy.dtype) if k.free and dy.shape == x.shape else None
        return op.grad_input(dy, x, *extra, grad_input=out) if out is not None else op(dy, x, *extra)

    return run


relu_grad = grad_into(torch.ops.aten.threshold_backward, 0)
sigmoid_grad = grad_into(torch.ops.aten.sigmoid_backward)
tanh_grad = grad_into(torch.ops.aten.tanh_backward)
silu_grad = grad_into(torch.ops.aten.silu_backward)
