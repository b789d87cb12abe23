"""``accelc train``: the training loop, metrics, checkpoints and resume.

Per epoch it records train loss, train and test accuracy, training and evaluation seconds and
images per second, one JSON object a line in ``RUN_DIR/metrics.jsonl``; ``summary.json`` holds the
run as a whole and ``curves.png`` plots loss and accuracy against training time. A checkpoint is
written atomically after every epoch (parameters, optimizer state, controller state, data-order
position; data order is a pure function of (seed, epoch), so it needs no RNG snapshot).
``--resume`` continues from it and reaches the same final metrics as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..compiler.cost import graph_costs
from ..compiler.errors import AccelcError
from ..compiler.fileio import atomic_write_text
from ..compiler.graph import training_graph
from . import checkpoint as ckpt
from .algorithm import Algorithm, Schedule, TrainState, algorithms_for
from .config import ExecConfig
from .data import Dataset, load_data
from .engine import ParamUpdate


def _accuracy(logits: np.ndarray, y: np.ndarray) -> int:
    return int((np.asarray(logits).argmax(axis=1) == y).sum())


class NonFiniteLoss(AccelcError):
    pass


class Trainer:
    """Runs epochs of one engine (ORT TrainingSession or TorchSession) with training-time
    algorithms (see :mod:`accelc.runtime.algorithm`)."""

    def __init__(
        self,
        engine,
        data: Dataset,
        run_dir,
        epochs: int,
        batch_size: int,
        seed: int = 0,
        algorithms: list[Algorithm] | None = None,
        resume: bool = False,
        progress: bool = True,
        name: str = "ort",
        eval_batch_size: int = 500,
        checkpoints: bool = True,
    ):
        if epochs <= 0:
            raise AccelcError(f"--epochs must be positive, got {epochs}")
        if batch_size <= 0 or batch_size > len(data.x_train):
            raise AccelcError(f"--batch-size must be in 1..{len(data.x_train)}, got {batch_size}")
        self.engine, self.data_full, self.data = engine, data, data
        self.run_dir = Path(run_dir) if run_dir else None
        self.epochs, self.batch_size, self.seed = epochs, batch_size, seed
        self._cost_of: tuple = (None, {})  # (artifacts, cost-model FLOPs/bytes per step of that variant)
        self.algorithms = list(algorithms or [])
        self.state = TrainState(engine, epochs, batch_size)
        for a in self.algorithms:
            a.logger = self.state.logger
        art = getattr(engine, "artifacts", None)
        self.schedule = Schedule(art, self.algorithms) if self.algorithms and art is not None else None
        self.progress, self.name = progress, name
        self.eval_batch_size = eval_batch_size
        self.checkpoints = checkpoints and self.run_dir is not None
        self.history: list[dict] = []
        self.start_epoch = 0
        self.train_time = 0.0
        self.wall_time = 0.0
        self._resized: dict = {}
        pending = None
        if resume and self.run_dir and ckpt.exists(self.run_dir):
            pending = self._resume()
        for a in self.algorithms:
            a.on_train_start(self.state)
        self._switch(self.algorithms, initial=True)
        if pending is not None:  # loaded after the algorithms restored the variant
            self.engine.load_state_arrays(pending)

    def _resume(self) -> dict:
        arrays, meta = ckpt.load(self.run_dir)
        self.history = meta["history"]
        self.start_epoch = meta["epoch"] + 1
        self.train_time = meta["train_time"]
        self.wall_time = meta["wall_time"]
        for a in self.algorithms:
            a.load_state_dict(meta["controllers"].get(a.name, {}))
        return arrays

    # ------------------------------------------------------------------ variants
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
    def evaluate(self) -> tuple[float, float]:
        total, correct, loss_sum = 0, 0, 0.0
        for x, y in self.data.test_batches(self.eval_batch_size):
            loss, logits = self.engine.evaluate_batch(x, y)
            loss_sum += loss * len(y)
            correct += _accuracy(logits, y)
            total += len(y)
        return loss_sum / total, correct / total

    def run(self) -> dict:

        for epoch in range(self.start_epoch, self.epochs):
            steps = self.data.steps_per_epoch(self.batch_size)
            bar = tqdm(
                total=steps,
                desc=f"{self.name} epoch {epoch + 1}/{self.epochs}",
                unit="step",
                disable=not self.progress,
                leave=False,
                file=sys.stderr,
                dynamic_ncols=True,
            )
            loss_sum, correct, seen = 0.0, 0, 0
            t0 = time.perf_counter()
            for step, x, y in self.data.batches(epoch, self.batch_size, self.seed):
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
                loss_sum += loss * len(y)
                if logits is not None:
                    correct += _accuracy(logits, y)
                seen += len(y)
                for a in self.algorithms:
                    a.on_step(self.state, step, result)
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss:.3f}")
            train_s = time.perf_counter() - t0
            bar.close()
            t1 = time.perf_counter()
            test_loss, test_acc = self.evaluate()
            eval_s = time.perf_counter() - t1
            self.train_time += train_s
            self.wall_time += train_s + eval_s
            m = {
                "epoch": epoch + 1,
                "config": self.name,
                "variant": getattr(self.engine, "variant_name", "base"),
                "train_loss": loss_sum / max(seen, 1),
                "train_acc": correct / max(seen, 1),
                "test_loss": test_loss,
                "test_acc": test_acc,
                "train_seconds": train_s,
                "eval_seconds": eval_s,
                "images_per_second": seen / train_s if train_s > 0 else None,
                "steps": steps,
                "train_time": self.train_time,
                "wall_time": self.wall_time,
                "input_hw": list(self.data.shape[1:]),
            }
            m.update(self._step_cost())
            before = [a.decision() for a in self.algorithms]
            for a in self.algorithms:  # every algorithm sees the epoch that ran, then the switch
                a.on_epoch_end(self.state, epoch + 1, dict(m))
            logged, decisions = self.state.logger.take()
            m.update(logged)
            m["decisions"] = decisions
            changed = [a for a, k in zip(self.algorithms, before) if a.decision() != k]
            if changed:
                self._switch(changed, initial=False)
            self.history.append(m)
            if self.progress:
                print(
                    f"{self.name} epoch {epoch + 1}: loss {m['train_loss']:.4f} train {m['train_acc']:.4f} "
                    f"test {test_acc:.4f} ({train_s:.1f}s train, {eval_s:.1f}s eval, "
                    f"{m['images_per_second']:.0f} img/s)",
                    file=sys.stderr,
                )
                for d in decisions:
                    print(f"  [{d['controller']}] {d['action']}: {d['why']}", file=sys.stderr)
            if self.run_dir:
                self._write_epoch(epoch)
        return self.summary()

    def _write_epoch(self, epoch: int) -> None:
        lines = "".join(json.dumps(h) + "\n" for h in self.history)
        atomic_write_text(self.run_dir / "metrics.jsonl", lines)
        if self.checkpoints:
            meta = {
                "epoch": epoch,
                "history": self.history,
                "train_time": self.train_time,
                "wall_time": self.wall_time,
                "seed": self.seed,
                "batch_size": self.batch_size,
                "variant": getattr(self.engine, "variant_name", "base"),
                "controllers": {a.name: a.state_dict() for a in self.algorithms},
                "data_position": {"next_epoch": epoch + 1, "next_step": 0},
            }
            ckpt.save(self.run_dir, self.engine.state_arrays(), meta)

    def _step_cost(self) -> dict:
        """Cost-model FLOPs and bytes of one training step of the variant that ran this epoch
        (custom nodes at their passes' compile-time cost bound)."""
        art = getattr(self.engine, "artifacts", None)
        if art is None:
            return {}
        if self._cost_of[0] is not art:  # computed once per variant
            cost = {}
            try:
                c = graph_costs(training_graph(art), art.config.get("optimizer", "adamw"))["total"]
                cost = {"flops_per_step": c["flops"], "bytes_per_step": c["bytes"]}
            except Exception:  # accounting must never stop training
                pass
            self._cost_of = (art, cost)
        return dict(self._cost_of[1])

    def summary(self) -> dict:
        h = self.history
        best = max(h, key=lambda m: m["test_acc"]) if h else None
        return {
            "config": self.name,
            "epochs": len(h),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "final_test_acc": h[-1]["test_acc"] if h else None,
            "best_test_acc": best["test_acc"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "train_time": self.train_time,
            "wall_time": self.wall_time,
            "mean_images_per_second": float(np.mean([m["images_per_second"] for m in h])) if h else None,
            "decisions": [d for m in h for d in m.get("decisions", [])],
            "controllers": {a.name: a.report() for a in self.algorithms},
            "history": h,
        }


def machine_info() -> dict:
    import onnxruntime  # heavy
    import torch  # heavy

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
    }


def plot_run(history: list[dict], path: Path, title: str = "") -> None:
    import matplotlib  # heavy: loaded when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [m["train_time"] for m in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(t, [m["train_loss"] for m in history], "o-", label="train loss")
    ax[0].plot(t, [m["test_loss"] for m in history], "s--", label="test loss")
    ax[0].set_xlabel("training time (s)")
    ax[0].set_ylabel("loss")
    ax[0].legend()
    ax[1].plot(t, [m["train_acc"] for m in history], "o-", label="train acc")
    ax[1].plot(t, [m["test_acc"] for m in history], "s--", label="test acc")
    ax[1].set_xlabel("training time (s)")
    ax[1].set_ylabel("accuracy")
    ax[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def prepare_run_dir(run_dir, resume: bool, force: bool) -> Path:
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise AccelcError(f"run directory '{run_dir}' is a file")
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        if not force:
            raise AccelcError(
                f"run directory '{run_dir}' is not empty (use --resume to continue or --force to replace)"
            )
        shutil.rmtree(run_dir)
    if not run_dir.parent.exists():
        raise AccelcError(f"folder '{run_dir.parent}' does not exist")
    try:
        run_dir.mkdir(exist_ok=True)
    except OSError as e:
        raise AccelcError(f"cannot create run directory '{run_dir}': {e.strerror}") from None
    if not os.access(run_dir, os.W_OK):
        raise AccelcError(f"run directory '{run_dir}' is not writable")
    return run_dir


def train(
    artifact_dir,
    data: str = "synthetic",
    epochs: int = 3,
    batch_size: int = 64,
    run_dir="run",
    config: ExecConfig | None = None,
    seed: int = 0,
    resume: bool = False,
    lr: float | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    force: bool = False,
    progress: bool = True,
    algorithms: list | None = None,
) -> dict:
    """Train compiled artifacts; returns the summary (also written to RUN_DIR/summary.json).
    ``algorithms`` default to those the artifacts' plan asks for."""
    from .session import TrainingSession  # heavy: torch and ORT

    config = config or ExecConfig()
    session = TrainingSession(artifact_dir, config, lr=lr)
    ds = load_data(data, session.info.input_shape, session.info.num_classes, train_limit, test_limit)
    if algorithms is None:
        algorithms = algorithms_for(session.artifacts)
    created = not Path(run_dir).exists()
    rd = prepare_run_dir(run_dir, resume, force)
    try:
        trainer = Trainer(
            session, ds, rd, epochs, batch_size, seed, algorithms, resume=resume, progress=progress, name="ort"
        )
    except BaseException:
        if created and not any(rd.iterdir()):
            rd.rmdir()
        raise
    summary = trainer.run()
    summary.update(
        {
            "artifacts": Path(artifact_dir).name,
            "data": data.split(":")[0],
            "device": config.device,
            "machine": machine_info(),
        }
    )
    atomic_write_text(rd / "summary.json", json.dumps(summary, indent=1))
    if trainer.history:
        plot_run(trainer.history, rd / "curves.png", f"accelc train — {Path(artifact_dir).name}")
    return summary
