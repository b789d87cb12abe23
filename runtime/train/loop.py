"""The training loop: :class:`Trainer` runs the epochs of one engine with the training-time
algorithms (see :mod:`accelc.runtime.algorithm`); what it writes is in :mod:`.records` and
:mod:`.logs`, how it starts in :mod:`.resume`."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ...compiler.errors import AccelcError
from .. import checkpoint as ckpt
from ..algorithm import Algorithm, Schedule, TrainState
from ..data import Dataset
from ..engine import Engine, ParamUpdate
from ..lr_schedule import LRSchedule
from ..spec import TrainSpec
from .logs import RunLogs, _hw, check_loggers, check_resumed_logs
from .records import TrainerRecords
from .resume import TrainerStart
from .summary import engine_line


def _accuracy(logits: np.ndarray, y: np.ndarray) -> int:
    return int((np.asarray(logits).argmax(axis=1) == y).sum())


class NonFiniteLoss(AccelcError):
    pass


@dataclass(frozen=True)
class RunSetup:
    """How a run is recorded and shown, beside its settings (the spec): the configuration's
    ``name`` (progress bars, records), what a resume must agree with (``fingerprint``: the run's
    settings; ``artifacts_sha``: the artifact set's content), the evaluation batch size and
    whether checkpoints are written."""

    name: str = "ort"
    fingerprint: dict | None = None
    artifacts_sha: str | None = None
    eval_batch_size: int = 500
    checkpoints: bool = True


class Trainer(TrainerStart, TrainerRecords):
    """Runs epochs of one engine (ORT TrainingSession or TorchSession) with training-time
    algorithms (see :mod:`accelc.runtime.algorithm`), as ``spec`` says (its run directory, epochs,
    batch size, seed, resume, progress, allowed changes and logs; the engine and the data are
    built from the rest of it by :func:`~accelc.runtime.train.train`)."""

    def __init__(
        self,
        spec: TrainSpec,
        engine: Engine,
        data: Dataset,
        *,
        algorithms: list[Algorithm] | None = None,
        setup: RunSetup = RunSetup(),
        dist=None,
    ):
        """``dist``: this process's :class:`~accelc.runtime.distributed.Group` when training
        data-parallel (each rank trains its shard of every batch; only rank 0 writes).
        ``spec.log``: logs besides metrics.jsonl, of :data:`LOGGERS` (see :class:`RunLogs`)."""
        epochs, batch_size, seed = spec.epochs, spec.batch_size, spec.seed
        if epochs <= 0:
            raise AccelcError(f"--epochs must be positive, got {epochs}")
        if batch_size <= 0 or batch_size > len(data.x_train):
            raise AccelcError(f"--batch-size must be in 1..{len(data.x_train)}, got {batch_size}")
        self.dist = dist if dist is not None and dist.world > 1 else None
        if self.dist is not None and batch_size % self.dist.world:
            raise AccelcError(
                f"--batch-size {batch_size} (the global batch) must be a multiple of the number of "
                f"processes ({self.dist.world}) so every rank trains an equal shard"
            )
        self.spec = spec
        self.engine: Engine = engine
        self.data_full, self.data = data, data
        self.run_dir = Path(spec.run_dir) if spec.run_dir else None
        self.epochs, self.batch_size, self.seed = epochs, batch_size, seed
        self._cost_of: dict = {}  # id(artifacts) -> (artifacts, cost-model FLOPs/bytes per step of that variant)
        self._steps_before = 0
        self._ran_with: list = []  # this epoch's [(artifacts, steps run with them)], a switch before a step closing one
        self.algorithms = list(algorithms or [])
        self.state = TrainState(engine, epochs, batch_size)
        for a in self.algorithms:
            a.logger = self.state.logger
        art = engine.artifacts
        self.schedule = Schedule(art, self.algorithms) if self.algorithms and art is not None else None
        self.progress, self.name = spec.progress, setup.name
        self.eval_batch_size = setup.eval_batch_size
        self.checkpoints = setup.checkpoints and self.run_dir is not None
        self.writer = self.dist is None or self.dist.is_main  # only rank 0 writes the run directory
        self.loggers = check_loggers(spec.log)
        self.logs: RunLogs | None = None
        self.history: list[dict] = []
        # what a resume must agree with: the run's settings and the artifact set's content
        self.lr_schedule = LRSchedule.parse(spec.lr_schedule)
        self.base_lr = float(engine.lr)  # the schedule's steps are multiples of it
        self.lr_now = self.base_lr
        self.fingerprint = dict(
            setup.fingerprint or {},
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            lr_schedule=self.lr_schedule.text(),
        )
        self.allow_change = set(spec.allow_change)
        self.artifacts_sha = setup.artifacts_sha
        self.artifacts_dir = None  # recorded in checkpoints (export-run finds the artifacts by it)
        self.start_epoch = 0
        self.train_time = 0.0
        self.wall_time = 0.0
        # stop after an epoch whose metrics satisfy it (bench's --stop-at-target); None: run every epoch
        self.stop_when = None
        self._resized: dict = {}
        self._lr_scales: dict | None = None  # the per-parameter scales the engine has (None: unknown)
        self._start(spec.resume)

    def _start(self, resume: bool) -> None:
        """Resume (when asked and there is a checkpoint), start the algorithms, choose the first
        variant and build its sessions."""
        pending = None
        if resume and self.run_dir and ckpt.exists(self.run_dir):
            pending = self._resume()
            if self.writer:
                check_resumed_logs(self.run_dir, self.loggers)
        self.state.sample = self._sample_batch
        self.state.train_images = lambda: self.data.x_train
        # what the variant trains on in place of the images: None (the images), an array, or False
        # (not asked yet since the last switch)
        self._inputs = False
        self.state.recalibrate_batchnorm = self._recalibrate_batchnorm
        self._epoch = self.start_epoch  # the epoch that trains (0-based): recalibration batches come from its order
        self.state.steps_per_epoch = self.data.steps_per_epoch(self.batch_size)
        self.state.step = self.start_epoch * self.state.steps_per_epoch
        t0 = time.perf_counter()
        ends = [a.full_size_from(self.state) for a in self.algorithms]
        self.state.full_size_from = max([f for f in ends if f is not None], default=0.0)
        for a in self.algorithms:
            a.on_train_start(self.state)
        self._switch(self.algorithms, initial=True)
        # what the algorithms spend before the first step (measurements, choosing the first variant)
        # is part of what training costs: counted in the training time of a run that starts here
        self.setup_seconds = time.perf_counter() - t0
        # the sessions of the variant training starts with: built here, whichever it is, and (as a
        # session built before training, for every configuration alike) not counted as training
        if pending is None:  # a resume builds them when it loads the state
            self.engine.ready()
            self.train_time = self.wall_time = self.setup_seconds
        else:  # loaded after the algorithms restored the variant
            self._load_resumed(pending)
        if self.dist is not None:
            self._check_same_start()

    def _variant(self) -> dict:
        """The current variant, per method its decision ({} for the plain graph)."""
        return self.schedule.decisions() if self.schedule is not None else {}

    def _switch(self, changed: list[Algorithm], initial: bool) -> None:
        """Swap to the schedule's variant, with the parameter changes of the algorithms whose
        decision changed."""
        if self.schedule is None:
            return
        update = ParamUpdate()
        for a in changed:
            update = update.merge(a.on_switch(self.state, initial))
        art = self.schedule.artifacts()
        if art is not self.engine.artifacts or update.params or update.reset_optimizer_for:
            self.engine.swap(art, self.schedule.name(), update)
        self._fit_data(art)
        self._inputs = False  # asked at the next step, from the parameters then (a resume loads them after this)

    def _training_inputs(self):
        """What the variant's training graph reads in place of the images (None: the images)."""
        for a in self.algorithms:
            got = a.training_inputs(self.state)
            if got is not None:
                if len(got) != len(self.data.x_train):
                    raise AccelcError(
                        f"{a.name}: its training inputs have {len(got)} rows for {len(self.data.x_train)} images"
                    )
                return got
        return None

    def _fit_data(self, art) -> None:
        """The data at the spatial size the variant's input has (e.g. a low-resolution stage)."""
        shape = tuple(art.info.input_shape)
        hw = shape[-2:] if len(shape) >= 2 else tuple(self.data_full.shape[1:])
        if hw != tuple(self.data.shape[1:]):
            if hw not in self._resized:
                self._resized[hw] = (
                    self.data_full if hw == tuple(self.data_full.shape[1:]) else self.data_full.resized(hw)
                )
            self.data = self._resized[hw]

    # ------------------------------------------------------------------ loop
    def _bar(self, total: int, label: str, unit: str):
        """A progress bar on stderr (drawn only when :meth:`_bars` says so; removed when done)."""
        return tqdm(
            total=total,
            desc=label,
            unit=unit,
            disable=not self._bars(),
            leave=False,
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def _bars(self) -> bool:
        """Progress bars: asked for, this process writes, and stderr is a terminal (no \\r
        fragments in logs: elsewhere one plain line per epoch)."""
        return bool(self.progress and self.writer and sys.stderr.isatty())

    def _label(self, epoch: int) -> str:
        """``ort epoch 2/5 [rescale:low(s=2) 14x14]``: the variant (and the input size when a
        stage trains at another resolution) of the epoch."""
        variant = self.engine.variant_name
        hw = tuple(self.data.shape[1:])
        extra = [variant] if variant != "base" else []
        if hw != tuple(self.data_full.shape[1:]):
            extra.append(_hw(hw))
        return f"{self.name} epoch {epoch + 1}/{self.epochs}" + (f" [{' '.join(extra)}]" if extra else "")

    def _sample_batch(self):
        """The first batch of the data order at the current input size (this rank's shard)."""
        _, x, y = next(self.data.batches(self.start_epoch, self.batch_size, self.seed))
        if self.dist is not None:
            x, y = self.dist.shard(x, y)
        return x, y

    def _recalibrate_batchnorm(self, artifacts, batches: int, full_size: bool = False) -> dict | None:
        """``state.recalibrate_batchnorm``: the engine's BatchNorm running statistics gathered
        again by forward passes of ``artifacts`` over ``batches`` training batches (the first of
        the data order of the epoch that just trained, continuing into the next epochs' orders when
        it has fewer; at the current input size, or with ``full_size`` at the model's own input
        size, whatever size the current variant trains at: for ``artifacts`` that take it).
        Data-parallel: rank 0 alone runs them, on its shard of each batch (the shard its running
        statistics come from in training); the other ranks get its statistics from the broadcast
        before every evaluation, as after a training epoch. Returns {"batches", "images"}, or None
        when there is nothing to recalibrate."""
        batches = int(batches)
        if batches <= 0:
            return None
        main = self.dist is None or self.dist.is_main
        images = []
        data = self.data_full if full_size else self.data

        def source():
            epoch = self._epoch
            while True:
                for _, x, y in data.batches(epoch, self.batch_size, self.seed):
                    if self.dist is not None:
                        x, y = self.dist.shard(x, y)
                    images.append(len(y))
                    yield x, y
                    if len(images) == batches:
                        return
                epoch += 1

        done = self.engine.recalibrate_batchnorm(artifacts, source() if main else iter(()))
        if done is None:
            return None
        if not main:  # what rank 0 ran (the same batches, by the same rule)
            return {"batches": batches, "images": batches * (self.batch_size // self.dist.world)}
        return {"batches": int(done), "images": int(sum(images))}

    def evaluate(self, label: str = "eval", split: str = "test") -> tuple[float, float]:
        """Loss and accuracy on the test (or validation) split; data-parallel, each rank evaluates
        every world-th batch with rank 0's BatchNorm statistics and the sums are all-reduced."""
        total, correct, loss_sum = 0, 0, 0.0
        if self.dist is not None:
            self.dist.broadcast(self.engine.buffers(), "the BatchNorm statistics broadcast")
        val = split == "val"
        n = len(self.data.x_val if val else self.data.x_test)
        bar = self._bar(n, label, "img")
        batches = self.data.val_batches if val else self.data.test_batches
        for k, (x, y) in enumerate(batches(self.eval_batch_size)):
            if self.dist is not None and not self.dist.owns(k):
                continue
            loss, logits = self.engine.evaluate_batch(x, y)
            loss_sum += loss * len(y)
            correct += _accuracy(logits, y)
            total += len(y)
            bar.update(len(y))
        bar.close()
        if self.dist is not None:
            loss_sum, correct, total = self.dist.sum([loss_sum, correct, total], "the evaluation all-reduce")
        return loss_sum / total, correct / total

    def run(self) -> dict:
        if self.run_dir and self.writer and self.loggers:
            total = (self.epochs - self.start_epoch) * self.data.steps_per_epoch(self.batch_size)
            self.logs = RunLogs(self.run_dir, self.loggers, self.history, total)
        try:
            if self.run_dir and self.writer and self.history:  # resumed
                self._restore_records()
            out = self._run()
        except BaseException:
            if self.logs is not None:
                self.logs.close(quiet=True)
            raise
        if self.logs is not None:
            self.logs.close()
        return out

    def _run(self) -> dict:
        for epoch in range(self.start_epoch, self.epochs):
            self._epoch = epoch
            steps = self.data.steps_per_epoch(self.batch_size)
            label = self._label(epoch)
            loss_sum, correct, seen, train_s = self._train_epoch(epoch, steps, label)
            # what the evaluation reads but training does not (e.g. BatchNorm statistics for the
            # graph the evaluation runs), before every evaluation: any epoch may be the last
            t1 = time.perf_counter()
            for a in self.algorithms:
                a.before_evaluate(self.state, epoch + 1)
            pre_eval_s = time.perf_counter() - t1
            val = {}
            if self.data.x_val is not None:  # what decides (targets, controllers); the test split only reports
                t1 = time.perf_counter()
                val_loss, val_acc = self.evaluate(f"{label} val", split="val")
                val = {"val_loss": val_loss, "val_acc": val_acc, "val_seconds": time.perf_counter() - t1}
            t1 = time.perf_counter()
            test_loss, test_acc = self.evaluate(f"{label} eval")
            eval_s = time.perf_counter() - t1
            self.train_time += train_s + pre_eval_s  # the algorithms' work before evaluation is training's cost
            self.wall_time += train_s + pre_eval_s + eval_s + val.get("val_seconds", 0.0)
            m = {
                "epoch": epoch + 1,
                "config": self.name,
                "variant": self.engine.variant_name,
                "train_loss": loss_sum / max(seen, 1),
                "train_acc": correct / max(seen, 1),
                "test_loss": test_loss,
                "test_acc": test_acc,
                "train_seconds": train_s,
                "eval_seconds": eval_s,
                "images_per_second": seen / train_s if train_s > 0 else None,
                "before_eval_seconds": pre_eval_s,
                "steps": steps,
                "lr": self.lr_now,  # of the epoch's last step
                "train_time": self.train_time,
                "wall_time": self.wall_time,
                "input_hw": list(self.data.shape[1:]),
            }
            m.update(val)
            m.update(self._step_cost(self._ran_with + [(self.engine.artifacts, steps - self._steps_before)]))
            self._end_epoch(epoch, label, m, val)
            if self.stop_when is not None and self.stop_when(m):
                break
        summary = self.summary()
        allreduce = self.engine.allreduce_report() if self.dist is not None else None
        if allreduce is not None:
            summary["distributed"] = {"world_size": self.dist.world, "backend": self.dist.backend, **allreduce}
        return summary

    def _train_epoch(self, epoch: int, steps: int, label: str) -> tuple[float, int, int, float]:
        """The epoch's training steps: (loss sum, correct predictions, images, seconds)."""
        bar = self._bar(steps, label, "step")
        self._ran_with, self._steps_before = [], 0
        loss_sum, correct, seen = 0.0, 0, 0
        variant = self.engine.variant_name
        step_m = {"variant": variant, "input_hw": list(self.data.shape[1:]), "train_time": self.train_time}
        t0 = time.perf_counter()
        ts = t0
        for step, idx in self.data.batch_indices(epoch, self.batch_size, self.seed):
            n_global = len(idx)
            if not self.lr_schedule.constant:  # this step's rate: its place in the budget of epochs
                self.lr_now = self.base_lr * self.lr_schedule.factor(epoch * steps + step, self.epochs * steps)
                self.engine.set_lr(self.lr_now)
            if self.algorithms:
                self._before_step(epoch, step, steps)
            if self._inputs is False:  # the variant changed: what does it train on?
                self._inputs = self._training_inputs()
            x, y = (self.data.x_train if self._inputs is None else self._inputs)[idx], self.data.y_train[idx]
            if self.dist is not None:  # this rank's shard; the step's loss comes back averaged
                x, y = self.dist.shard(x, y)
            result = self.engine.train_step(x, y)
            loss, logits = result.loss, result.logits
            if not math.isfinite(loss):
                bar.close()
                last = self.history[-1]["epoch"] if self.history else None
                raise NonFiniteLoss(
                    f"loss became {loss} at epoch {epoch + 1}, step {step + 1}; training stopped. "
                    + (
                        f"Last good checkpoint: epoch {last} in '{self.run_dir}'"
                        if last and self.checkpoints
                        else "No checkpoint was written yet"
                    )
                    + " (lower --lr?)"
                )
            loss_sum += loss * n_global
            if logits is not None:
                correct += _accuracy(logits, y)
            seen += n_global
            for a in self.algorithms:
                a.on_step(self.state, step, result)
            now = time.perf_counter()
            if self.logs is not None:
                step_m["train_time"] = self.train_time + (now - t0)
                self.logs.step(epoch + 1, step + 1, step + 1 == steps, loss, n_global, now - ts, step_m)
            if not bar.disable:
                bar.set_postfix_str(f"loss {loss:.4f}, {seen / max(now - t0, 1e-9):.0f} img/s", refresh=False)
                bar.update(1)
            ts = now
        train_s = time.perf_counter() - t0
        bar.close()
        if self.dist is not None:  # every rank's correct predictions
            correct = int(self.dist.sum([correct], "the accuracy all-reduce")[0])
        return loss_sum, correct, seen, train_s

    def _before_step(self, epoch: int, step: int, steps: int) -> None:
        """The algorithms see the step about to run: a decision they change switches the variant
        now (same input shape), and their per-parameter learning-rate scales apply to this step."""
        st = self.state
        st.step, st.steps_per_epoch, st.lr = epoch * steps + step, steps, self.lr_now
        before = [a.decision() for a in self.algorithms]
        for a in self.algorithms:
            a.before_step(st, epoch + 1, step)
        changed = [a for a, k in zip(self.algorithms, before) if a.decision() != k]
        if changed:
            shape = tuple(self.engine.artifacts.info.input_shape)
            self._ran_with.append((self.engine.artifacts, step - self._steps_before))
            self._steps_before = step
            self._switch(changed, initial=False)
            if tuple(self.engine.artifacts.info.input_shape) != shape:
                raise AccelcError(
                    f"{', '.join(a.name for a in changed)}: a decision taken before a step changed the "
                    f"input's shape (from {list(shape)}); only an epoch's end may"
                )
            self._lr_scales = None  # the new variant's tensors take them again
        scales: dict[str, float] = {}
        for a in self.algorithms:
            for name, k in (a.lr_scales(st) or {}).items():
                scales[name] = scales.get(name, 1.0) * float(k)
        if scales != self._lr_scales and (scales or self._lr_scales):
            self.engine.set_lr_scales(scales)
        self._lr_scales = scales

    def _end_epoch(self, epoch: int, label: str, m: dict, val: dict) -> None:
        """The algorithms see the epoch (and may switch the variant); its record is kept, shown
        and written."""
        line = (
            (
                f"{label}: loss {m['train_loss']:.4f} train {m['train_acc']:.4f} "
                + (f"val {val['val_acc']:.4f} " if val else "")
                + f"test {m['test_acc']:.4f} ({m['train_seconds']:.1f}s train, {m['eval_seconds']:.1f}s eval, "
                f"{m['images_per_second']:.0f} img/s)"
            )
            if self.progress and self.writer
            else ""
        )
        before = [a.decision() for a in self.algorithms]
        for a in self.algorithms:  # every algorithm sees the epoch that ran, then the switch
            a.on_epoch_end(self.state, epoch + 1, dict(m))
        # data-parallel: every rank carries rank 0's decisions (and the state behind them)
        agree = self._sync_algorithms() if self.dist is not None and self.algorithms else None
        logged, decisions = self.state.logger.take()
        m.update(logged)
        if agree is not None:
            m["ranks_agree"] = agree
        m["decisions"] = decisions
        changed = [a for a, k in zip(self.algorithms, before) if a.decision() != k]
        if changed:
            self._switch(changed, initial=False)
        self.history.append(m)
        if self.progress and self.writer:
            print(line, file=sys.stderr)
            for d in decisions:
                print(f"  [{d['controller']}] {d['action']}: {d['why']}", file=sys.stderr)
            if len(self.history) == 1:
                print(f"  [engine] {engine_line(self.engine.engine_report())}", file=sys.stderr)
        if self.run_dir and self.writer:
            self._write_epoch(epoch)

    def _sync_algorithms(self) -> bool:
        """Rank 0's controller state on every rank, so every rank makes the same switch at the
        same step (sent as JSON). Returns whether all ranks had decided the same on their own."""
        mine = [a.decision() for a in self.algorithms]
        states = self.dist.broadcast_json(
            {a.name: a.state_dict() for a in self.algorithms}, "the controllers' broadcast"
        )
        if not self.dist.is_main:
            for a in self.algorithms:
                a.load_state_dict(states[a.name])
        # whether every rank had come to rank 0's decisions on its own (they see the same averaged
        # gradients and evaluation): recorded per epoch as a check; rank 0's apply either way
        differ = int(any(a.decision() != d for a, d in zip(self.algorithms, mine)))
        return self.dist.sum([differ], "the controllers' check")[0] == 0
