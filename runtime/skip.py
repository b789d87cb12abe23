"""The LARS skip controller (runtime half of the ``skip`` pass).

Every ``every`` steps it reads the per-layer norms the instrumented graph outputs and forms the
LARS variable λ = η‖w‖/(‖∇w‖ + β‖w‖); at each epoch end it aggregates λ (mean or last), judges a
layer done when λ passes the threshold τ (absolute, or relative: τ × the layer's own first-epoch
λ), picks the skip set by policy (default: the longest input-side prefix of done layers, which
lets the backward stop early), never un-skips a layer, and swaps in the pruned variant, built by
the skip pass and cached per skip set. It accounts the operations and bytes of every epoch from
the cost model, for the run's op and bandwidth reduction.
"""
from __future__ import annotations

import numpy as np

from ..compiler.compile import training_graph
from ..compiler.cost import graph_costs
from .controllers import Controller, Variant


class LarsSkipController(Controller):
    name = "skip"

    def __init__(self, base, options: dict):
        super().__init__()
        from ..passes.skip import _lars_outputs
        self.base = base
        self.opts = dict(options)
        tg = training_graph(base)
        self.layers = [l.name for l in tg.layers if l.weight in tg.params]
        self.keys = {l: _lars_outputs(tg, l) for l in self.layers}
        self.optimizer = base.config.get("optimizer", "adamw")
        self.base_cost = self._cost_of(tg)
        self.skipped: list[str] = []
        self.first: dict[str, float] = {}
        self.lambdas: list[dict] = []  # per epoch {layer: λ}
        self.accounting: list[dict] = []
        self._sum: dict[str, float] = {}
        self._n: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self._cache: dict = {}
        self._costs: dict = {(): self.base_cost}

    def _cost_of(self, tg) -> dict:
        c = graph_costs(tg, self.optimizer)
        return {"flops": c["total"]["flops"], "bytes": c["total"]["bytes"],
                **{f"{k}_flops": v["flops"] for k, v in c["phases"].items()},
                **{f"{k}_bytes": v["bytes"] for k, v in c["phases"].items()}}

    # ------------------------------------------------------------------ λ
    @staticmethod
    def lars(w_norm: float, g_norm: float, eta: float, beta: float) -> float:
        return eta * w_norm / (g_norm + beta * w_norm)

    def on_step(self, trainer, step, loss):
        every = max(1, int(self.opts.get("every", 1)))
        if step % every:
            return
        extras = getattr(trainer.engine, "extras", {})
        for layer in self.layers:
            if layer in self.skipped:
                continue
            wk, gk = self.keys[layer]
            if wk in extras and gk in extras:
                lam = self.lars(extras[wk], extras[gk], self.opts["eta"], self.opts["beta"])
                self._sum[layer] = self._sum.get(layer, 0.0) + lam
                self._n[layer] = self._n.get(layer, 0) + 1
                self._last[layer] = lam

    # ------------------------------------------------------------------ decisions
    def done_layers(self, lam: dict) -> list[str]:
        tau = self.opts["tau"]
        if self.opts.get("tau_mode", "relative") == "absolute":
            return [l for l, v in lam.items() if v > tau]
        return [l for l, v in lam.items() if l in self.first and v > tau * self.first[l]]

    def choose(self, done: list[str]) -> list[str]:
        """The new skip set (monotone) from the done layers, by policy."""
        policy = self.opts.get("policy", "prefix")
        keep = int(self.opts.get("keep_last", 1))
        order = self.layers
        ok = set(done) | set(self.skipped)
        if policy == "prefix":
            limit = len(order) - keep
            chosen = []
            for l in order[:max(limit, 0)]:
                if l not in ok:
                    break
                chosen.append(l)
        elif policy == "suffix":
            chosen = []
            for l in reversed(order[1:]):
                if l not in ok:
                    break
                chosen.insert(0, l)
        else:
            protected = set(order[len(order) - keep:]) if keep else set()
            chosen = [l for l in order if l in ok and l not in protected]
        return [l for l in order if l in set(chosen) | set(self.skipped)]

    def variant(self, skip: list[str]) -> Variant:
        from ..passes.skip import skip_variant
        key = tuple(skip)
        if self.composer is not None:
            art = self.composer.artifacts()
            if key not in self._costs:
                self._costs[key] = self._cost_of(training_graph(art))
            return Variant(name=self.composer.describe(), artifacts=art, info={"skipped": list(skip)})
        if key not in self._cache:
            art, _ = skip_variant(self.base, skip)
            self._cache[key] = art
            self._costs[key] = self._cost_of(training_graph(art))
        return Variant(name="skip:" + ",".join(skip), artifacts=self._cache[key], info={"skipped": list(skip)})

    def on_train_start(self, trainer):
        return self.variant(self.skipped) if self.skipped else None

    def on_epoch_end(self, epoch, metrics, trainer):
        key = tuple(self.skipped)
        if key not in self._costs:
            self.variant(self.skipped)
        cost = self._costs[key]
        steps = metrics["steps"]
        self.accounting.append({"epoch": epoch, "skipped": list(self.skipped), "steps": steps,
                                "flops_per_step": cost["flops"], "bytes_per_step": cost["bytes"],
                                "base_flops_per_step": self.base_cost["flops"],
                                "base_bytes_per_step": self.base_cost["bytes"],
                                "ms_per_step": 1000 * metrics["train_seconds"] / max(steps, 1)})
        agg = self.opts.get("aggregate", "mean")
        lam = {l: (self._sum[l] / self._n[l] if agg == "mean" else self._last[l]) for l in self._n}
        self.lambdas.append({"epoch": epoch, **lam})
        if not self.first:
            self.first = dict(lam)
        self._sum, self._n, self._last = {}, {}, {}
        metrics["skip"] = {"skipped": list(self.skipped), "lambda": lam}
        if epoch < int(self.opts.get("min_epochs", 1)) or not lam:
            return None
        done = self.done_layers(lam)
        new = self.choose(done)
        if new == self.skipped:
            if done:
                self.decide(epoch, "keep", f"done layers {done} do not extend the {self.opts.get('policy')} "
                            f"skip set", lam=lam, done=done)
            return None
        added = [l for l in new if l not in self.skipped]
        rule = (f"λ > {self.opts['tau']}" if self.opts.get("tau_mode") == "absolute"
                else f"λ > {self.opts['tau']} × first-epoch λ")
        self.decide(epoch, "skip", f"{', '.join(added)} done ({rule}); skipping {', '.join(new)} from epoch "
                    f"{epoch + 1}", lam={l: lam.get(l) for l in added},
                    first={l: self.first.get(l) for l in added}, skipped=new)
        self.skipped = new
        return self.variant(new)

    # ------------------------------------------------------------------ reporting and state
    def report(self) -> dict:
        a = self.accounting
        if not a:
            return {}
        ops = sum(e["steps"] * e["flops_per_step"] for e in a)
        ops0 = sum(e["steps"] * e["base_flops_per_step"] for e in a)
        by = sum(e["steps"] * e["bytes_per_step"] for e in a)
        by0 = sum(e["steps"] * e["base_bytes_per_step"] for e in a)
        return {"op_reduction": 1 - ops / ops0, "bandwidth_reduction": 1 - by / by0, "epochs": a,
                "lambdas": self.lambdas, "final_skip_set": list(self.skipped)}

    def state(self) -> dict:
        return {"log": self.log, "skipped": self.skipped, "first": self.first, "lambdas": self.lambdas,
                "accounting": self.accounting}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.skipped = list(state.get("skipped", []))
        self.first = dict(state.get("first", {}))
        self.lambdas = list(state.get("lambdas", []))
        self.accounting = list(state.get("accounting", []))


def numpy_lars(w: np.ndarray, g: np.ndarray, eta: float, beta: float) -> float:
    """Reference λ from arrays (used by tests and as documentation of the formula)."""
    wn, gn = float(np.linalg.norm(w)), float(np.linalg.norm(g))
    return eta * wn / (gn + beta * wn)
