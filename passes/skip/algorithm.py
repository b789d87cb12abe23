"""The LARS skip algorithm (run-time half of the ``skip`` pass).

Every ``every`` steps it reads the per-layer norms the instrumented graph outputs (the step's
probes) and forms the LARS variable λ = η‖w‖/(‖∇w‖ + β‖w‖); at each epoch end it aggregates λ
(mean or last), judges a layer done when λ passes the threshold τ (absolute; relative: τ × the
layer's own first-epoch λ; or growth: λ's rise over the previous epoch fell under τ), picks the skip set by policy (default: the longest input-side prefix
of done layers, which lets the backward stop early) and never un-skips a layer. Its transform
prunes the skip set from the artifacts it is given (:func:`~accelc.passes.skip.rewrite.skip_variant`).
It accounts the operations and bytes of every epoch from the cost model, for the run's op and
bandwidth reduction.
"""

from __future__ import annotations

from ...compiler.cost import graph_costs
from ...compiler.graph import training_graph
from ...runtime.algorithm import Algorithm
from .rewrite import SkipOptions, lars_outputs, rule_text, skip_variant


def lars(w_norm: float, g_norm: float, eta: float, beta: float) -> float:
    """The LARS local rate λ = η‖w‖/(‖∇w‖ + β‖w‖)."""
    return eta * w_norm / (g_norm + beta * w_norm)


