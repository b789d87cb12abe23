"""The rescale controller (runtime half of the ``rescale`` pass).

Trains the low-resolution stage first (data downscaled by s, kernels downscaled), then switches
to full resolution: kernels and the Gemm head are up-rescaled from the trained low-resolution
weights, BatchNorm and other parameters carry over, and the optimizer moments of every resampled
parameter are dropped (``reset_moments=all`` drops all of them). The switch comes at a fixed epoch,
at a fraction of the run, or when the low-resolution validation loss stops improving.
"""
from __future__ import annotations

import math
import statistics

from .controllers import Controller, Variant


class RescaleController(Controller):
    name = "rescale"

    def __init__(self, base, spec: dict):
        super().__init__()
        self.base = base
        self.spec = dict(spec)
        self.stage = base.stages[spec["stage"]]
        self.switched = False
        self.switch_epoch = None
        self.best = math.inf
        self.bad = 0
        self.epochs: list[dict] = []

    def _low_variant(self) -> Variant:
        from .session import read_checkpoint_params
        values = read_checkpoint_params(self.stage.checkpoint)
        changed = list(self.spec["params"])
        art = self.composer.artifacts() if self.composer is not None else self.stage
        return Variant(name=f"rescale:low(s={self.spec['factor']})", artifacts=art,
                       params={p: values[p] for p in changed}, reset_optimizer_for=changed,
                       data_hw=tuple(self.spec["input_hw"]))

    def on_train_start(self, trainer):
        return None if self.switched else self._low_variant()

    def _due(self, epoch: int, metrics: dict, total: int) -> str | None:
        kind, _, val = self.spec["switch"].partition(":")
        if kind == "epoch":
            return f"epoch {epoch} reached the fixed switch epoch {val}" if epoch >= int(val) else None
        if kind == "fraction":
            at = max(1, round(float(val) * total))
            return f"{epoch}/{total} epochs reached fraction {val}" if epoch >= at else None
        patience = int(val or 1)
        loss = metrics["test_loss"]
        if loss < self.best * (1 - 1e-3):
            self.best, self.bad = loss, 0
            return None
        self.bad += 1
        if self.bad >= patience:
            return f"low-resolution validation loss {loss:.4f} did not improve on {self.best:.4f} for {self.bad} epoch(s)"
        return None

    def on_epoch_end(self, epoch, metrics, trainer):
        self.epochs.append({"epoch": epoch, "stage": "full" if self.switched else "low",
                            "train_seconds": metrics["train_seconds"], "test_acc": metrics["test_acc"]})
        if self.switched:
            return None
        why = self._due(epoch, metrics, trainer.epochs)
        if not why or epoch >= trainer.epochs:
            return None
        from ..passes.rescale import up_param
        sess = trainer.engine
        s, method = self.spec["factor"], self.spec.get("method", "bilinear")
        up = {p: up_param(sess.params[p].detach().cpu().numpy(), sp, s, method) for p, sp in self.spec["params"].items()}
        reset = list(up) if self.spec.get("reset_moments", "changed") == "changed" else list(sess.trainable_all)
        self.switched, self.switch_epoch = True, epoch
        self.decide(epoch, "switch", f"{why}; up-rescaled {len(up)} parameter(s) ({method}), full resolution "
                    f"from epoch {epoch + 1}", reset_moments=reset)
        art = self.composer.artifacts() if self.composer is not None else self.base
        return Variant(name="rescale:full", artifacts=art, params=up, reset_optimizer_for=reset)

    def report(self) -> dict:
        low = [e["train_seconds"] for e in self.epochs if e["stage"] == "low"]
        full = [e["train_seconds"] for e in self.epochs if e["stage"] == "full"]
        out = {"switch_epoch": self.switch_epoch, "low_epochs": len(low), "full_epochs": len(full), "epochs": self.epochs}
        if low and full:
            # the first epoch of a stage carries session start-up; use the medians
            out["low_over_full_epoch_time"] = statistics.median(low) / statistics.median(full)
        return out

    def state(self) -> dict:
        return {"log": self.log, "switched": self.switched, "switch_epoch": self.switch_epoch, "best": self.best,
                "bad": self.bad, "epochs": self.epochs}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.switched = state.get("switched", False)
        self.switch_epoch = state.get("switch_epoch")
        self.best = state.get("best", math.inf)
        self.bad = state.get("bad", 0)
        self.epochs = list(state.get("epochs", []))
