"""Pass ``skip``: layer skip learning with LARS variables.

Paper: "Layer skip learning using LARS variables" (IEEE ICECS 2018, Kobe University). For each
layer the LARS local rate λ = η‖w‖ / (‖∇w‖ + β‖w‖) (You et al., 2017) measures how small the
layer's relative update has become; when λ passes a threshold the layer's learning is judged
unnecessary and the layer is skipped from the next epoch on. Reported (VGG-F): 2.14×/2.25× faster
to best top-1/top-5, −39.0% operations, −38.9% bandwidth.

What the pass does to the training graph:

* ``--skip-layers A,B`` (a fixed skip set): removes the skipped layers' weight and bias gradients
  (their accumulator nodes, buffers and outputs), the gradients of the BatchNorm that directly
  follows a skipped conv (it belongs to the layer), then every backward node that serves nothing
  any more (dead-code elimination from the graph outputs). ConvGrad outputs nobody reads are
  dropped, so a skipped conv inside the network computes only its input gradient, and the lowest
  trained layer computes no input gradient: for an input-side prefix the backward stops there.
  The checkpoint marks the skipped parameters frozen, so plain ORT Training loads the result.
* without ``--skip-layers``: instruments the graph for the runtime controller. Per layer it adds
  ``ReduceL2`` of the weight and of its gradient as graph outputs (``accelc.lars.<layer>.w`` /
  ``.g``), so λ costs two tiny reductions inside ORT; the controller
  (:class:`accelc.passes.skip.algorithm.LarsSkip`) decides per epoch and transforms the artifacts
  with :func:`skip_variant`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ...compiler.artifacts import Artifacts
from ...compiler.cost import OPTIMIZER_COST, gflops, graph_costs, node_cost, numel
from ...compiler.errors import AccelcError, show
from ...compiler.graph import ACC_OUT_SUFFIX, BUFFER_SUFFIX, GRAD_SUFFIX, TrainingGraph, training_graph
from ...compiler.options import (
    Options,
    boolean,
    choice,
    int_at_least,
    name_list,
    option,
    part,
    positive_float,
)
from ...compiler.ort_checkpoint import freeze
from ...compiler.pass_api import Pass, PassResult
from ...compiler.validation import seed_random_ops
from .freezeout import freeze_times

LARS_PREFIX = "accelc.lars."
POLICIES = ("prefix", "suffix", "any")
RULES = ("lars", "freezeout")
TAU_MODES = ("relative", "absolute", "growth")


def rule_text(mode, tau) -> str:
    """The threshold rule in words, for decisions and explanations."""
    if mode == "absolute":
        return f"λ > {tau}"
    if mode == "growth":
        return f"λ grew < {tau} over the previous epoch"
    return f"λ > {tau} × the layer's first-epoch λ"


def layer_groups(tg: TrainingGraph) -> dict[str, list[str]]:
    """Parameters owned by each layer: its own, plus a BatchNorm that directly follows it."""
    consumers = {}
    for n in tg.graph.nodes:
        if tg.is_backward(n):
            continue
        for t in n.inputs:
            consumers.setdefault(t.name, []).append(n)
    groups = {}
    for layer in tg.layers:
        params = list(layer.params)
        for n in consumers.get(layer.output, []):
            if n.op in ("BatchNormInternal", "BatchNormalization"):
                params += [t.name for t in n.inputs[1:3] if t.name in tg.params]
        groups[layer.name] = params
    return groups


def lars_outputs(layer_name: str) -> tuple[str, str]:
    """The graph outputs that carry a layer's ‖w‖ and ‖∇w‖."""
    return f"{LARS_PREFIX}{layer_name}.w", f"{LARS_PREFIX}{layer_name}.g"


def instrument(tg: TrainingGraph) -> list[dict]:
    """Add ReduceL2(w) and ReduceL2(∇w) outputs per trainable layer (the LARS variable's inputs)."""
    changes = []
    tensors = tg.graph.tensors()
    have = {o.name for o in tg.graph.outputs}
    for layer in tg.layers:
        w = layer.weight
        if w not in tg.params or (w + GRAD_SUFFIX) not in tensors:
            continue
        wn, gn = lars_outputs(layer.name)
        if wn in have:
            continue
        for src, out, what in ((w, wn, "‖w‖"), (w + GRAD_SUFFIX, gn, "‖∇w‖")):
            y = gs.Variable(out, dtype=np.float32, shape=[])
            node = gs.Node(
                "ReduceL2",
                name=f"accelc/lars/{layer.name}/{'w' if out == wn else 'g'}_norm",
                inputs=[tensors[src]],
                outputs=[y],
                attrs={"keepdims": 0},
            )
            tg.graph.nodes.append(node)
            tg.graph.outputs.append(y)
            tg.tag(node.name, "skip", layer.name, f"LARS variable input {what} for the skip controller")
        changes.append({"layer": layer.name, "summary": f"{layer.name}: LARS norms exposed"})
    return changes


