"""Per-epoch controllers: how passes drive training.

A controller sees each finished epoch's metrics and may answer with a :class:`Variant`, another
compiled form of the same model to train from the next epoch on (a skip set, a reuse setting, a
resolution stage). It explains every decision in its log, and its state is saved in checkpoints
(JSON, never pickles).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Variant:
    """A compiled variant to swap in: artifacts (dir or in-memory) plus what changes with it."""

    name: str
    artifacts: Any
    params: dict | None = None  # new parameter values (e.g. rescaled kernels)
    reset_optimizer_for: list | None = None  # parameters whose optimizer moments are dropped
    data_hw: tuple | None = None  # spatial size the data must have in this variant
    info: dict = field(default_factory=dict)


class Controller:
    """Interface. Subclasses set ``name`` and implement :meth:`on_epoch_end`."""

    name = "controller"
    composer = None  # a runtime.compose.Composer when several controllers share one schedule

    def __init__(self):
        self.log: list[dict] = []

    def on_train_start(self, trainer) -> Variant | None:
        """Called once before the first epoch (also after a resume). May pick the starting variant."""
        return None

    def on_step(self, trainer, step: int, loss: float) -> None:
        """Called after each training step (keep it cheap)."""

    def on_epoch_end(self, epoch: int, metrics: dict, trainer) -> Variant | None:
        raise NotImplementedError

    def decide(self, epoch: int, action: str, why: str, **details) -> None:
        self.log.append({"epoch": epoch, "controller": self.name, "action": action, "why": why, **details})

    def state(self) -> dict:
        return {"log": self.log}

    def load_state(self, state: dict) -> None:
        self.log = list(state.get("log", []))


class SwapEveryEpoch(Controller):
    """Test controller: swap to the same variant after every epoch (exercises the swap path)."""

    name = "swap-every-epoch"

    def __init__(self, variant: Variant):
        super().__init__()
        self.variant = variant

    def on_epoch_end(self, epoch, metrics, trainer):
        self.decide(epoch, "swap", "test: identical variant every epoch", variant=self.variant.name)
        return self.variant
