"""The skip algorithm (run-time half of the ``skip`` pass), by one of two rules.

``freezeout`` (:mod:`.freezeout`): before every step it freezes the layers whose time in the
run's budget has come (an input-side prefix that grows) and gives the optimizer each unfrozen
layer's learning-rate multiple (a cosine that reaches zero at the layer's freeze time); it times
the steps of each frozen prefix.

``lars``: every ``every`` steps it reads the per-layer norms the instrumented graph outputs (the step's
probes) and forms the LARS variable λ = η‖w‖/(‖∇w‖ + β‖w‖); at each epoch end it aggregates λ
(mean or last), judges a layer done when λ passes the threshold τ (absolute; relative: τ × the
layer's own first-epoch λ; or growth: λ's rise over the previous epoch fell under τ), picks the skip set by policy (default: the longest input-side prefix
of done layers, which lets the backward stop early) and never un-skips a layer. Its transform
prunes the skip set from the artifacts it is given (:func:`~accelc.passes.skip.rewrite.skip_variant`).
It accounts the operations and bytes of every epoch from the cost model, for the run's op and
bandwidth reduction.
"""

from __future__ import annotations

import math
import time

from ...compiler.cost import graph_costs
from ...compiler.errors import AccelcError
from ...compiler.graph import training_graph
from ...runtime.algorithm import Algorithm
from .cache import cut_variant, find_cut, intensity, prefix_model
from .freezeout import angle, drift, freeze_times, lr_multiplier, postponed
from .rewrite import SkipOptions, lars_outputs, layer_groups, prune, rule_text, skip_variant, trainable_layers


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
        self._ran: dict[tuple, int] = {}  # skip set -> steps run with it in the current epoch
        self._arts: dict[tuple, object] = {}  # skip set -> its artifacts, until its cost is known
        # freezeout: the schedule (layer -> fraction of the run at which it freezes), the parameters
        # each layer's learning-rate scale covers, and the measured time per step of each skip set
        self.freeze_at: dict[str, float] = {}
        self._resumed = False  # the schedule came from a checkpoint (after any move and veto)
        self._anneal_from = 0.0  # where each layer's rate starts its cosine (after_resize schedule: f)
        self.frozen_at: dict[str, dict] = {}  # layer -> {"step", "progress"} when it froze
        self.step_time: dict[str, list] = {}  # skip set (joined) -> [steps timed, seconds]
        self._tick: tuple | None = None  # (skip set, perf_counter) of the previous step's start
        # the frozen prefix's cache: the tensor the variant trains from (None: the images), the
        # cuts found per skip set, the activations computed ((tensor, image shape), array) and the
        # record of every cache step (where, what it holds, what computing it cost)
        self.cut: str | None = None
        self._cuts: dict[tuple, str | None] = {}
        self._feat: tuple | None = None
        self.cache_log: list[dict] = []
        if self.options.rule == "freezeout":
            self.layers = trainable_layers(tg)
            times = freeze_times(len(self.layers), self.options.t0, self.options.spacing, self.options.keep_last)
            self.freeze_at = dict(zip(self.layers, times))
            groups = layer_groups(tg)
            self.params_of = {name: [p for p in groups[name] if p in tg.params] for name in self.layers}
        # freezeout: each training layer's motion over every epoch (its weight's drift and angle,
        # :mod:`.freezeout`), from the weight at the epoch's first step and the learning rate its
        # steps applied since; what the veto reads
        self.motion: list[dict] = []
        self._w0: dict | None = None
        self._lr_sum: dict[str, float] = {}

    def on_train_start(self, state) -> None:
        """freezeout with ``after_resize``: the schedule moved after the run's smaller input sizes
        (the times once: a resumed run's come from its checkpoint, already moved)."""
        f, mode = state.full_size_from, self.options.after_resize
        if self.options.rule != "freezeout" or mode == "off" or not 0.0 < f < 1.0:
            return
        if mode == "schedule":
            self._anneal_from = f
        if self._resumed:
            return
        self.freeze_at = {n: (t if t >= 1.0 else f + (1.0 - f) * t) for n, t in self.freeze_at.items()}
        first = min(self.freeze_at.values(), default=1.0)
        rate = (
            "each layer's rate annealed from there"
            if mode == "schedule"
            else "each layer's rate annealed from the start"
        )
        self.decide(
            0,
            "after-resize",
            f"the run trains at full input size from {f:.1%} of the budget on: the freeze schedule starts "
            f"there (t_i = {f:.3g} + {1 - f:.3g} × t_i; the first layer freezes at {first:.1%}; {rate}; "
            "--skip-after-resize off keeps FreezeOut's own times)",
            full_size_from=f,
            mode=mode,
            freeze_at=dict(self.freeze_at),
        )

    def _rate(self, t: float, name: str) -> float:
        return lr_multiplier(t, self.freeze_at[name], self.options.scale_lr, self._anneal_from)

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

    # ------------------------------------------------------------------ freezeout
    def _key(self) -> tuple:
        """What the engine runs: the skip set and the tensor the step starts from."""
        return (*self.skipped, *((f"[cached {self.cut}]",) if self.cut else ()))

    def before_step(self, state, epoch, step):
        key = self._key()  # what the engine runs now: costed at the epoch's end, off the clock
        if key not in self._costs and key not in self._arts:
            self._arts[key] = state.engine.artifacts
        self._time_step(key, step)
        if self.options.rule != "freezeout":
            self._ran[key] = self._ran.get(key, 0) + 1
            return
        t = state.progress
        if self._w0 is None:  # the epoch's first step: the weights its motion is measured from
            self._start_window(state)
        new = [name for name in self.layers if self.freeze_at[name] <= t]
        if new != self.skipped:  # an input-side prefix, growing: t_i grows with the layer's index
            added = [name for name in new if name not in self.skipped]
            for name in added:
                self.frozen_at[name] = {"step": state.step, "progress": t}
            self.decide(
                epoch,
                "freeze",
                f"{', '.join(added)} frozen at step {state.step} ({t:.1%} of the run; learning rate annealed "
                f"to 0): skipping {', '.join(new)} from this step",
                step=state.step,
                progress=t,
                skipped=new,
            )
            self.skipped = new
            self._update_cut(state, epoch)
        for name in self._lr_sum:  # the rate this step applies to each layer (0 once frozen)
            self._lr_sum[name] += state.lr * self._rate(t, name)
        key = self._key()
        self._ran[key] = self._ran.get(key, 0) + 1

    def _weight(self, name: str) -> str:
        return self.weights.get(name) or self.params_of[name][0]

    def _start_window(self, state) -> None:
        arrays = state.engine.param_arrays()
        live = [n for n in self.layers if n not in self.skipped and self._weight(n) in arrays]
        self._w0 = {n: arrays[self._weight(n)] for n in live}  # copies (Engine.param_arrays)
        self._lr_sum = dict.fromkeys(live, 0.0)

    def _end_window(self, state, epoch: int) -> None:
        """The epoch's motion of every layer that trained in it, and the veto on the layers due to
        freeze within the next epoch."""
        if self._w0 is None:
            return
        arrays = state.engine.param_arrays()
        d, a = {}, {}
        for name, w0 in self._w0.items():
            w1 = arrays.get(self._weight(name))
            v = drift(w0, w1, self._lr_sum[name]) if w1 is not None else None
            if v is not None:
                d[name], a[name] = v, angle(w0, w1)
        self._w0, self._lr_sum = None, {}
        total = state.epochs * state.steps_per_epoch
        end = (state.step + 1) / total if total else 1.0
        self.motion.append({"epoch": epoch, "progress": end, "drift": d, "angle": a})
        o = self.options
        if o.veto != "drift" or end >= 1.0:
            return
        within = end + 1.0 / state.epochs
        times = [self.freeze_at[n] for n in self.layers]
        for i, name in enumerate(self.layers):
            if name in self.skipped or times[i] >= within:
                continue
            if d.get(name, 0.0) > o.veto_drift:
                was = times[i]
                self.freeze_at = dict(zip(self.layers, postponed(times, i, 1.0 / state.epochs)))
                now = self.freeze_at[name]
                later = "never frozen" if now >= 1.0 else f"frozen at {now:.1%} of the run"
                self.decide(
                    epoch,
                    "veto",
                    f"{name} still moves (drift {d[name]:.3f} over epoch {epoch} > --skip-veto-drift "
                    f"{o.veto_drift:g}): due to freeze at {was:.1%} of the run, now {later}, and the layers "
                    "after it one epoch later",
                    drift=d[name],
                    was=was,
                    freeze_at=now,
                )
                break

    def _time_step(self, key: tuple, step: int) -> None:
        """The wall time from the previous step's start to this one's, per skip set (the first step
        of an epoch and of a set are left out: a switch or an evaluation came before them)."""
        now = time.perf_counter()
        if self._tick is not None and self._tick[0] == key and step > 0:
            rec = self.step_time.setdefault(_joined(key), [0, 0.0])
            rec[0] += 1
            rec[1] += now - self._tick[1]
        self._tick = (key, now)

    def lr_scales(self, state):
        if self.options.rule != "freezeout":
            return None
        t = state.progress
        out = {}
        for name in self.layers:
            if name in self.skipped or self.freeze_at[name] >= 1.0:
                continue
            m = self._rate(t, name)
            for p in self.params_of[name]:
                out[p] = m
        return out

    def on_step(self, state, step, result):
        if self.options.rule == "freezeout":
            return
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
        return (tuple(self.skipped), self.cut)

    def transform(self, art):
        if not self.skipped:
            return art
        out = skip_variant(art, self.skipped)[0]
        return cut_variant(out, self.cut) if self.cut else out

    def describe(self) -> str:
        if not self.skipped:
            return ""
        return "skip:" + ",".join(self.skipped) + (f" cached:{self.cut}" if self.cut else "")

    # ------------------------------------------------------------------ the frozen prefix's cache
    def _update_cut(self, state, epoch: int) -> None:
        """After the skip set grew: move the cache to the deepest tensor the new frozen prefix
        allows, while enough of the budget remains for it to pay (computing it costs about one
        epoch of the layers it adds, each later epoch saves as much) and it fits the bound."""
        o = self.options
        if not o.cache or not self.skipped:
            return
        key = tuple(self.skipped)
        if key not in self._cuts:  # the pruned graph alone (its checkpoint is not needed here)
            tg = training_graph(self.root)
            prune(tg, list(key))
            self._cuts[key] = find_cut(tg.to_onnx(), self.root.eval, self.root.info.input_name, set(tg.params))
        t = self._cuts[key]
        left = (1.0 - state.progress) * state.epochs
        if t is None or t == self.cut or left < o.cache_min_epochs:
            return
        flop_per_byte = intensity(self.root, t)
        if flop_per_byte < o.cache_min_intensity:  # storing and re-reading it costs about what computing it does
            if not any(e.get("tensor") == t for e in self.cache_log):
                self.cache_log.append(
                    {"step": state.step, "tensor": t, "flop_per_byte": flop_per_byte, "skipped": True}
                )
                self.decide(
                    epoch,
                    "cache-skipped",
                    f"at step {state.step}: '{t}' is not cached: its prefix costs {flop_per_byte:.1f} FLOP per byte "
                    f"of its output, under --skip-cache-min-intensity {o.cache_min_intensity:g}",
                    step=state.step,
                    flop_per_byte=flop_per_byte,
                )
            return
        rows = len(state.train_images()) if state.train_images is not None else 0
        shape = self.root.info.shapes(1).get(t, ())
        mib = rows * math.prod(shape[1:]) * 4 / 2**20
        where = f"at step {state.step} ({state.progress:.1%} of the run, {left:.2f} epochs left)"
        if mib > o.cache_mb:
            if not any(e.get("tensor") == t and e.get("refused") for e in self.cache_log):
                self.cache_log.append({"step": state.step, "tensor": t, "mib": mib, "refused": True})
                # (its intensity passed: the memory bound alone refuses it)
                self.decide(
                    epoch,
                    "cache-refused",
                    f"{where}: caching '{t}' for {rows} images needs {mib:.0f} MiB > --skip-cache-mb "
                    f"{o.cache_mb}: the frozen prefix's forward stays in the step",
                    step=state.step,
                    mib=mib,
                )
            return
        self.decide(
            epoch,
            "cache",
            f"{where}: the frozen prefix's output '{t}' {list(shape[1:])} is computed once for the "
            f"{rows} training images ({mib:.0f} MiB, BatchNorm on running statistics) and the step "
            "starts from it",
            step=state.step,
            tensor=t,
            mib=mib,
            flop_per_byte=flop_per_byte,
        )
        self.cut = t

    def training_inputs(self, state):
        art, info = state.engine.artifacts, self.root.info
        t = art.train_input
        if t is None:
            return None
        images = state.train_images()
        key = (t, tuple(images.shape[1:]))
        if self._feat is not None and self._feat[0] == key:
            return self._feat[1]
        t0 = time.perf_counter()
        model, src, rows = None, "images", images
        if self._feat is not None and self._feat[0][1] == key[1]:  # on from the previous cut
            model = prefix_model(art.eval, info.input_name, self._feat[0][0], t, info.shapes(1))
            src, rows = self._feat[0][0], self._feat[1]
        if model is None:
            model, src, rows = prefix_model(art.eval, info.input_name, None, t, info.shapes(1)), "images", images
        if model is None:
            raise AccelcError(f"skip cache: the evaluation graph does not compute '{t}' from the images")
        self._feat = None  # the previous cut's activations go before the new ones are made
        feats = state.engine.infer(model, rows, t)
        self._feat = (key, feats)
        sec = time.perf_counter() - t0
        self.cache_log.append(
            {"step": state.step, "progress": state.progress, "tensor": t, "shape": list(feats.shape[1:]),
             "mib": feats.nbytes / 2**20, "seconds": sec, "from": src}
        )  # fmt: skip
        self._tick = None  # the step after it carries the computation: not a step's time
        return feats

    def on_epoch_end(self, state, epoch, metrics):
        key = self._key()
        if key not in self._costs:  # the cost of what ran (the engine's current artifacts)
            self._costs[key] = self._cost_of(training_graph(state.engine.artifacts))
        for k, art in self._arts.items():  # the sets the epoch ran before its last
            if k not in self._costs:
                self._costs[k] = self._cost_of(training_graph(art))
        self._arts = {}
        steps = metrics["steps"]
        ran = self._ran or {key: steps}  # steps per skip set (a run without step events: all the last)
        n = max(sum(ran.values()), 1)
        self.accounting.append(
            {
                "epoch": epoch,
                "skipped": list(self.skipped),
                "steps": steps,
                # per step, averaged over the skip sets the epoch's steps ran with
                "flops_per_step": sum(k * self._costs[s]["flops"] for s, k in ran.items()) / n,
                "bytes_per_step": sum(k * self._costs[s]["bytes"] for s, k in ran.items()) / n,
                "base_flops_per_step": self.base_cost["flops"],
                "base_bytes_per_step": self.base_cost["bytes"],
                "ms_per_step": 1000 * metrics["train_seconds"] / max(steps, 1),
                "steps_by_skip_set": {_joined(s): k for s, k in ran.items()},
            }
        )
        self._ran = {}
        self._tick = None
        if self.options.rule == "freezeout":
            self._end_window(state, epoch)
            self.logger.log_metrics({"skip": {"skipped": list(self.skipped)}})
            return
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
        self._update_cut(state, epoch)

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
            "rule": self.options.rule,
            **({"freeze_at": self.freeze_at, "frozen_at": self.frozen_at} if self.freeze_at else {}),
            **({"motion": self.motion} if self.motion else {}),
            # measured: mean ms per step with each skip set (first steps after a switch left out)
            "ms_per_step_by_skip_set": {k: 1000 * sec / cnt for k, (cnt, sec) in self.step_time.items() if cnt},
            "cache": self.cache_log,
            "cached_from": self.cut,
        }

    def state_dict(self) -> dict:
        return {
            "log": self.log,
            "skipped": self.skipped,
            "first": self.first,
            "lambdas": self.lambdas,
            "accounting": self.accounting,
            "frozen_at": self.frozen_at,
            "step_time": self.step_time,
            "cut": self.cut,
            "cache_log": self.cache_log,
            "freeze_at": self.freeze_at,
            "motion": self.motion,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.skipped = list(state.get("skipped", []))
        self.first = dict(state.get("first", {}))
        self.lambdas = list(state.get("lambdas", []))
        self.accounting = list(state.get("accounting", []))
        self.frozen_at = {
            str(k): {"step": int(v["step"]), "progress": float(v["progress"])}
            for k, v in _mapping(state, "frozen_at").items()
        }
        cut = state.get("cut")
        if cut is not None and not isinstance(cut, str):
            raise TypeError("cut")
        self.cut = cut
        log = state.get("cache_log", [])
        if not isinstance(log, list) or not all(isinstance(e, dict) for e in log):
            raise TypeError("cache_log")
        self.cache_log = list(log)
        if "freeze_at" in state and self.options.rule == "freezeout":  # the schedule as the veto left it
            at = _mapping(state, "freeze_at")
            if set(at) != set(self.layers):
                raise ValueError("freeze_at: not this model's layers")
            if any(isinstance(at[n], bool) or not isinstance(at[n], (int, float)) for n in self.layers):
                raise TypeError("freeze_at: times must be numbers")
            times = [float(at[n]) for n in self.layers]
            if not all(0.0 < t <= 1.0 for t in times) or times != sorted(times):
                raise ValueError("freeze_at: times must grow input side first, in (0, 1]")
            self.freeze_at = dict(zip(self.layers, times))
            self._resumed = True
        motion = state.get("motion", [])
        if not isinstance(motion, list) or not all(isinstance(e, dict) for e in motion):
            raise TypeError("motion")
        self.motion = list(motion)
        self.step_time = {}
        for k, (n, sec) in _mapping(state, "step_time").items():  # a file: checked, not trusted
            if isinstance(n, bool) or not isinstance(n, int) or n < 0 or not 0 <= float(sec) < float("inf"):
                raise ValueError("step_time")
            self.step_time[str(k)] = [n, float(sec)]


def _joined(key: tuple) -> str:
    return ",".join(key) or "(none)"


def _mapping(state: dict, key: str) -> dict:
    """``state[key]`` (default {}), which must be a JSON object."""
    v = state.get(key, {})
    if not isinstance(v, dict):
        raise TypeError(key)
    return v
