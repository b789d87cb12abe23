"""Training-time algorithms: how passes act while training, in the style of MosaicML Composer's
algorithms on events.

An :class:`Algorithm` is the run-time half of a pass. It sees events (``on_train_start``,
``on_step`` with the step's :class:`~accelc.runtime.engine.StepResult`, ``before_evaluate``,
``on_epoch_end`` with the epoch's metrics), logs through the run's :class:`Logger` (never into
other objects), keeps its state in ``state_dict``/``load_state_dict`` (JSON, never pickles), and
contributes:

* a *decision key*: a hashable value naming its current decision;
* a *transform* of the artifacts: given the artifacts the earlier algorithms produced, the
  artifacts with its decision applied (the same object when its decision changes nothing);
* ``on_switch``: parameter changes that come with a new decision (e.g. kernels resampled to a
  new shape), as a :class:`~accelc.runtime.engine.ParamUpdate`.

The :class:`Schedule` folds the transforms of all algorithms in the methods' composition order,
with one cache keyed by the tuple of decision keys, so no algorithm undoes another's decision and
no method name appears here. A method names its algorithm (``Method.algorithm``); its plan.json
entries (``{"type": METHOD, "options": {...}, ...}``) are run by it, with the options parsed once
into the method's typed :class:`~accelc.compiler.options.Options` (``self.options``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable

from ..compiler.errors import AccelcError, show
from ..compiler.method import installed
from .engine import Engine, ParamUpdate, StepResult


class Logger:
    """Collects what algorithms report during one epoch: metrics (merged into the epoch's record
    in ``metrics.jsonl``) and decisions (with their reasons)."""

    def __init__(self):
        self.metrics: dict[str, Any] = {}
        self.decisions: list[dict] = []

    def log_metrics(self, metrics: dict) -> None:
        self.metrics.update(metrics)

    def log_decision(self, record: dict) -> None:
        self.decisions.append(record)

    def take(self) -> tuple[dict, list]:
        out = self.metrics, self.decisions
        self.metrics, self.decisions = {}, []
        return out


@dataclass
class TrainState:
    """What events see of the run: the engine (read-only for algorithms: its artifacts and
    parameter values, through the :class:`~accelc.runtime.engine.Engine` protocol only), the run's
    length and batch size, and the logger."""

    engine: Engine
    epochs: int
    batch_size: int
    logger: Logger = field(default_factory=Logger)
    # () -> (x, y): a batch of the run's training data (the first of the data order, at the current
    # input size), for algorithms that calibrate on real activations before they decide; None: no data
    sample: Any = None
    # (artifacts, batches, full_size=False) -> {"batches", "images"} or None: the BatchNorm running
    # statistics gathered again by forward passes of ``artifacts`` (a variant of the engine's model,
    # e.g. one that computes what the eval graph computes) over ``batches`` training batches, at the
    # current input size or, with ``full_size``, at the model's own (for a variant that trains at
    # another size: statistics for the full-size model); parameters and optimizer state do not change.
    # None (the service or its result): nothing to recalibrate (no engine support, no BatchNorm). The
    # runtime picks the batches and keeps every rank consistent (see Trainer)
    recalibrate_batchnorm: Any = None
    # the training step about to run or running: 0-based over the whole run (epoch × steps per epoch
    # + step), and the steps of one epoch (set by the training loop before each step)
    step: int = 0
    steps_per_epoch: int = 0
    # () -> the training images at the current input size (every row, in the data set's order: the
    # rows :meth:`Algorithm.training_inputs` answers for); None: no data
    train_images: Any = None
    # the run's learning rate for the step about to run (the schedule's, before any per-parameter
    # scale an algorithm gives; set by the training loop before each step)
    lr: float = 0.0
    # the fraction of the budget from which the run trains the model at its full input size: the
    # latest :meth:`Algorithm.full_size_from` of the run's algorithms (0.0: from the start). Set by the
    # training loop before ``on_train_start``
    full_size_from: float = 0.0

    @property
    def progress(self) -> float:
        """The run's progress at the current step, in [0, 1): ``step / (epochs × steps per epoch)``
        (a budget's fraction spent; 0 before the first step)."""
        total = self.epochs * self.steps_per_epoch
        return self.step / total if total > 0 else 0.0


class Algorithm:
    """Base class. Its ``method`` (and ``name``) are set by the Method that names it; subclasses
    override what they need; the defaults do nothing and change nothing."""

    method = None  # the Method whose plan entries this algorithm runs
    name = "algorithm"

    def __init__(self, root, spec: dict | None = None):
        self.root = root  # the compiled artifact set (with its stages)
        self.spec = dict(spec or {})
        # the method's typed settings, parsed once from the plan entry
        opts = self.spec.get("options")
        if self.method is not None:
            opts = self.method.options.from_plan(opts, f"plan.json: the {self.name} controller's")
        self.options = opts
        self.log: list[dict] = []
        self.logger: Logger | None = None

    def full_size_from(self, state: TrainState) -> float | None:
        """The fraction of the budget (``state.epochs`` epochs) from which this algorithm trains
        the model at its full input size, when it trains below it first on a schedule fixed in
        advance (a resolution ramp); None (the default): it never changes the input size, or when it
        does is not known in advance. Asked once before ``on_train_start``; the run's latest is
        ``state.full_size_from``, which schedules that must not overlap a smaller input read."""
        return None

    # ------------------------------------------------------------------ events
    def on_train_start(self, state: TrainState) -> None:
        """Once before the first epoch (also after a resume, with the state loaded)."""

    def before_step(self, state: TrainState, epoch: int, step: int) -> None:
        """Before each training step (``state.step``, ``state.progress`` say where in the run; keep
        it cheap). It may change the decision: the switch then happens before this step. Such a
        decision must follow from what every rank and a resumed run see alike (the step count, the
        state restored at the epoch's start), and must keep the input's shape (the epoch's batches
        are already being cut)."""

    def lr_scales(self, state: TrainState) -> dict[str, float] | None:
        """Per-parameter multiples of the learning rate for the step about to run
        (``{parameter: scale}``, after :meth:`before_step`), or None for none. The scales of all
        algorithms multiply."""
        return None

    def training_inputs(self, state: TrainState):
        """What the current variant's training graph reads in place of the images, when it reads
        something else (e.g. a frozen prefix's activations, computed once): an array with one row
        per training image, in the order of ``state.train_images()``; None (the default): the
        images. Asked after every switch of the variant; a step takes its batch's rows from it."""
        return None

    def on_step(self, state: TrainState, step: int, result: StepResult) -> None:
        """After each training step (keep it cheap)."""

    def before_evaluate(self, state: TrainState, epoch: int) -> None:
        """After an epoch's training steps, before its evaluation and its checkpoint (every
        evaluation may be the run's last: a run can stop after any epoch). For state that the
        evaluation, the checkpoint and an exported model read but training does not, e.g. BatchNorm
        running statistics (``state.recalibrate_batchnorm``). Its time counts as training time."""

    def on_epoch_end(self, state: TrainState, epoch: int, metrics: dict) -> None:
        """After each epoch's evaluation; may change the decision (the switch happens after every
        algorithm has seen the epoch). ``metrics`` is read-only: report through the logger."""

    # ------------------------------------------------------------------ what it contributes
    def decision(self) -> Hashable:
        """A hashable key of the current decision."""
        return None

    def transform(self, artifacts):
        """The artifacts with this algorithm's decision applied (the same object if unchanged)."""
        return artifacts

    def on_switch(self, state: TrainState, initial: bool) -> ParamUpdate | None:
        """Parameter changes that come with the current decision; called at train start
        (``initial``) and after an epoch end or a step start that changed this algorithm's
        decision."""
        return None

    def describe(self) -> str:
        """A short name of the current decision for the variant's name ('' when neutral)."""
        return ""

    def report(self) -> dict:
        return {}

    # ------------------------------------------------------------------ logging and state
    def decide(self, epoch: int, action: str, why: str, **details) -> None:
        rec = {"epoch": epoch, "controller": self.name, "action": action, "why": why, **details}
        self.log.append(rec)
        if self.logger is not None:
            self.logger.log_decision(rec)

    def state_dict(self) -> dict:
        return {"log": self.log}

    def load_state_dict(self, state: dict) -> None:
        self.log = list(state.get("log", []))


class Schedule:
    """The variant that carries every algorithm's decision (see the module doc)."""

    def __init__(self, root, algorithms: list[Algorithm]):
        self.root = root
        self.algorithms = _in_order(algorithms)
        self._cache: dict = {}

    def key(self) -> tuple:
        return tuple(a.decision() for a in self.algorithms)

    def artifacts(self):
        key = self.key()
        if key not in self._cache:
            art = self.root
            for a in self.algorithms:
                art = a.transform(art)
            self._cache[key] = art
        return self._cache[key]

    def name(self) -> str:
        return "+".join(d for d in (a.describe() for a in self.algorithms) if d) or "base"

    def decisions(self) -> dict[str, str]:
        """The variant as a structured value: each algorithm whose decision departs from the plain
        graph -> its description ({} for the plain graph). Stored as such in checkpoints: a list of
        skipped layers on a real model is long, and no bound on the joined name holds."""
        return {a.name: d for a in self.algorithms if (d := a.describe())}


def _in_order(algorithms: list[Algorithm]) -> list[Algorithm]:
    methods = installed()
    return sorted(algorithms, key=lambda a: methods.index(a.name))


def algorithms_for(art) -> list[Algorithm]:
    """The algorithms an artifact set's plan asks for (``plan.json``), in composition order."""
    methods = installed()
    out = []
    for spec in art.plan:
        if not isinstance(spec, dict):
            raise AccelcError("plan.json: every controller must be an object")
        kind = spec.get("type")
        method = methods.by_name.get(kind) if isinstance(kind, str) else None
        if method is None or method.algorithm is None:
            raise AccelcError(f"plan.json names an unknown controller '{show(str(kind), 60)}'")
        out.append(method.algorithm(art, spec))
    return _in_order(out)
