"""The engine protocol: what the training loop and the algorithms may ask of an engine (accelc's
ORT :class:`~accelc.runtime.session.TrainingSession`, or the torch eager baseline)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass
class StepResult:
    """What one training step produced."""

    loss: float
    logits: np.ndarray | None
    probes: dict[str, float] = field(default_factory=dict)  # scalar graph outputs passes added
    kernels: dict[str, dict] = field(default_factory=dict)  # per node-kernel statistics of this step

    def __iter__(self):  # ``loss, logits = engine.train_step(x, y)``
        return iter((self.loss, self.logits))

    def __getitem__(self, i):
        return (self.loss, self.logits)[i]


@dataclass
class ParamUpdate:
    """Parameter changes that come with a variant swap (e.g. kernels resampled to a new shape)."""

    params: dict[str, np.ndarray] = field(default_factory=dict)
    reset_optimizer_for: list[str] = field(default_factory=list)  # moments dropped (shape changes)

    def merge(self, other: "ParamUpdate | None") -> "ParamUpdate":
        if other is None:
            return self
        reset = self.reset_optimizer_for + [p for p in other.reset_optimizer_for if p not in self.reset_optimizer_for]
        return ParamUpdate({**self.params, **other.params}, reset)


@runtime_checkable
class Engine(Protocol):
    """An engine trains one model. ``artifacts`` is the artifact set it runs now (None for an
    engine that runs no artifacts, such as torch eager); ``variant_name`` names it."""

    artifacts: Any
    variant_name: str

    def train_step(self, x, y) -> StepResult: ...

    def evaluate_batch(self, x, y) -> tuple[float, np.ndarray]: ...

    def param_arrays(self) -> dict[str, np.ndarray]: ...

    def engine_report(self) -> dict: ...

    def swap(self, artifacts, name: str, update: ParamUpdate | None = None) -> None: ...

    def state_arrays(self) -> dict[str, np.ndarray]: ...

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None: ...