def prune(tg: TrainingGraph, skip: list[str]) -> tuple[list[dict], list[str]]:
    """Remove the gradients of ``skip`` layers and every backward node that then serves nothing.

    Returns (change records, frozen parameter names).
    """
    groups = layer_groups(tg)
    unknown = [s for s in skip if s not in groups]
    if unknown:
        raise AccelcError(f"unknown layer(s) {', '.join(unknown)} for --skip-layers; layers are: {', '.join(groups)}")
    g = tg.graph
    frozen = [p for s in skip for p in groups[s] if p in tg.params]
    frozen_set = set(frozen)
    drop_outputs = {p + ACC_OUT_SUFFIX for p in frozen_set}
    for s in skip:
        drop_outputs.update(lars_outputs(s))
    before_bwd = {n.name for n in g.nodes if tg.is_backward(n)}
    g.outputs = [o for o in g.outputs if o.name not in drop_outputs]
    frozen_buffers = {p + BUFFER_SUFFIX for p in frozen_set}
    g.inputs = [i for i in g.inputs if i.name not in frozen_buffers]
    # Dead-code elimination to a fixpoint; ConvGrad's optional outputs that nobody reads are
    # dropped so the node stops computing them (dW, dB of a skipped layer; dX below the lowest
    # trained layer).
    while True:
        g.cleanup(remove_unused_graph_inputs=False, recurse_functions=False)
        used = {t.name for n in g.nodes for t in n.inputs} | {o.name for o in g.outputs}
        changed = False
        for n in g.nodes:
            if n.op != "ConvGrad":
                continue
            for k, out in enumerate(n.outputs):
                if out.name and out.name not in used:
                    n.outputs[k] = gs.Variable.empty()
                    changed = True
                    layer = n.name.split("_Grad/")[0]
                    tg.tag(n.name, "skip", layer, "skip: unneeded gradient outputs removed")
        if not changed:
            break
    after_bwd = {n.name for n in g.nodes if tg.is_backward(n)}
    removed = sorted(before_bwd - after_bwd)
    tg.reindex()
    changes = [{"layer": s, "frozen_params": groups[s], "summary": f"{s}: skipped (no gradients)"} for s in skip]
    changes.append({"summary": f"{len(removed)} backward node(s) removed", "removed_nodes": removed})
    return changes, frozen


def trainable_layers(tg: TrainingGraph) -> list[str]:
    """The layers with a trained weight, input side first (the ones skip can take out)."""
    tensors = tg.graph.tensors()
    return [layer.name for layer in tg.layers if layer.weight in tg.params and layer.weight + GRAD_SUFFIX in tensors]


def freeze_plan(tg: TrainingGraph, options) -> list[dict]:
    """freezeout: each trainable layer's freeze time, as change records (the graph is unchanged)."""
    layers = trainable_layers(tg)
    times = freeze_times(len(layers), options.t0, options.spacing, options.keep_last)
    return [
        {
            "layer": name,
            "freezes_at": t,
            "summary": f"{name}: freezes at {t:.0%} of the run" if t < 1 else f"{name}: trains to the end",
        }
        for name, t in zip(layers, times)
    ]


