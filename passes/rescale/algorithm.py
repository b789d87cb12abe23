"""The rescale algorithm (run-time half of the ``rescale`` pass).

Trains the low-resolution stage first (data downscaled by s, kernels downscaled), then switches
to full resolution: kernels and the Gemm head are up-rescaled from the trained low-resolution
weights, BatchNorm and other parameters carry over, and the optimizer moments of every resampled
parameter are dropped (``reset_moments=all`` drops all of them). The switch comes at a fixed epoch,
at a fraction of the run, or when the low-resolution validation loss stops improving.
"""

from __future__ import annotations

import math
import statistics

from ...runtime.algorithm import Algorithm
from ...runtime.engine import ParamUpdate
from .rewrite import RescaleOptions, up_param


class Rescale(Algorithm):
    options: RescaleOptions

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

    def _due(self, epoch: int, metrics: dict, total: int) -> str | None:
        kind, _, val = self.options.switch.partition(":")
        if kind == "epoch":
            return f"epoch {epoch} reached the fixed switch epoch {val}" if epoch >= int(val) else None
        if kind == "fraction":
            at = max(1, round(float(val) * total))
            return f"{epoch}/{total} epochs reached fraction {val}" if epoch >= at else None
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
