"""The engine protocol: what the training loop and the algorithms may ask of an engine (accelc's
ORT :class:`~accelc.runtime.session.TrainingSession`, or the torch eager baseline)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..compiler.errors import AccelcError
from .config import ExecConfig


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
class Collective(Protocol):
    """The data-parallel process group as algorithms see it (a
    :class:`~accelc.runtime.distributed.Group`): who this rank is, sums and rank 0's JSON."""

    rank: int
    world: int

    @property
    def is_main(self) -> bool: ...

    def sum(self, values: list[float], what: str = "a reduction") -> list[float]: ...

    def broadcast_json(self, value, what: str = "a broadcast"): ...


@runtime_checkable
class Engine(Protocol):
    """An engine trains one model; the training loop and the algorithms ask it only this.

    ``artifacts`` is the artifact set it runs now (None for an engine that runs no artifacts, such
    as torch eager); ``variant_name`` names it. ``exec``: how it runs (device, threads, kernels).
    ``world_size``: the ranks training data-parallel (1 alone); ``collective``: their process
    group (None alone). ``optimizer_kind``: the optimizer's kind (``sgd`` keeps no state). ``lr``:
    the base learning rate (a schedule sets each step's as a multiple of it with :meth:`set_lr`)."""

    artifacts: Any
    variant_name: str
    exec: ExecConfig
    world_size: int
    lr: float

    @property
    def optimizer_kind(self) -> str: ...

    @property
    def collective(self) -> Collective | None: ...

    def ready(self) -> None:
        """Build what the current variant needs now (a lazy engine builds it when first used)."""

    def set_lr(self, lr: float) -> None:
        """The optimizer's learning rate from the next step on (a learning-rate schedule's)."""

    def set_lr_scales(self, scales: dict[str, float]) -> None:
        """Per-parameter multiples of the rate from the next step on (``{name: scale}``; a name
        left out: 1). Replaces the previous scales; names the engine does not train are ignored."""

    def train_step(self, x, y) -> StepResult: ...

    def evaluate_batch(self, x, y) -> tuple[float, np.ndarray]: ...

    def param_arrays(self) -> dict[str, np.ndarray]:
        """Every parameter's current value, copied (the caller may keep the arrays)."""
        ...

    def engine_report(self) -> dict: ...

    def swap(self, artifacts, name: str, update: ParamUpdate | None = None) -> None: ...

    def state_arrays(self) -> dict[str, np.ndarray]: ...

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None: ...

    def layout_state(self) -> list[dict]:
        """The activation layouts the engine chose by measuring (``runtime.layout``), for a
        checkpoint; [] for none."""

    def restore_layouts(self, choices: list[dict]) -> None:
        """The choices :meth:`layout_state` gave, from a checkpoint: a resumed run reuses them."""

    def buffers(self) -> list:
        """State a step changes besides parameters and optimizer state (BatchNorm running
        statistics), as tensors rank 0 broadcasts; [] for none."""

    def gradient_norm(self, param: str) -> float | None:
        """L2 norm of ``param``'s gradient of the last step (all-reduced when data-parallel); None
        when unknown."""

    def recalibrate_batchnorm(self, artifacts, batches) -> int | None:
        """BatchNorm running statistics gathered again by forward passes of ``artifacts`` over
        ``batches`` ((x, y) pairs); the batches it ran, or None when there is nothing to do."""

    def allreduce_report(self) -> dict | None:
        """Data-parallel: the gradient all-reduce's statistics (after the last step); None alone."""

    def infer(self, model, x: np.ndarray, output: str, chunk: int = 256) -> np.ndarray:
        """``output`` of the inference graph ``model`` (of this model: its other inputs are
        parameters the engine holds) for every row of ``x``, with the engine's kernels and current
        parameter values, no gradients."""


class EngineBase:
    """Defaults of the :class:`Engine` members an engine may have nothing to say about: no
    artifacts, the plain variant, the CPU, training alone, a stateful optimizer, no buffers, no
    gradient norms, no BatchNorm recalibration. Engines (and test doubles) derive from it and
    override what they support."""

    artifacts: Any = None
    variant_name: str = "base"
    exec: ExecConfig = ExecConfig()
    world_size: int = 1
    optimizer_kind: str = "adamw"
    collective: Collective | None = None
    lr: float = 1e-3  # the base learning rate (a schedule's steps are multiples of it)
    optimizer: Any = None  # a torch.optim.Optimizer whose groups' "lr" set_lr sets

    def ready(self) -> None:
        return None

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups if self.optimizer is not None else ():
            group["lr"] = float(lr)

    def set_lr_scales(self, scales: dict[str, float]) -> None:
        opt = self.optimizer
        if opt is None or not hasattr(opt, "lr_scales"):
            raise AccelcError(f"{type(self).__name__} has no per-parameter learning rates")
        params = self._named_params()
        opt.lr_scales = {params[n]: float(k) for n, k in scales.items() if n in params and k != 1.0}

    def _named_params(self) -> dict:
        """name -> the parameter tensor the optimizer updates (for :meth:`set_lr_scales`)."""
        return {}

    def param_arrays(self) -> dict[str, np.ndarray]:
        return {}

    def engine_report(self) -> dict:
        return {}

    def swap(self, artifacts, name: str, update: ParamUpdate | None = None) -> None:
        raise AccelcError(f"{type(self).__name__} runs no compiled variants")

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        return None

    def layout_state(self) -> list[dict]:  # an engine with a ``layouts`` (runtime.layout.Layouts)
        layouts = getattr(self, "layouts", None)
        return layouts.state() if layouts is not None else []

    def restore_layouts(self, choices: list[dict]) -> None:
        layouts = getattr(self, "layouts", None)
        if layouts is not None:
            layouts.restore(choices)

    def buffers(self) -> list:
        return []

    def gradient_norm(self, param: str) -> float | None:
        return None

    def recalibrate_batchnorm(self, artifacts, batches) -> int | None:
        return None

    def allreduce_report(self) -> dict | None:
        return None

    def infer(self, model, x: np.ndarray, output: str, chunk: int = 256) -> np.ndarray:
        raise AccelcError(f"{type(self).__name__} runs no inference graphs")
