"""The rescale algorithm (run-time half of the ``rescale`` pass).

Kernel mode (:class:`Rescale`): trains the low-resolution stage first (data downscaled by s,
kernels downscaled), then switches to full resolution: kernels and the Gemm head are up-rescaled
from the trained low-resolution weights, BatchNorm and other parameters carry over, and the
optimizer moments of every resampled parameter are dropped (``reset_moments=all`` drops all of
them). The switch comes at a fixed epoch, at a fraction of the run, or when the low-resolution
validation loss stops improving.

Progressive mode (:class:`ProgressiveRescale`, what ``Rescale(...)`` builds for a plan entry whose
``mode`` is ``progressive``): each epoch trains the stage of the size the resolution ramp gives it
(:mod:`.ramp`), switched at epoch ends; see :class:`ProgressiveRescale`.
"""

from __future__ import annotations

import math
import statistics
import time

from ...compiler.errors import AccelcError, show
from ...runtime.algorithm import Algorithm
from ...runtime.engine import ParamUpdate
from .ramp import epoch_size
from .rewrite import RescaleOptions, up_param


def _mode(spec) -> str | None:
    opts = spec.get("options") if isinstance(spec, dict) else None
    return opts.get("mode") if isinstance(opts, dict) else None


class Rescale(Algorithm):
    options: RescaleOptions

    def __new__(cls, root=None, spec=None):
        # one Method, one algorithm class: a progressive plan entry gets the progressive algorithm
        if cls is Rescale and _mode(spec) == "progressive":
            return super().__new__(ProgressiveRescale)
        return super().__new__(cls)

    def __init__(self, root, spec: dict):
        super().__init__(root, spec)
        self.stage = root.stages[self.spec["stage"]]
        self.switched = False
        self.switch_epoch = None
        self.best = math.inf
        self.bad = 0
        self.epochs: list[dict] = []

    def decision(self):
        return "full" if self.switched else "low"

    def transform(self, art):
        return art if self.switched else art.stages[self.spec["stage"]]

    def describe(self) -> str:
        return "rescale:full" if self.switched else f"rescale:low(s={self.options.factor})"

    def on_switch(self, state, initial):
        changed = list(self.spec["params"])
        if not self.switched:  # start of the low-resolution stage: its downscaled parameters
            from ...runtime.session import read_checkpoint_params  # heavy: imports torch

            values = read_checkpoint_params(self.stage.checkpoint)
            return ParamUpdate({p: values[p] for p in changed}, changed)
        if initial:  # resumed after the switch: the checkpoint holds the full-resolution parameters
            return None
        s, method = self.options.factor, self.options.method
        current = state.engine.param_arrays()
        up = {p: up_param(current[p], sp, s, method) for p, sp in self.spec["params"].items()}
        reset = list(up) if self.options.reset_moments == "changed" else list(self.root.info.params)
        return ParamUpdate(up, reset)

    def _fixed_switch(self, total: int) -> int | None:
        """The epoch (1-based) after which a fixed switch (``epoch:k``, ``fraction:f``) comes in a
        run of ``total`` epochs; None for a plateau switch, which the loss decides."""
        kind, _, val = self.options.switch.partition(":")
        if kind == "epoch":
            return int(val)
        if kind == "fraction":
            return max(1, round(float(val) * total))
        return None

    def _due(self, epoch: int, metrics: dict, total: int) -> str | None:
        kind, _, val = self.options.switch.partition(":")
        at = self._fixed_switch(total)
        if at is not None:
            if epoch < at:
                return None
            if kind == "epoch":
                return f"epoch {epoch} reached the fixed switch epoch {val}"
            return f"{epoch}/{total} epochs reached fraction {val}"
        patience = int(val or 1)
        # the validation split decides; without one (no --val-split) the test split stands in, named
        split = "validation" if "val_loss" in metrics else "test (no validation split)"
        loss = metrics.get("val_loss", metrics["test_loss"])
        if loss < self.best * (1 - 1e-3):
            self.best, self.bad = loss, 0
            return None
        self.bad += 1
        if self.bad >= patience:
            return f"low-resolution {split} loss {loss:.4f} did not improve on {self.best:.4f} for {self.bad} epoch(s)"
        return None

    def full_size_from(self, state) -> float | None:
        """A fixed switch (``epoch:k``, ``fraction:f``) trains at full size from its epoch on; a
        plateau switch is decided by the loss, not known in advance (None)."""
        total = state.epochs
        at = self._fixed_switch(total)
        return min(at, total) / total if at is not None and total > 0 else None

    def on_epoch_end(self, state, epoch, metrics):
        self.epochs.append(
            {
                "epoch": epoch,
                "stage": "full" if self.switched else "low",
                "train_seconds": metrics["train_seconds"],
                "test_acc": metrics["test_acc"],
                **({"val_acc": metrics["val_acc"]} if "val_acc" in metrics else {}),
            }
        )
        if self.switched:
            return
        why = self._due(epoch, metrics, state.epochs)
        if not why or epoch >= state.epochs:
            return
        method = self.options.method
        reset = list(self.spec["params"]) if self.options.reset_moments == "changed" else list(self.root.info.params)
        self.switched, self.switch_epoch = True, epoch
        self.decide(
            epoch,
            "switch",
            f"{why}; up-rescaled {len(self.spec['params'])} parameter(s) ({method}), full "
            f"resolution from epoch {epoch + 1}",
            reset_moments=reset,
        )

    def report(self) -> dict:
        low = [e["train_seconds"] for e in self.epochs if e["stage"] == "low"]
        full = [e["train_seconds"] for e in self.epochs if e["stage"] == "full"]
        out = {
            "switch_epoch": self.switch_epoch,
            "low_epochs": len(low),
            "full_epochs": len(full),
            "epochs": self.epochs,
        }
        if low and full:
            # the first epoch of a stage carries session start-up; use the medians
            out["low_over_full_epoch_time"] = statistics.median(low) / statistics.median(full)
        return out

    def state_dict(self) -> dict:
        return {
            "log": self.log,
            "switched": self.switched,
            "switch_epoch": self.switch_epoch,
            "best": self.best if math.isfinite(self.best) else None,  # JSON has no Infinity
            "bad": self.bad,
            "epochs": self.epochs,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.switched = state.get("switched", False)
        self.switch_epoch = state.get("switch_epoch")
        best = state.get("best")
        self.best = math.inf if best is None else float(best)
        self.bad = state.get("bad", 0)
        self.epochs = list(state.get("epochs", []))


def _hw(hw) -> str:
    return f"{hw[0]}x{hw[1]}"


def load_stage(root, name: str):
    """The stage ``name`` of the artifact set ``root`` (compiled in this process, or read by the
    loader with every stage a plan entry lists)."""
    if name not in root.stages:
        raise AccelcError(f"rescale: the stage '{show(name)}' is not among the artifacts' stages; recompile")
    return root.stages[name]


class ProgressiveRescale(Rescale):
    """Progressive resizing: epoch e of a budget of E trains at the ramp's size for it (Composer's
    shape, :func:`.ramp.epoch_size`), the last epochs at full size. Every stage holds the full
    model's parameters, shape for shape, so a switch carries the parameters and the optimizer's
    moments as they are (no :class:`ParamUpdate`). With ``recalibrate`` > 0 (default 0), before
    each evaluation of an epoch that trained below full size, the BatchNorm running statistics are
    gathered again at full size on that many training batches through the full model's graph
    (FixRes: the statistics the full-size model, its checkpoint and an exported model read). The decision is the input size;
    it changes at epoch ends only (a switch before a step may not change the input's shape)."""

    def __init__(self, root, spec: dict):
        Algorithm.__init__(self, root, spec)
        missing = [k for k in ("full_hw", "stages") if not self.spec.get(k)]
        if missing:
            raise AccelcError(f"plan.json: the rescale controller's progressive entry has no '{missing[0]}'; recompile")
        self.full_hw = tuple(int(v) for v in self.spec["full_hw"])
        self.dirs = {tuple(int(v) for v in st["hw"]): st["dir"] for st in self.spec["stages"]}
        self.hw: tuple | None = None  # the input size the current (or next) epoch trains at
        self.budget: int | None = None  # the run's epochs, which the ramp spans
        self.epochs: list[dict] = []
        self._recal: dict | None = None  # the recalibration before this epoch's evaluation

    # ------------------------------------------------------------------ the ramp
    def _size(self, epoch: int) -> tuple:
        """The compiled size for 0-based ``epoch``: the ramp's, or (plan edited, budget changed)
        the largest compiled size within it; full size when none is."""
        hw = epoch_size(epoch, self.budget, self.full_hw, self.options)
        if hw == self.full_hw or hw in self.dirs:
            return hw
        fits = [d for d in self.dirs if d[0] <= hw[0] and d[1] <= hw[1]]
        return max(fits) if fits else self.full_hw

    def full_size_from(self, state) -> float | None:
        """The start of the ramp's full-size epochs (the last ones), as a fraction of the budget."""
        self.budget = state.epochs
        e = self.budget
        while e > 0 and self._size(e - 1) == self.full_hw:
            e -= 1
        return e / self.budget if self.budget > 0 else None

    def on_train_start(self, state) -> None:
        self.budget = state.epochs
        first = state.step // state.steps_per_epoch if state.steps_per_epoch else 0
        if self.hw is None:  # a resumed run goes on at the size it stopped before (its state loaded)
            self.hw = self._size(first)
        for e in range(first, self.budget):  # the stages this run trains, read before its first step
            hw = self._size(e)
            if hw != self.full_hw:
                load_stage(self.root, self.dirs[hw])

    def decision(self):
        return "full" if self.hw in (None, self.full_hw) else self.hw

    def transform(self, art):
        if self.hw in (None, self.full_hw):
            return art
        return load_stage(self.root, self.dirs[self.hw])

    def describe(self) -> str:
        return "rescale:full" if self.hw in (None, self.full_hw) else f"rescale:{_hw(self.hw)}"

    def on_switch(self, state, initial):
        return None  # same parameters, same shapes: values and optimizer moments carry over

    # ------------------------------------------------------------------ events
    def before_evaluate(self, state, epoch):
        """FixRes: after an epoch below full size, the BatchNorm running statistics of the full-size
        model, gathered again at full size (forward only, ``recalibrate`` training batches)."""
        self._recal = None
        n = self.options.recalibrate
        service = state.recalibrate_batchnorm
        if not n or service is None or self.hw in (None, self.full_hw):
            return
        t0 = time.perf_counter()
        done = service(self.root, n, full_size=True)
        if not done:  # no BatchNorm, or an engine that cannot
            return
        seconds = time.perf_counter() - t0
        self._recal = {"batches": done["batches"], "images": done["images"], "seconds": seconds}
        self.decide(
            epoch,
            "recalibrate",
            f"BatchNorm statistics gathered again at full size {_hw(self.full_hw)} (FixRes): {done['batches']} "
            f"training batches ({done['images']} images, forward only) in {seconds:.2f} s, counted in training "
            f"time; epoch {epoch} trained at {_hw(self.hw)}",
            **self._recal,
        )

    def on_epoch_end(self, state, epoch, metrics):
        rec = {"epoch": epoch, "hw": list(self.hw or self.full_hw), "train_seconds": metrics["train_seconds"]}
        rec["recalibrate"] = self._recal
        rec.update({k: metrics[k] for k in ("test_acc", "val_acc") if k in metrics})
        self.epochs.append(rec)
        self._recal = None
        if epoch >= state.epochs:
            return
        nxt = self._size(epoch)  # the 0-based index of the next epoch is this one's 1-based number
        if nxt != self.hw:
            self.decide(
                epoch,
                "resize",
                f"epoch {epoch + 1} of {state.epochs} trains at {_hw(nxt)}"
                + (" (full size)" if nxt == self.full_hw else "")
                + f", from {_hw(self.hw or self.full_hw)}; the ramp: {self._ramp_text()}",
                hw=list(nxt),
            )
            self.hw = nxt

    def _ramp_text(self) -> str:
        return ", ".join(str(hw[0]) if hw[0] == hw[1] else _hw(hw) for hw in self._ramp())

    def _ramp(self) -> list:
        return [self._size(e) for e in range(self.budget or 0)]

    def report(self) -> dict:
        low = [e for e in self.epochs if tuple(e["hw"]) != self.full_hw]
        full = [e["train_seconds"] for e in self.epochs if tuple(e["hw"]) == self.full_hw]
        recal = [e["recalibrate"]["seconds"] for e in self.epochs if e.get("recalibrate")]
        out = {
            "mode": "progressive",
            "full_hw": list(self.full_hw),
            "ramp": [list(hw) for hw in self._ramp()],
            "stages_compiled": len(self.dirs),
            "low_epochs": len(low),
            "full_epochs": len(full),
            "recalibrate_seconds": sum(recal),
            "epochs": self.epochs,
        }
        if low and full:
            # pixels per image differ per epoch: compare per pixel, full-size medians as the unit
            per_px = [e["train_seconds"] / (e["hw"][0] * e["hw"][1]) for e in low]
            unit = statistics.median(full) / (self.full_hw[0] * self.full_hw[1])
            out["low_over_full_time_per_pixel"] = statistics.median(per_px) / unit
            out["low_over_full_epoch_time"] = statistics.median(e["train_seconds"] for e in low) / statistics.median(
                full
            )
        return out

    def state_dict(self) -> dict:
        return {
            "log": self.log,
            "hw": None if self.hw is None else list(self.hw),
            "budget": self.budget,
            "epochs": self.epochs,
        }

    def load_state_dict(self, state: dict) -> None:
        Algorithm.load_state_dict(self, state)
        hw = state.get("hw")
        self.hw = None if hw is None else tuple(int(v) for v in hw)
        if self.hw is not None and self.hw != self.full_hw and self.hw not in self.dirs:
            raise ValueError(f"no stage of size {self.hw}")
        self.budget = state.get("budget")
        self.epochs = list(state.get("epochs", []))
