"""The run-time algorithm of adaptive deep reuse: the paper's three strategies, the choice of the
layers that reuse, and the reuse report.

Strategies (``plan.json`` → ``"type": "reuse"``, ``"strategy"``):

* ``fixed`` (a): one (L, H) for the whole run;
* ``lh`` (b): start at the first ``schedule`` setting (coarse: long sub-vectors, few hyperplanes)
  and step to the next, finer one whenever the loss plateaus;
* ``off`` (c): reuse on, then off (the exact ORT Conv/ConvGrad graph) at the first plateau.

A plateau: the epoch's loss fell by less than ``plateau`` (a fraction) against the previous
epoch, at least ``min_epochs`` epochs after the last switch. The loss is the validation loss when
the run holds a validation split (``--val-split`` in ``accelc bench``: what decides, evaluated
through the exact convs), else the epoch's mean training loss. Every switch is logged with its
reason, which names the loss.

Choice (``"choose"``): ``measured`` (default) times every compiled reuse layer at the start of
training on a real batch — reused with the runtime's kernels against the exact conv (the faster
of torch/oneDNN and ORT) — and keeps reuse only where ``reuse_ms < margin × exact_ms``; the other
layers run exact. After each ``lh`` refine the chosen layers are measured again at the new
setting. ``all``: every compiled layer reuses, nothing is measured. See :mod:`.choice` and
``docs/reuse-choice.md``. Data-parallel: rank 0 measures, every rank takes its choice.

BatchNorm after reuse (``"recalibrate"``: batches, 0 = off): before evaluating an epoch that
trained with reused convs, the BatchNorm running statistics are gathered again through the exact
convs (forward only, no parameter update), so the reported accuracy, the checkpoint and an
exported model have the statistics of the graph they run (see :meth:`Reuse.before_evaluate`).

Report, per layer and per epoch: the mean remain ratio (clusters / rows), the multiply-adds of the
layer (forward + weight gradient + input gradient) with reuse against the exact conv, the
measured milliseconds per step of the reused layer (the native nodes, forward and backward), the
measured milliseconds of ORT's own Conv + ConvGrad for the same layer shape (timed once, on
the first epoch's end, in a side session), and whether the layer was chosen and why.
"""

from __future__ import annotations

import time

import numpy as np

from ...compiler.errors import AccelcError
from ...runtime.algorithm import Algorithm
from . import choice as ch
from .choice import conv_layer_model  # noqa: F401  (re-exported: benchmarks/reuse_layer.py)
from .cost import bound_remain, cross_batch, expected_remain, modelled_macs
from .options import ReuseOptions, cross_batch_conflict
from .rewrite import (
    PASS,
    reuse_variant,
    reused_layers,
    strip,
)
from .spec import KERNEL_KEY, geom_from_config, layer_macs


def time_ort_conv_layer(cfg: dict, batch: int, repeats: int = 3) -> float:
    """Median ms of ORT's Conv + ConvGrad for one layer shape (random data, side session)."""
    import onnxruntime as ort  # heavy: loaded for the side measurement

    g = cfg["geom"]
    m = conv_layer_model(g["pads"], (g["kh"], g["kw"]), g["stride"], g["dilation"])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    hh, ww = cfg["in_hw"]
    x = rng.standard_normal((batch, g["C"], hh, ww), dtype=np.float32)
    w = rng.standard_normal((g["Co"], g["C"], g["kh"], g["kw"]), dtype=np.float32)
    ho, wo = geom_from_config(cfg).out_hw(hh, ww)
    feeds = {
        "X": x,
        "W": w,
        "B": np.zeros(g["Co"], np.float32),
        "dY": rng.standard_normal((batch, g["Co"], ho, wo), dtype=np.float32),
    }
    s.run(None, feeds)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        s.run(None, feeds)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1e3)


def _group(state):
    """The data-parallel group of the run (None when training alone)."""
    g = state.engine.collective
    return g if g is not None and int(g.world) > 1 else None