def explain_freezeout(opts: dict, changes: list[dict]) -> list[str]:
    """What a freezeout plan entry will do, for ``accelc inspect``/``explain``."""
    timed = [c for c in changes if isinstance(c.get("freezes_at"), (int, float)) and c.get("layer")]
    frozen = [c for c in timed if c["freezes_at"] < 1]
    out = [
        f"freezeout schedule: {len(frozen)} of {len(timed)} layers freeze input side first, from "
        f"{opts.get('t0')} of the run's epochs on ({opts.get('spacing')} spacing), each layer's learning "
        f"rate annealed to zero first (cosine{', scaled by 1/t_i' if opts.get('scale_lr') else ''}); "
        "nothing is frozen yet: the run's budget fixes the steps"
        + (
            "; with a pass that trains below full size first (rescale), the schedule starts where full size does"
            if opts.get("after_resize", "schedule") != "off"
            else ""
        )
    ]
    if frozen:
        out.append(
            "freezes at: "
            + ", ".join(f"{show(str(c['layer']), 60)} {float(c['freezes_at']):.0%}" for c in frozen)
            + (
                "; freezing up to it would save per step: "
                + ", ".join(
                    f"{show(str(c['layer']), 60)} {gflops(c['saves_flops_per_step'])}"
                    for c in frozen
                    if isinstance(c.get("saves_flops_per_step"), (int, float))
                )
                if any(isinstance(c.get("saves_flops_per_step"), (int, float)) for c in frozen)
                else ""
            )
        )
    return out


def freeze_in_checkpoint(checkpoint: bytes, frozen: list[str]) -> bytes:
    """Rewrite an ORT checkpoint so ``frozen`` parameters have requires_grad = False (byte for byte
    what ORT Training's save_checkpoint writes, without ORT Training)."""
    return freeze(checkpoint, frozen)


def skip_sets(layers: list[str], policy: str, keep_last: int) -> dict[str, list[str]]:
    """layer -> the smallest skip set that contains it under ``policy`` (as the controller picks
    them: a prefix ends at it, a suffix starts at it, or the layer alone); layers the policy never
    skips are left out."""
    n = len(layers)
    if policy == "prefix":
        return {name: layers[: i + 1] for i, name in enumerate(layers[: max(n - keep_last, 0)])}
    if policy == "suffix":
        return {name: layers[i:] for i, name in enumerate(layers) if i > 0}
    return {name: [name] for name in layers[: max(n - keep_last, 0)]}


def skip_savings(
    art: Artifacts, layers: list[str], policy: str, keep_last: int, tg: TrainingGraph | None = None
) -> dict[str, float]:
    """FLOPs per training step (cost model) that skipping each layer's set (:func:`skip_sets`)
    would save, from the instrumented artifacts.

    Equal to pruning a copy of the graph per set (:func:`prune`) and costing it, without the copies:
    each node is costed once, and each set's pruning is one backward liveness sweep over the node
    list (ONNX nodes are in topological order), in which a ConvGrad keeps only the outputs that
    something still reads, as :func:`prune`'s fixpoint leaves it. Linear in the graph per set; the
    copy-and-prune way grew with layers x graph x shape lookups (minutes on 100-conv models).
    ``tg``: the graph view of ``art.training`` where the caller has one (nodes in topological
    order, as :meth:`TrainingGraph.to_onnx` leaves them)."""
    optimizer = art.config.get("optimizer", "adamw")
    if tg is None:
        tg = training_graph(art)
    else:
        tg.reindex()
    base = graph_costs(tg, optimizer)["total"]["flops"]
    groups = layer_groups(tg)
    nodes = list(tg.graph.nodes)
    ins = [[t.name for t in n.inputs if t.name] for n in nodes]
    outs = [[t.name for t in n.outputs] for n in nodes]
    full = [node_cost(tg, n).flops for n in nodes]
    partial: dict[tuple, float] = {}  # (node index, kept outputs) -> FLOPs of a ConvGrad computing only those

    def convgrad_flops(i: int, kept: tuple) -> float:
        if (i, kept) not in partial:
            node = nodes[i]
            shim = _OutputsKept(node, [o if o.name in kept else gs.Variable.empty() for o in node.outputs])
            partial[(i, kept)] = node_cost(tg, shim).flops
        return partial[(i, kept)]

    f_el = OPTIMIZER_COST.get(optimizer, OPTIMIZER_COST["adamw"])[0]
    graph_outputs = [o.name for o in tg.graph.outputs]
    out = {}
    for name, skip in skip_sets(layers, policy, keep_last).items():
        frozen = {p for s in skip for p in groups[s] if p in tg.params}
        drop = {p + ACC_OUT_SUFFIX for p in frozen}
        for s in skip:
            drop.update(lars_outputs(s))
        used = {o for o in graph_outputs if o not in drop}
        flops = 0.0
        for i in range(len(nodes) - 1, -1, -1):
            if nodes[i].op == "ConvGrad":
                kept = tuple(o for o in outs[i] if o and o in used)
                if not kept:
                    continue
                flops += full[i] if len(kept) == sum(1 for o in outs[i] if o) else convgrad_flops(i, kept)
            elif any(o in used for o in outs[i]):
                flops += full[i]
            else:
                continue
            used.update(ins[i])
        flops += f_el * sum(numel(tg.shape(p)) for p in tg.params if p not in frozen)
        out[name] = base - flops
    return out


