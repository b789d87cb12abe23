"""reuse — Adaptive Deep Reuse (Ning, Guan, Shen, ICDE 2019), in one folder:

* :mod:`.spec`: a reused conv's geometry and setting, the names its graph form uses;
* :mod:`.rewrite`: the pass (Conv/ConvGrad -> ReuseConv/ReuseConvGrad nodes) and the variants the
  algorithm builds; :mod:`.onnx_form`: the nodes' portable ONNX local functions;
* :mod:`.algorithm`: the run-time strategies (fixed, lh, off) and the per-layer report;
* :mod:`.kernels` (torch reference), :mod:`.native` (C + OpenMP, ``_reuse.c``) and :mod:`.node`
  (the executor's node kernel);
* :mod:`.cost`: what the nodes cost in the compiler's accounting.

Importing this package registers the pass, the algorithm, the node kernel, the cost hook and
the layer kind; torch is loaded only when a graph with reuse nodes runs.
"""

from ...compiler.cost import register_cost
from ...compiler.graph import register_layer_op
from ...runtime.kernels import BuildContext, KernelProvider, register_kernel
from . import algorithm, rewrite  # noqa: F401  (register the pass and its algorithm)
from .cost import is_reuse_node, reuse_flops
from .spec import DOMAIN, FORWARD_PREFIX

register_layer_op(DOMAIN, FORWARD_PREFIX, "ReuseConv")
register_cost(is_reuse_node, reuse_flops)


def _claims(node) -> bool:
    return node.domain == DOMAIN


def _build(node, ctx: BuildContext):
    from .node import ReuseNodeKernel  # heavy: torch and the native kernels, loaded when a graph runs

    return ReuseNodeKernel(node, ctx)


register_kernel(
    KernelProvider(
        name="reuse",
        implementations=("native", "torch"),
        claims=_claims,
        build=_build,
        summary="ReuseConv/ReuseConvGrad nodes: native (C + OpenMP) or torch reference",
    )
)
