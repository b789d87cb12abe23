"""reuse — Adaptive Deep Reuse (Ning, Guan, Shen, ICDE 2019), in one folder:

* :mod:`.spec`: a reused conv's geometry and setting, the names its graph form uses;
* :mod:`.rewrite`: the pass (Conv/ConvGrad -> ReuseConv/ReuseConvGrad nodes) and the variants the
  algorithm builds; :mod:`.onnx_form`: the nodes' portable ONNX local functions;
* :mod:`.algorithm`: the run-time strategies (fixed, lh, off) and the per-layer report;
* :mod:`.kernels` (torch reference), :mod:`.native` (C + OpenMP, ``_reuse.c``) and :mod:`.node`
  (the executor's node kernel);
* :mod:`.cost`: what the nodes cost in the compiler's accounting.

The method (:data:`METHOD`) brings the pass, the algorithm, the node kernel, the cost hook and the
layer kind; torch is loaded only when a graph with reuse nodes runs.
"""

from ...compiler.method import Method, Panel
from ...runtime.kernels import BuildContext, KernelProvider
from . import summary
from .algorithm import Reuse
from .cost import is_reuse_node, reuse_flops
from .options import ReuseOptions
from .rewrite import ReusePass
from .spec import DOMAIN, FORWARD_PREFIX


def _claims(node) -> bool:
    return node.domain == DOMAIN


def _build(node, ctx: BuildContext):
    from .node import ReuseNodeKernel  # heavy: torch and the native kernels, loaded when a graph runs

    return ReuseNodeKernel(node, ctx)


METHOD = Method(
    name="reuse",
    summary="adaptive deep reuse: LSH-clustered rows, the conv GEMMs run on centroids (forward and backward)",
    paper="Ning, Guan, Shen: Adaptive Deep Reuse, ICDE 2019",
    options=ReuseOptions,
    compile=ReusePass,
    algorithm=Reuse,
    after=("rescale",),  # rewrites rescale's stage too; before amp and skip, which rewrite what it leaves
    kernels=(
        KernelProvider(
            name="reuse",
            implementations=("native", "torch"),
            claims=_claims,
            build=_build,
            summary="ReuseConv/ReuseConvGrad nodes: native (C + OpenMP) or torch reference",
        ),
    ),
    costs=((is_reuse_node, reuse_flops),),
    layer_ops=((DOMAIN, FORWARD_PREFIX, "ReuseConv"),),
    run_summary=summary.run_summary,
    bench_panel=Panel("remain ratio (clusters / rows) per reused layer", summary.panel_shows, summary.panel_draw),
)