class LarsSkip(Algorithm):
    options: SkipOptions

    def __init__(self, root, spec: dict):
        super().__init__(root, spec)
        tg = training_graph(root)
        self.layers = [layer.name for layer in tg.layers if layer.weight in tg.params]
        self.weights = {layer.name: layer.weight for layer in tg.layers if layer.weight in tg.params}
        self.keys = {name: lars_outputs(name) for name in self.layers}
        self.optimizer = root.config.get("optimizer", "adamw")
        self.base_cost = self._cost_of(tg)
        self.skipped: list[str] = []
        self.first: dict[str, float] = {}
        self.lambdas: list[dict] = []  # per epoch {layer: λ}
        self.accounting: list[dict] = []
        self._sum: dict[str, float] = {}
        self._n: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self._costs: dict = {}

    def _cost_of(self, tg) -> dict:
        c = graph_costs(tg, self.optimizer)
        return {
            "flops": c["total"]["flops"],
            "bytes": c["total"]["bytes"],
            **{f"{k}_flops": v["flops"] for k, v in c["phases"].items()},
            **{f"{k}_bytes": v["bytes"] for k, v in c["phases"].items()},
        }

    # ------------------------------------------------------------------ λ
    lars = staticmethod(lars)

    def on_step(self, state, step, result):
        every = max(1, self.options.every)
        if step % every:
            return
        probes = result.probes
        # data-parallel: ‖∇w‖ of the all-reduced gradient (what the step applies), not the mean of
        # the ranks' own norms the graph's probes give
        engine = state.engine
        reduced = engine.world_size > 1
        for layer in self.layers:
            if layer in self.skipped:
                continue
            wk, gk = self.keys[layer]
            if wk in probes and gk in probes:
                g = engine.gradient_norm(self.weights[layer]) if reduced else None
                lam = lars(probes[wk], probes[gk] if g is None else g, self.options.eta, self.options.beta)
                self._sum[layer] = self._sum.get(layer, 0.0) + lam
                self._n[layer] = self._n.get(layer, 0) + 1
                self._last[layer] = lam

    # ------------------------------------------------------------------ decisions
    def done_layers(self, lam: dict) -> list[str]:
        tau = self.options.tau
        mode = self.options.tau_mode
        if mode == "absolute":
            return [name for name, v in lam.items() if v > tau]
        if mode == "growth":  # λ rises while a layer still learns fast; its growth flattening = done
            prev = self.lambdas[-2] if len(self.lambdas) >= 2 else {}
            return [name for name, v in lam.items() if prev.get(name) and v / prev[name] - 1 < tau]
        return [name for name, v in lam.items() if name in self.first and v > tau * self.first[name]]

    def choose(self, done: list[str]) -> list[str]:
        """The new skip set (monotone) from the done layers, by policy."""
        policy = self.options.policy
        keep = self.options.keep_last
        order = self.layers
        ok = set(done) | set(self.skipped)
        chosen: list[str] = []
        if policy == "prefix":
            for name in order[: max(len(order) - keep, 0)]:
                if name not in ok:
                    break
                chosen.append(name)
        elif policy == "suffix":
            for name in reversed(order[1:]):
                if name not in ok:
                    break
                chosen.insert(0, name)
        else:
            protected = set(order[len(order) - keep :]) if keep else set()
            chosen = [name for name in order if name in ok and name not in protected]
        return [name for name in order if name in set(chosen) | set(self.skipped)]

    def decision(self):
        return tuple(self.skipped)

    def transform(self, art):
        if not self.skipped:
            return art
        return skip_variant(art, self.skipped)[0]

    def describe(self) -> str:
        return "skip:" + ",".join(self.skipped) if self.skipped else ""

    def on_epoch_end(self, state, epoch, metrics):
        key = tuple(self.skipped)
        if key not in self._costs:  # the cost of what ran (the engine's current artifacts)
            self._costs[key] = self._cost_of(training_graph(state.engine.artifacts))
        cost = self._costs[key]
        steps = metrics["steps"]
        self.accounting.append(
            {
                "epoch": epoch,
                "skipped": list(self.skipped),
                "steps": steps,
                "flops_per_step": cost["flops"],
                "bytes_per_step": cost["bytes"],
                "base_flops_per_step": self.base_cost["flops"],
                "base_bytes_per_step": self.base_cost["bytes"],
                "ms_per_step": 1000 * metrics["train_seconds"] / max(steps, 1),
            }
        )
        agg = self.options.aggregate
        lam = {name: (self._sum[name] / self._n[name] if agg == "mean" else self._last[name]) for name in self._n}
        self.lambdas.append({"epoch": epoch, **lam})
        if not self.first:
            self.first = dict(lam)
        self._sum, self._n, self._last = {}, {}, {}
        self.logger.log_metrics({"skip": {"skipped": list(self.skipped), "lambda": lam}})
        if epoch < self.options.min_epochs or not lam:
            return
        done = self.done_layers(lam)
        new = self.choose(done)
        if new == self.skipped:
            if done:
                self.decide(
                    epoch,
                    "keep",
                    f"done layers {done} do not extend the {self.options.policy} skip set",
                    lam=lam,
                    done=done,
                )
            return
        added = [name for name in new if name not in self.skipped]
        rule = rule_text(self.options.tau_mode, self.options.tau)
        self.decide(
            epoch,
            "skip",
            f"{', '.join(added)} done ({rule}); skipping {', '.join(new)} from epoch {epoch + 1}",
            lam={name: lam.get(name) for name in added},
            first={name: self.first.get(name) for name in added},
            skipped=new,
        )
        self.skipped = new

    # ------------------------------------------------------------------ reporting and state
    def report(self) -> dict:
        a = self.accounting
        if not a:
            return {}
        ops = sum(e["steps"] * e["flops_per_step"] for e in a)
        ops0 = sum(e["steps"] * e["base_flops_per_step"] for e in a)
        by = sum(e["steps"] * e["bytes_per_step"] for e in a)
        by0 = sum(e["steps"] * e["base_bytes_per_step"] for e in a)
        return {
            "op_reduction": 1 - ops / ops0,
            "bandwidth_reduction": 1 - by / by0,
            "epochs": a,
            "lambdas": self.lambdas,
            "final_skip_set": list(self.skipped),
        }

    def state_dict(self) -> dict:
        return {
            "log": self.log,
            "skipped": self.skipped,
            "first": self.first,
            "lambdas": self.lambdas,
            "accounting": self.accounting,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.skipped = list(state.get("skipped", []))
        self.first = dict(state.get("first", {}))
        self.lambdas = list(state.get("lambdas", []))
        self.accounting = list(state.get("accounting", []))
