"""The pooling kernels of the runtime's ``aten`` provider (MaxPool with its indices and their
gradient, average and global pools), split from :mod:`.aten_ops`, whose table names them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import FRESH, NodeKernel, is_nhwc, store

# --- pooling -------------------------------------------------------------------------------


def _pool_args(a: dict):
    ks = list(a["kernel_shape"])
    st = list(a.get("strides", [1] * len(ks)))
    pads = list(a.get("pads", [0] * 2 * len(ks)))
    dil = list(a.get("dilations", [1] * len(ks)))
    return ks, st, pads[: len(ks)], dil, bool(a.get("ceil_mode", 0))


class _MaxPoolKernel(NodeKernel):
    """A MaxPool or MaxPoolGrad node: its pooling arguments; either layout, no state."""

    any_layout = True
    stateless = True
    memory = FRESH

    def __init__(self, node, a):
        super().__init__(node)
        self.ks, self.st, self.pad, self.dil, self.ceil = _pool_args(a)


# The indices a MaxPool keeps for its gradient are torch's: int64 positions in their (n, c) plane.
# They are stored narrower where the plane allows it and widened again in the gradient kernel: a
# plane of at most 65,536 positions as uint16 (on the CPU; int32 elsewhere), up to 2**31 as int32,
# each one cast each way. They are the largest saved tensors of a VGG's forward after its
# activations (torchvision VGG11-BN at 224x224, batch 32: 392 MB as int64, 98 MB as uint16), and
# every one of them is alive at the step's peak, at the start of the backward.
_UINT16_PLANE = 1 << 16


def narrow_indices(idx: torch.Tensor, plane: int) -> torch.Tensor:
    """``idx`` (int64 plane positions) in the narrowest exact dtype for ``plane``."""
    if plane <= _UINT16_PLANE and idx.device.type == "cpu":
        return idx.to(torch.uint16)
    if plane < (1 << 31):
        return idx.to(torch.int32)
    return idx


def widen_indices(idx: torch.Tensor) -> torch.Tensor:
    """The int64 positions :func:`narrow_indices` stored (the same layout)."""
    return idx.to(torch.int64)  # the tensor itself when it is int64 already


class MaxPool(_MaxPoolKernel):
    def run(self, env, bound):
        x = env[self.inputs[0]]
        if len(self.outputs) > 1 and self.outputs[1] and self.wanted[1]:
            y, idx = torch.ops.aten.max_pool2d_with_indices(x, self.ks, self.st, self.pad, self.dil, self.ceil)
            store(self.outputs[1], narrow_indices(idx, x.shape[-2] * x.shape[-1]), env, bound)
            env[self.outputs[1] + "#shape"] = tuple(x.shape)
        else:
            y = F.max_pool2d(x, self.ks, self.st, self.pad, self.dil, self.ceil)
        store(self.outputs[0], y, env, bound)


class MaxPoolGrad(_MaxPoolKernel):
    def run(self, env, bound):
        dy, idx = env[self.inputs[0]], widen_indices(env[self.inputs[1]])
        # the kernel reads only the pooled input's shape (and its layout, which the indices have):
        # an unwritten tensor of that shape stands in
        fmt = torch.channels_last if is_nhwc(idx) else torch.contiguous_format
        x = torch.empty(env[self.inputs[1] + "#shape"], dtype=dy.dtype, device=dy.device, memory_format=fmt)
        dx = torch.ops.aten.max_pool2d_with_indices_backward(
            dy.contiguous(memory_format=fmt), x, self.ks, self.st, self.pad, self.dil, self.ceil, idx
        )
        store(self.outputs[0], dx, env, bound)


def _avg_pool(k, x):
    ks, st, pads, _, ceil = _pool_args(k.a)
    return F.avg_pool2d(x, ks, st, pads, ceil, bool(k.a.get("count_include_pad", 0)))


def _global_avg(k, x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def _global_max(k, x):
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)
