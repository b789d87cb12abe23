"""The ``reuse`` node kernel: ``ReuseConv_<layer>`` / ``ReuseConvGrad_<layer>`` nodes run in
accelc's kernels between ORT segments (implementations ``native``: C + OpenMP with torch/oneDNN
GEMMs; ``torch``: the reference; or ``ort``: the portable ONNX functions inside ORT).

The forward hands its cluster assignment (a :class:`~accelc.passes.reuse.kernels.ReuseContext`)
to the backward through the step's environment, under the forward's ``ids`` output name.
"""

from __future__ import annotations

import json
import warnings

import onnx

from ...compiler import provenance
from ...compiler.errors import AccelcError
from ...runtime.kernels import BuildContext, NodeKernel, store
from . import cross, native
from .kernels import backward_torch, cluster_torch, forward_torch, hash_buckets
from .spec import BACKWARD_PREFIX, CONFIG_KEY, KERNEL_KEY, ConvGeom, ReuseSpec, geom_from_config

IMPLEMENTATIONS = ("native", "torch")


def reuse_forward(x, w, b, planes, geom: ConvGeom, spec: ReuseSpec, impl: str = "native", ids=None, offsets=None):
    """Forward of a reused conv. ``ids/offsets`` given: use these assignments (tests, FD checks)."""
    if ids is None:
        if impl == "native":
            return native.forward(x, w, b, planes, geom, spec)
        ids, offsets = cluster_torch(hash_buckets(x, planes, geom, spec), spec.H, spec.scope)
    if impl == "native":
        return native.forward_with_ids(x, w, b, ids, offsets, geom, spec)
    return forward_torch(x, w, b, ids, offsets, geom, spec)


def reuse_backward(
    dy, x, w, ctx, geom: ConvGeom, spec: ReuseSpec, impl: str = "native", need_dx: bool = True, need_dw: bool = True
):
    """(dx, dw, db); dx is None when not needed, dw (and the cluster sums) when not needed and dx is exact."""
    if impl == "native":
        return native.backward(dy, x, w, ctx, geom, spec, need_dx=need_dx, need_dw=need_dw)
    dx, dw, db = backward_torch(dy, x, w, ctx, geom, spec)
    return (dx if need_dx else None), dw, db


class ReuseNodeKernel(NodeKernel):
    """A reuse node (forward or backward) of one layer."""

    def __init__(self, node: onnx.NodeProto, ctx: BuildContext):
        super().__init__(node)
        c = json.loads(provenance.props(node)[CONFIG_KEY])
        self.layer = c["layer"]
        self.backward = node.op_type.startswith(BACKWARD_PREFIX)
        self.key = f"{KERNEL_KEY}{self.layer}|{'backward' if self.backward else 'forward'}"
        self.geom = geom_from_config(c)
        self.spec = ReuseSpec(c["L"], c["H"], c["scope"], c["input_grad"])
        self.planes = None if self.backward else ctx.initializers.get(node.input[3])
        impl = ctx.impl
        if impl == "native" and not native.available():
            warnings.warn(f"native reuse kernels unavailable ({native.error()}); using torch kernels")
            impl = "torch"
        self.impl = impl
        every = int(c.get("cross_batch", 0))
        if every >= 2 and self.spec.H > cross.MAX_H:  # an edited graph: the table would not fit
            raise AccelcError(
                f"reuse layer '{self.layer}': cross_batch needs H <= {cross.MAX_H}, the node has H={self.spec.H}"
            )
        # the clusters kept across batches (CR, :mod:`.cross`): state of this kernel, so of the
        # variant's session; a new variant starts from a refresh
        self.table = cross.ClusterTable(every) if every >= 2 and not self.backward else None

    def run(self, env: dict, bound: dict) -> dict:
        if not self.backward:
            x, w, b = env[self.inputs[0]], env[self.inputs[1]], env[self.inputs[2]]
            if self.table is not None:
                kept = self.table.stats["rows_kept"]
                y, ctx = cross.forward(x, w, b, self.planes, self.geom, self.spec, self.table, impl=self.impl)
                kept = self.table.stats["rows_kept"] - kept
            else:
                y, ctx = reuse_forward(x, w, b, self.planes, self.geom, self.spec, impl=self.impl)
            store(self.outputs[0], y, env, bound)
            env[self.outputs[1]] = ctx  # for the backward node (never read by ORT)
            if self.table is None:
                return {"remain": ctx.remain_ratio}
            return {"remain": ctx.remain_ratio, "kept": kept / float(ctx.ids.numel())}
        dy, x, w = env[self.inputs[0]], env[self.inputs[1]], env[self.inputs[2]]
        dx, dw, db = reuse_backward(
            dy,
            x,
            w,
            env[self.inputs[3]],
            self.geom,
            self.spec,
            impl=self.impl,
            need_dx=self.wanted[0],
            need_dw=self.wanted[1],
        )
        for name, t, want in zip(self.outputs, (dx, dw, db), self.wanted):
            if want:
                store(name, t, env, bound)
        return {}