class _OutputsKept:
    """A node seen with some of its outputs blanked (for costing a ConvGrad that computes fewer)."""

    def __init__(self, node, outputs):
        self._node, self.outputs = node, outputs

    def __getattr__(self, name):
        return getattr(self._node, name)


def only_norms_added(before, after) -> str | None:
    """A description if ``after`` is ``before`` with only :func:`instrument`'s nodes added (every
    node of ``before`` byte-identical in ``after``; each added node a ReduceL2 reading tensors of
    ``before`` into a new graph output), so its loss and gradients are ``before``'s by
    construction; None where anything else differs."""
    old = {n.name: n.SerializeToString(deterministic=True) for n in before.graph.node}
    new = {n.name: n for n in after.graph.node}
    if len(old) != len(before.graph.node) or len(new) != len(after.graph.node):
        return None  # names not unique: no node-by-node match
    if any(name not in new or new[name].SerializeToString(deterministic=True) != b for name, b in old.items()):
        return None
    for field in ("input", "initializer"):  # the values the nodes read: the same set, byte for byte
        a, b = (
            sorted(x.SerializeToString(deterministic=True) for x in getattr(m.graph, field)) for m in (before, after)
        )
        if a != b:
            return None
    known = {t for n in before.graph.node for t in list(n.input) + list(n.output)}
    known |= {t.name for t in before.graph.input} | {t.name for t in before.graph.initializer}
    old_outputs = [o.name for o in before.graph.output]
    new_outputs = [o.name for o in after.graph.output]
    added = [n for name, n in new.items() if name not in old]
    if new_outputs[: len(old_outputs)] != old_outputs:
        return None
    extra = set(new_outputs[len(old_outputs) :])
    for n in added:
        if n.op_type != "ReduceL2" or not set(n.input) <= known or not set(n.output) <= extra:
            return None
    return (
        f"the graph is the unrewritten one with {len(added)} ReduceL2 norm(s) added as new outputs "
        f"(all {len(old)} other nodes byte-identical): loss and gradients unchanged by construction"
    )


def seeded(art: Artifacts) -> Artifacts:
    out = art.copy()
    out.training = seed_random_ops(art.training)
    return out


def skip_variant(base: Artifacts, skip: list[str], batch_size: int | None = None) -> tuple[Artifacts, list[dict]]:
    """The base artifacts with ``skip`` layers pruned (used by the pass and by the algorithm)."""
    art = base.copy()
    tg = training_graph(art)
    changes, frozen = prune(tg, list(skip))
    art.training = tg.to_onnx()
    art.checkpoint = freeze_in_checkpoint(art.checkpoint, frozen)
    return art, changes