def _compact(rec: dict) -> dict:
    """A layer's choice record with only what a decision line's reader needs."""
    keys = (
        "chosen",
        "reuse_ms",
        "exact_ms",
        "exact_engine",
        "remain_ratio",
        "error",
        "failed",
        "ruled_out",
        "rule",
        "predicted_floor_ms",
        "predicted_reuse_ms",
        "predicted_exact_ms",
        "expected_remain_ratio",
    )
    return {k: rec[k] for k in keys if k in rec}


class Reuse(Algorithm):
    options: ReuseOptions

    def __init__(self, root, spec: dict, measure_original: bool = True, measurer=None):
        """``measurer(state, layers, settings) -> {layer: measurement}`` replaces the measurement
        of the layer choice (tests inject timings; see :func:`.choice.judge` for the fields)."""
        super().__init__(root, spec)
        o = self.options
        self.strategy = o.strategy
        self.schedule = [tuple(s) for s in o.schedule] or [(o.L, o.H)]
        self.configs = reused_layers(root.training)  # layer -> config at compile time
        self.choose, self.margin, self.prefilter = o.choose, o.margin, o.prefilter
        self.cross_batch = o.cross_batch
        why = cross_batch_conflict(self.cross_batch, self.strategy, o.H, self.schedule)
        if why:
            raise AccelcError(f"plan.json: the reuse controller's 'cross_batch' {why}")
        self.index = 0  # position in the schedule (lh)
        self.on = True
        self.last_switch = 0
        self.prev_loss = None
        self.measure_original = measure_original
        self.original_ms: dict = {}
        self.epochs: list[dict] = []
        self._stats: dict = {}
        # the layer choice: None = every compiled layer (choose=all, or not decided yet)
        self.chosen: list | None = None
        self.choice: dict = {}  # layer -> its latest measurement and verdict
        self.measurements: list[dict] = []  # every measurement: epoch, setting, chosen, layers
        self.choice_done = False
        self.measurer = measurer or self._measure
        self.measure_options = {"repeats": 5, "warmup": 1, "budget_s": 60.0}

    # ------------------------------------------------------------------ what it contributes
    def reusing(self) -> bool:
        """Whether any layer reuses now (on, and the choice left at least one layer)."""
        return self.on and (self.chosen is None or bool(self.chosen))

    def settings(self, art=None) -> dict:
        """Per-layer settings now, for ``art`` (e.g. a rescale stage: that stage's layer shapes);
        layers the choice left exact are absent."""
        if not self.reusing():
            return {}
        L, H = self.current()
        configs = self.configs if art is None or art is self.root else reused_layers(art.training)
        out = {}
        for layer, c in configs.items():
            if self.chosen is not None and layer not in self.chosen:
                continue
            K = c["geom"]["C"] * c["geom"]["kh"] * c["geom"]["kw"]
            out[layer] = {
                "L": int(min(L, K)),
                "H": int(H),
                "scope": c["scope"],
                "input_grad": c["input_grad"],
                "seed": c["seed"],
                "cross_batch": self.cross_batch,
            }
        return out

    def current(self) -> tuple:
        return tuple(self.schedule[self.index]) if self.strategy == "lh" else (self.options.L, self.options.H)

    def decision(self):
        if not self.reusing():
            return (False,)
        return (True, self.current(), None if self.chosen is None else tuple(self.chosen))

    def transform(self, art):
        want = self.settings(art)
        have = {
            k: dict({f: c[f] for f in ("L", "H", "scope", "input_grad", "seed")}, cross_batch=c.get("cross_batch", 0))
            for k, c in reused_layers(art.training).items()
        }
        return art if want == have else reuse_variant(art, want)

    def describe(self) -> str:
        if not self.reusing():
            return "reuse:off"
        name = "reuse:L{}H{}".format(*self.current())
        if self.chosen is not None and len(self.chosen) < len(self.configs):
            name += f"[{len(self.chosen)}/{len(self.configs)}]"
        return name

    # ------------------------------------------------------------------ the layer choice
    def on_train_start(self, state):
        if self.choose != "measured":
            return
        # a resumed run keeps the choice of its checkpoint (its variant was trained with it);
        # data-parallel, every rank still takes rank 0's (one broadcast on every rank, always)
        self._choose_shared(state, list(self.configs), 0, measure=not self.choice_done)

    def _choose_shared(self, state, layers: list, epoch: int, measure: bool = True) -> None:
        """Measure and choose; data-parallel, rank 0 measures and every rank takes its choice
        (every rank calls this at the same point: one broadcast each time)."""
        group = _group(state)
        if group is None:
            if measure:
                self._choose(state, layers, epoch)
            return
        payload = None
        if group.is_main:
            n = len(self.log)
            if measure:
                self._choose(state, layers, epoch)
            payload = {"choice": self._choice_state(), "decisions": self.log[n:]}
        got = group.broadcast_json(payload, "the reuse layer choice")
        if not group.is_main:
            self._load_choice(got["choice"])
            for rec in got["decisions"]:
                self.log.append(rec)
                if self.logger is not None:
                    self.logger.log_decision(rec)

    def _layer_settings(self, layers: list) -> dict:
        L, H = self.current()
        return {
            k: {
                "L": int(L),
                "H": int(H),
                "scope": self.configs[k]["scope"],
                "input_grad": self.configs[k]["input_grad"],
                "seed": self.configs[k]["seed"],
                "cross_batch": self.cross_batch,
            }
            for k in layers
            if k in self.configs
        }

    def _choose(self, state, layers: list, epoch: int) -> None:
        """Measure ``layers`` at the current setting and keep reuse on those that win."""
        self.choice_done = True
        L, H = self.current()
        layers = [k for k in self.configs if k in layers]
        ruled_out = self._ruled_out(state, layers)
        todo = [k for k in layers if k not in ruled_out]
        try:
            meas = self.measurer(state, todo, self._layer_settings(todo)) if todo else {}
        except ch.NotMeasurable as e:
            kept = "every compiled layer reuses" if self.chosen is None else "the chosen layers stay"
            self.decide(epoch, "choose", f"not measured ({e}); {kept}", chosen=self.chosen, L=L, H=H)
            return
        except Exception as e:  # a failed measurement never stops training: the layers stay exact
            reason = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            meas = {k: {"failed": reason} for k in todo}
        meas = {k: (ruled_out.get(k) or meas.get(k) or {"failed": "not measured"}) for k in layers}
        won, records = ch.judge(meas, self.margin)
        self.choice.update(records)
        self.chosen = [k for k in self.configs if k in won]
        self.measurements.append({"epoch": epoch, "setting": [L, H], "chosen": list(won), "layers": records})
        ok = next((r for r in records.values() if not r.get("failed") and not r.get("ruled_out")), None)
        note = ""
        if ok is not None:
            note = f" on a batch of {ok.get('batch')} ({ok.get('impl')} kernels"
            note += f", activations of the {ok['activations']})" if ok.get("activations") else ")"
        self.decide(
            epoch,
            "choose",
            ch.summary_line(records, won, self.margin, (L, H), note),
            chosen=list(self.chosen),
            L=L,
            H=H,
            layers={k: _compact(r) for k, r in records.items()},
        )

    def _ruled_out(self, state, layers: list) -> dict:
        """layer -> record of the layers the time model rules out before anything is measured
        (see :mod:`.predict`), by either of two rules:

        * ``floor``: reuse's time with no clusters at all (hashing, sums, gathers, the exact input
          gradient) is predicted at or over ``prefilter`` × margin × the exact conv's;
        * ``expected``: the predicted speed-up at the expected remain ratio (uniform codes, which
          overestimates the real one: a pessimistic prediction) is under 1 / (``prefilter`` ×
          margin), i.e. the layer would have to beat its prediction by the prefilter's factor.

        {} when the prefilter is off, on another device than the CPU, or without a profile."""
        factor = self.prefilter
        engine = state.engine
        device = engine.exec.device
        if not factor or device != "cpu" or not layers:
            return {}
        try:
            from . import predict  # heavy: torch and the native kernels (the probe)

            prof = predict.profile()
        except Exception:  # advice only: without a profile every layer is measured
            return {}
        art = engine.artifacts
        ran = reused_layers(art.training) if art is not None else {}
        batch = int(state.batch_size)
        group = _group(state)
        if group is not None:
            batch = max(batch // int(group.world), 1)  # every rank trains its shard
        settings = self._layer_settings(layers)
        out = {}
        for k in layers:
            cfg = dict(ran.get(k, self.configs[k]), L=settings[k]["L"], H=settings[k]["H"])
            cfg["L"] = int(min(cfg["L"], geom_from_config(cfg).K))
            r = expected_remain(cfg, batch)
            p = predict.predict_config(cfg, batch, r, (True, True, True), prof)
            rule = "floor" if predict.hopeless(p, self.margin, factor) else None
            if rule is None and p["speedup"] * factor * self.margin < 1.0:
                rule = "expected"
            if rule:
                out[k] = {
                    "ruled_out": True,
                    "rule": rule,
                    "predicted_floor_ms": p["floor_ms"],
                    "predicted_reuse_ms": p["reuse_ms"],
                    "predicted_exact_ms": p["exact_ms"],
                    "expected_remain_ratio": r,
                    "prefilter": factor,
                    "batch": batch,
                    "L": cfg["L"],
                    "H": cfg["H"],
                }
        return out

    def _measure(self, state, layers: list, settings: dict) -> dict:
        """The real measurement (see :mod:`.choice`) on the engine's current artifacts and a batch
        of the run's training data."""
        engine = state.engine
        art = engine.artifacts
        if art is None:
            raise ch.NotMeasurable("the engine runs no artifacts")
        cfg = engine.exec
        device = cfg.device
        if device != "cpu":
            raise ch.NotMeasurable(f"training on {device}; the measurement times CPU kernels")
        if getattr(state, "sample", None) is None:
            raise ch.NotMeasurable("no training batch to measure on")
        x, y = state.sample()
        impl = cfg.impl(PASS)
        if impl == "native":
            from . import native  # heavy: torch and the C build

            if not native.available():
                impl = "torch"
        return ch.measure_layers(
            art,
            engine.param_arrays(),
            np.asarray(x),
            np.asarray(y),
            settings,
            impl,
            getattr(cfg, "threads", None),
            **self.measure_options,
            margin=self.margin,
        )

    def _choice_state(self) -> dict:
        return {
            "chosen": self.chosen,
            "choice": self.choice,
            "measurements": self.measurements,
            "choice_done": self.choice_done,
        }

    def _load_choice(self, state: dict) -> None:
        chosen = state.get("chosen")
        if chosen is not None and not (isinstance(chosen, list) and all(isinstance(k, str) for k in chosen)):
            raise TypeError("reuse: 'chosen' must be a list of layer names or null")
        self.chosen = None if chosen is None else list(chosen)
        self.choice = dict(state.get("choice") or {})
        self.measurements = list(state.get("measurements") or [])
        # a checkpoint from before the choice existed trained every layer: keep it that way
        self.choice_done = bool(state.get("choice_done", True))

    def layer_choice(self, layer: str) -> dict:
        """Whether ``layer`` reuses under the choice, and why (the latest measurement's line)."""
        if self.chosen is None:
            why = "every compiled layer reuses (choose=all)" if self.choose == "all" else "not measured"
            return {"chosen": True, "why": why}
        rec = self.choice.get(layer, {})
        return {"chosen": layer in self.chosen, "why": rec.get("why", "")}

    # ------------------------------------------------------------------ events
    def on_step(self, state, step, result):
        for key, st in result.kernels.items():  # the reuse node kernels' statistics (node.py)
            if key.startswith(KERNEL_KEY):
                acc = self._stats.setdefault(
                    key[len(KERNEL_KEY) :], {"ms": 0.0, "calls": 0, "remain": 0.0, "kept": 0.0, "kept_calls": 0}
                )
                acc["ms"] += st.get("ms", 0.0)
                acc["calls"] += 1
                acc["remain"] += st.get("remain", 0.0)
                if "kept" in st:  # clusters kept across batches: the share of rows in kept clusters
                    acc["kept"] += st["kept"]
                    acc["kept_calls"] += 1

    def on_epoch_end(self, state, epoch, metrics):
        stats, self._stats = self._stats, {}
        batch = int(state.batch_size)
        steps = max(int(metrics.get("steps", 1)), 1)
        layers = {}
        settings = self.settings()
        # the variant that ran (a rescale stage has other shapes): its own layer geometry
        art = state.engine.artifacts
        ran = reused_layers(art.training) if art is not None else {}
        for layer, c0 in self.configs.items():
            c = ran.get(layer, c0)
            f = stats.get(f"{layer}|forward", {})
            b = stats.get(f"{layer}|backward", {})
            remain = f["remain"] / f["calls"] if f.get("calls") else None
            cfg = dict(
                c, **{k: v for k, v in settings.get(layer, {}).items() if k in ("L", "H", "input_grad", "cross_batch")}
            )
            exact = layer_macs(c, batch, None)["total"]
            # clusters kept across batches: the GEMMs ran on the whole table, not on the clusters used
            counted = bound_remain(cfg, batch) if (remain is not None and cross_batch(cfg)) else remain
            used = layer_macs(cfg, batch, counted)["total"] if (remain is not None and layer in settings) else exact
            shape_key = f"{layer}@{c['in_hw'][0]}x{c['in_hw'][1]}"  # a rescale stage is another shape
            if self.measure_original and shape_key not in self.original_ms and layer in settings:
                try:
                    self.original_ms[shape_key] = time_ort_conv_layer(c, batch)
                except Exception:  # a side measurement must never stop training
                    self.original_ms[shape_key] = None
            layers[layer] = {
                "reused": layer in settings,
                "L": settings.get(layer, {}).get("L"),
                "H": settings.get(layer, {}).get("H"),
                "remain_ratio": remain,
                "macs_exact": exact,
                "macs_reuse": used,
                "macs_saved": 1 - used / exact,
                "reuse_ms_per_step": ((f.get("ms", 0) + b.get("ms", 0)) / max(f.get("calls", 0), 1))
                if f.get("calls")
                else None,
                "ort_conv_ms": self.original_ms.get(shape_key),
                "rows_in_kept_clusters": f["kept"] / f["kept_calls"] if f.get("kept_calls") else None,
                "input_hw": list(c["in_hw"]),
                **self.layer_choice(layer),
            }
        rec = {
            "epoch": epoch,
            "on": self.on,
            "setting": self.schedule[self.index] if self.strategy == "lh" else (self.options.L, self.options.H),
            "train_loss": metrics.get("train_loss"),
            "layers": layers,
            "steps": steps,
        }
        self.epochs.append(rec)
        # the cost model counts a reuse node at its expected remain ratio (reuse/cost.py); what the
        # measured one saves on top of that, in FLOPs per step (2 per multiply-add)
        self.logger.log_metrics(
            {
                "reuse": {
                    k: {
                        "remain_ratio": v["remain_ratio"],
                        **(
                            {"rows_in_kept_clusters": v["rows_in_kept_clusters"]}
                            if v["rows_in_kept_clusters"] is not None
                            else {}
                        ),
                        "macs_saved": v["macs_saved"],
                        "chosen": v["chosen"],
                        "why": v["why"],
                    }
                    for k, v in layers.items()
                },
                "reuse_flops_saved_per_step": sum(
                    2.0 * (modelled_macs(ran.get(k, self.configs[k]), batch) - v["macs_reuse"])
                    for k, v in layers.items()
                    if v["reused"] and v["remain_ratio"] is not None
                ),
            }
        )
        # the switch point: the validation loss where the run holds a validation split (what
        # decides; the evaluation runs the exact convs), else the training loss
        key = "val_loss" if metrics.get("val_loss") is not None else "train_loss"
        what = "validation loss" if key == "val_loss" else "training loss"
        loss = metrics.get(key)
        prev, self.prev_loss = self.prev_loss, loss
        if prev is None or loss is None or self.strategy == "fixed" or not self.reusing():
            return
        drop = (prev - loss) / max(abs(prev), 1e-12)
        if drop >= self.options.plateau or epoch - self.last_switch < self.options.min_epochs:
            return
        if self.strategy == "lh":
            if self.index + 1 >= len(self.schedule):
                return
            self.index += 1
            L, H = self.schedule[self.index]
            self.decide(
                epoch,
                "refine",
                f"{what} plateaued (fell {drop:.1%} < {self.options.plateau}); "
                f"reuse L={L}, H={H} from epoch {epoch + 1}",
                L=L,
                H=H,
                drop=drop,
            )
            if self.choose == "measured":  # the paper's "after each switch": the chosen layers again
                self._choose_shared(state, list(self.configs if self.chosen is None else self.chosen), epoch)
        else:
            self.on = False
            self.decide(
                epoch,
                "off",
                f"{what} plateaued (fell {drop:.1%} < {self.options.plateau}); "
                f"reuse off (exact conv) from epoch {epoch + 1}",
                drop=drop,
            )
        self.last_switch = epoch

    # ------------------------------------------------------------------ BatchNorm after reuse
    def recalibrate_batches(self) -> int:
        """``recalibrate`` (plan.json): training batches that gather the BatchNorm running
        statistics again through the exact convs before evaluating an epoch that reused; 0: off."""
        return self.options.recalibrate

    def before_evaluate(self, state, epoch):
        """The epoch trained with reused convs, so its BatchNorm running statistics describe
        activations of the approximate convs, while evaluation (and the checkpoint, and an exported
        model) runs the exact ones: gather them again through the exact convs, forward only, on
        ``recalibrate`` training batches. Training is unaffected (a training step normalises with
        its batch's statistics and never reads the running ones), so they are not put back. An
        epoch after ``off`` starts from recalibrated statistics and trains exact: nothing to do."""
        n = self.recalibrate_batches()
        service = getattr(state, "recalibrate_batchnorm", None)
        art = state.engine.artifacts
        if not n or service is None or art is None or not self.reusing():
            return
        t0 = time.perf_counter()
        cached = getattr(self, "_exact_of", None)
        if cached is None or cached[0] is not art:  # the variant that trained, every reuse node exact
            exact = art.copy()
            exact.training = strip(art.training)
            self._exact_of = cached = (art, exact)
        done = service(cached[1], n)
        if not done:  # no BatchNorm, or an engine that cannot
            return
        seconds = time.perf_counter() - t0
        layers = sorted(reused_layers(art.training))
        self.decide(
            epoch,
            "recalibrate",
            f"BatchNorm statistics gathered again through the exact convs for evaluation: {done['batches']} "
            f"training batches ({done['images']} images, forward only) in {seconds:.2f} s, counted in training "
            f"time; epoch {epoch} trained with {len(layers)} reused layer{'s' if len(layers) != 1 else ''}",
            batches=done["batches"],
            images=done["images"],
            seconds=seconds,
            layers=layers,
        )

    # ------------------------------------------------------------------ report and state
    def report(self) -> dict:
        if not self.epochs and not self.measurements:
            return {}
        tot_exact = sum(lay["macs_exact"] * e["steps"] for e in self.epochs for lay in e["layers"].values())
        tot_used = sum(lay["macs_reuse"] * e["steps"] for e in self.epochs for lay in e["layers"].values())
        return {
            "strategy": self.strategy,
            "epochs": self.epochs,
            "reused_layer_macs_saved": 1 - tot_used / tot_exact if tot_exact else 0.0,
            "switches": [d for d in self.log if d["action"] in ("refine", "off")],
            "choose": self.choose,
            "margin": self.margin,
            "chosen": self.chosen,
            "choice": {k: dict(self.choice.get(k, {}), **self.layer_choice(k)) for k in self.configs},
            "measurements": self.measurements,
        }

    def state_dict(self) -> dict:
        return {
            "log": self.log,
            "index": self.index,
            "on": self.on,
            "last_switch": self.last_switch,
            "prev_loss": self.prev_loss,
            "epochs": self.epochs,
            "original_ms": self.original_ms,
            **self._choice_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.index = int(state.get("index", 0))
        self.on = bool(state.get("on", True))
        self.last_switch = int(state.get("last_switch", 0))
        self.prev_loss = state.get("prev_loss")
        self.epochs = list(state.get("epochs", []))
        self.original_ms = dict(state.get("original_ms", {}))
        self._load_choice(state)
