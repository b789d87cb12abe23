"""Pass ``opt``: exact training-graph rewrites that make ORT run the same mathematics faster on CPU.

Runs by default before the user's passes (``--no-opt`` turns it off). Each rule is exact and has a
numeric self-check against the unrewritten graph (loss and every gradient on one batch).

Rules (chosen from ORT's per-node profile of the VGG zoo model on this 2-core CPU, where
com.microsoft::ReluGrad took 15.4% of the step, 27 ms of 177 ms, against 1.2 ms for Relu):

* ``relu_grad``: ReluGrad(dY, X) → Mul(dY, Cast(Greater(X, 0), float)). Same values for finite dY
  (ORT's ReluGrad kernel is scalar; Greater/Cast/Mul are vectorised: 8.65 → 2.01 ms on a
  64×32×28×28 tensor, bit-equal output).
* ``conv_onednn``: marks every 2-D Conv and its ConvGrad with ``accelc.exec = onednn``. The graph
  is unchanged (plain ORT still runs it as is); accelc's runtime executes the marked nodes with
  oneDNN's convolution kernels (through torch, zero-copy, between ORT segments), which on this CPU
  are faster than ORT's im2col + GEMM Conv and ConvGrad for the same mathematics. ``--no-opt``, or
  ``--kernel conv=ort`` at run time, keeps ORT's kernels.

Each rule is one small class (:mod:`accelc.passes.opt.rules`) in the style of onnxscript's
rewriter: a pattern (the nodes it matches), a check, a rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...compiler.artifacts import Artifacts
from ...compiler.errors import AccelcError
from ...compiler.graph import training_graph
from ...compiler.method import Method
from ...compiler.options import Options, option, with_schema
from ...compiler.pass_api import Pass, PassResult
from ...compiler.validation import random_feeds, run_lowered
from ...runtime.kernels import BuildContext, KernelProvider
from .rules import ENGINE, RULES, marked_for_onednn


@with_schema({"type": "array", "items": {"enum": list(RULES)}})
def _rules(value):
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    elif isinstance(value, str):
        items = [s.strip() for s in value.split(",") if s.strip()]
    else:
        raise TypeError(f"expected comma-separated rule names, got {value!r}")
    bad = [r for r in items if r not in RULES]
    if bad:
        raise ValueError(f"unknown rule(s) {bad}; rules: {', '.join(RULES)}")
    return items


@dataclass(frozen=True)
class OptOptions(Options):
    rules: list = option(list(RULES), f"rules to apply ({', '.join(RULES)})", _rules)


class OptPass(Pass):
    def run(self, art: Artifacts, options: OptOptions) -> PassResult:
        tg = training_graph(art)
        changes = []
        for name, rule in RULES.items():  # in the rules' own order
            if name in options.rules:
                changes += rule().apply(tg)
        return PassResult.of_graph(art, tg, changes)

    def ensures(self, before: Artifacts, after: Artifacts, options: dict) -> str | None:
        """Loss and every gradient of the rewritten graph equal the unrewritten one's (1e-5) on a
        random batch with random parameters."""
        import onnxruntime as ort  # heavy: loaded when the check runs

        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(before.training.SerializeToString(), so, providers=["CPUExecutionProvider"])
        feeds = random_feeds(sess, before, np.random.default_rng(0), params="random", batch=2)
        a = run_lowered(before, before.training, feeds)
        b = run_lowered(after, after.training, feeds)
        worst = 0.0
        if set(a) != set(b):
            raise AccelcError("opt self-check failed: the rewritten graph has other outputs")
        for k in a:
            x, y = a[k], b[k]
            d = float(np.linalg.norm(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
            if d > 1e-5 * float(np.linalg.norm(np.asarray(x, np.float64))) + 1e-8:
                raise AccelcError("opt self-check failed: the rewritten graph's loss or gradients differ")
            worst = max(worst, float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) if np.size(x) else 0.0)
        return f"loss, logits and {len(a) - 2} gradient/statistic outputs equal the unrewritten graph's (max abs diff {worst:.2g})"


def _build_conv(node, ctx: BuildContext):
    from .onednn import OneDNNConv  # heavy: torch, loaded when a graph is run

    return OneDNNConv(node)


METHOD = Method(
    name="opt",
    summary="exact rewrites that make ORT's CPU kernels faster (runs by default; --no-opt to skip)",
    paper="accelc: profile-driven rewrites of ORT Training 1.19.2 graphs",
    options=OptOptions,
    compile=OptPass,
    default=True,  # first: the graph every optional method starts from
    kernels=(
        KernelProvider(
            name="conv",
            implementations=(ENGINE,),
            claims=marked_for_onednn,
            build=_build_conv,
            summary="Conv/ConvGrad marked by opt's conv_onednn rule, on oneDNN (torch; cuDNN on CUDA)",
            cpu_only=False,
        ),
    ),
)