@dataclass(frozen=True)
class SkipOptions(Options):
    layers: list | None = option(
        None,
        "layers to skip (names as `accelc inspect` prints); without it the graph is "
        "instrumented and the runtime controller decides per epoch",
        name_list,
        flag="--skip-layers",
    )
    rule: str = option(
        "freezeout",
        "how layers are chosen: freezeout (FreezeOut: layers freeze input side first at fixed "
        "fractions of the run's epochs, each layer's learning rate annealed to zero first; decided "
        "at every step; the default, measured best on validation: docs/methods/skip.md) or lars (the "
        "paper: a layer whose LARS variable λ passes the threshold at an epoch's end is skipped from "
        "the next epoch)",
        choice(*RULES),
        flag="--skip-rule",
    )
    t0: float = option(
        0.6,
        "freezeout: the fraction of the run at which the first layer freezes (the others follow "
        "up to the end of the run, --skip-spacing)",
        part,
        flag="--skip-t0",
    )
    spacing: str = option(
        "cubic",
        "freezeout: the freeze times of the layers after the first, linear or cubic in the "
        "layer's index (cubic freezes more of the network earlier)",
        choice("linear", "cubic"),
        flag="--skip-spacing",
    )
    scale_lr: bool = option(
        False,
        "freezeout: start each layer's learning rate at 1/t_i of the run's (FreezeOut's "
        "compensation for a layer that trains for a fraction t_i of the run)",
        boolean,
        flag="--skip-scale-lr",
    )
    after_resize: str = option(
        "schedule",
        "freezeout, composed with a pass that trains below the full input size first on a fixed schedule "
        "(rescale's ramp or fixed switch; f: the fraction of the run from which it trains at full size): "
        "schedule runs FreezeOut's whole schedule within the full-size part (t_i becomes f + (1 - f) × t_i "
        "and each layer's rate is annealed from f on, at the run's rate before); freeze moves only the "
        "freeze times (the rate annealed from the start); off keeps FreezeOut's own times",
        choice("schedule", "freeze", "off"),
        flag="--skip-after-resize",
    )
    veto: str = option(
        "off",
        "freezeout: keep a layer training while it still moves. drift: at each epoch's end, a layer "
        "due to freeze within the next epoch whose weights drifted more than --skip-veto-drift over "
        "the epoch (‖Δw‖ / (√n × the learning rate its steps applied): about 1 while its steps add "
        "up, towards 0 while they cancel) freezes one epoch later, the layers after it with it",
        choice("off", "drift"),
        flag="--skip-veto",
    )
    veto_drift: float = option(
        0.075,
        "freezeout with --skip-veto drift: the drift over an epoch above which a layer still learns "
        "(0.075 told the zoo ResNet's stem from the zoo VGG's first conv at 50% of an 8-epoch run)",
        positive_float,
        flag="--skip-veto-drift",
    )
    cache: bool = option(
        True,
        "cache the frozen prefix's output (Egeria): once an input-side prefix is frozen, its output on "
        "every training image is computed once with the evaluation graph (BatchNorm on running "
        "statistics) and the step starts from it, so the prefix's forward leaves the step too",
        boolean,
        flag="--skip-cache",
    )
    cache_mb: float = option(
        4096.0,
        "the most memory (MiB) the cached activations may take; a prefix whose output needs more keeps its forward",
        positive_float,
        flag="--skip-cache-mb",
    )
    cache_min_epochs: float = option(
        1.5,
        "move the cache deeper only while at least this many epochs of the budget remain (computing it "
        "costs about one epoch of the layers it adds; each later epoch saves as much)",
        positive_float,
        flag="--skip-cache-min-epochs",
    )
    cache_min_intensity: float = option(
        32.0,
        "cache a tensor only if the forward that computes it costs at least this many FLOPs (cost "
        "model) per byte of it per image; below, storing and re-reading it costs about what computing "
        "it does (the zoo VGG's first conv, ~6 FLOP/byte, saved 2 ms/step and took 4.8 s to cache)",
        positive_float,
        flag="--skip-cache-min-intensity",
    )
    eta: float = option(0.001, "LARS η (trust coefficient)", positive_float, flag="--skip-eta")
    beta: float = option(1e-4, "LARS β (weight-decay term in the denominator)", positive_float, flag="--skip-beta")
    tau_mode: str = option(
        "relative",
        "threshold rule: relative (λ > factor × the layer's first-epoch λ), absolute (λ > tau) or "
        "growth (λ's growth over the previous epoch has flattened: λ_e / λ_{e-1} - 1 < tau)",
        choice(*TAU_MODES),
        flag="--skip-tau-mode",
    )
    tau: float = option(
        2.0,
        "the threshold: the factor (relative), the λ value (absolute) or the growth per epoch (growth)",
        positive_float,
        flag="--skip-tau",
    )
    policy: str = option(
        "prefix",
        "prefix: skip the longest input-side prefix of done layers (lets the backward "
        "stop early); suffix: the longest output-side suffix; any: every done layer",
        choice(*POLICIES),
        flag="--skip-policy",
    )
    every: int = option(1, "take λ every k steps", int_at_least(0), flag="--skip-every")
    aggregate: str = option("mean", "per-epoch λ: mean or last", choice("mean", "last"), flag="--skip-aggregate")
    min_epochs: int = option(1, "epochs before the first decision", int_at_least(0), flag="--skip-min-epochs")
    keep_last: int = option(1, "trainable layers always kept (output side)", int_at_least(0), flag="--skip-keep-last")


class SkipPass(Pass):
    def run(self, art: Artifacts, options: SkipOptions) -> PassResult:
        layers = options.layers
        if layers:
            new, changes = skip_variant(art, layers)
            return PassResult(new, True, changes)
        tg = training_graph(art)
        if options.rule == "freezeout":  # a schedule of the budget: nothing to measure in the graph
            changes = freeze_plan(tg, options)
        else:
            changes = instrument(tg)
            art.training = tg.to_onnx()
        art.plan.append(self.method.plan_entry(options))
        if art.is_stage:  # the savings are reported for the root's layers only
            return PassResult(art, bool(changes), changes)
        # what the controller's decisions would save: per layer, the skip set that takes it in
        layers = [c["layer"] for c in changes]
        policy = "prefix" if options.rule == "freezeout" else options.policy
        saved = skip_savings(art, layers, policy, options.keep_last, tg)
        for c in changes:
            if c["layer"] in saved:
                c["saves_flops_per_step"] = saved[c["layer"]]
        return PassResult(art, bool(changes), changes)

    @classmethod
    def explain(cls, record: dict, plan: list | None = None) -> list[str]:
        """A fixed skip set: what was removed. Instrumented: that the controller decides at run
        time, by which rule, and what skipping would save per step, layer by layer."""
        opts = record.get("options") if isinstance(record.get("options"), dict) else {}
        changes = record.get("changes") if isinstance(record.get("changes"), list) else []
        changes = [c for c in changes if isinstance(c, dict)]
        if opts.get("rule") == "freezeout" and not opts.get("layers"):
            return explain_freezeout(opts, changes)
        if opts.get("layers") or not any(str(c.get("summary", "")).endswith("LARS norms exposed") for c in changes):
            return super().explain(record, plan)
        layers = [c for c in changes if c.get("layer")]
        rule = rule_text(opts.get("tau_mode"), opts.get("tau"))
        out = [
            f"instrumented {len(layers)} layers with their LARS norms; nothing is skipped yet: the controller "
            f"decides at run time, at each epoch end from epoch {opts.get('min_epochs', 1)} on ({rule}, "
            f"{opts.get('policy')} policy, the last {opts.get('keep_last')} layer(s) always trained)"
        ]
        saved = [
            (show(str(c.get("layer")), 60), c["saves_flops_per_step"])
            for c in changes
            if isinstance(c.get("saves_flops_per_step"), (int, float))
        ]
        if saved:
            what = {"prefix": "skipping up to", "suffix": "skipping from", "any": "skipping"}.get(
                str(opts.get("policy")), "skipping"
            )
            out.append(f"{what} a layer would save per step: " + ", ".join(f"{n} {gflops(f)}" for n, f in saved))
        return out

    def ensures(self, before: Artifacts, after: Artifacts, options: SkipOptions) -> str | None:
        """Instrumented (the controller decides at run time): the graph is the unrewritten one plus
        the LARS norms, checked node by node (exact, no session). Layers pruned: the remaining
        gradients equal the unpruned graph's on one batch (same weights)."""
        if not options.layers:
            same = only_norms_added(before.training, after.training)
            if same:
                return same
        from ...runtime.session import TrainingSession  # heavy: torch and ORT, loaded when the check runs

        rng = np.random.default_rng(0)
        shape = before.info.input_shape
        x = rng.standard_normal((4, *shape)).astype(np.float32)
        y = rng.integers(0, before.info.num_classes, 4).astype(np.int64)
        # random ops (active dropout) seeded alike in both graphs: the same masks on both sides
        la, ga, _ = TrainingSession(seeded(before)).compute_gradients(x, y)
        lb, gb, _ = TrainingSession(seeded(after)).compute_gradients(x, y)
        worst = 0.0
        for k, v in gb.items():
            d = float(np.linalg.norm(v - ga[k]))
            if d > 1e-5 * float(np.linalg.norm(ga[k])) + 1e-7:
                raise AccelcError(f"skip self-check failed: gradient of '{k}' changed by pruning ({d:.3g})")
            worst = max(worst, d)
        if abs(la - lb) > 1e-6 * max(1.0, abs(la)):
            raise AccelcError(f"skip self-check failed: loss changed ({la} vs {lb})")
        return f"loss and {len(gb)} remaining gradients equal the unpruned graph's (max abs diff {worst:.2g})"
