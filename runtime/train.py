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

from ..compiler.errors import AccelcError, atomic_write_text
from . import checkpoint as ckpt
from .controllers import Controller, Variant
from .data import Dataset, load_data


def _merge_variants(vs: list) -> Variant:
    """Several controllers asked for a swap after one epoch. The last variant was built after every
    decision (with a shared Composer it carries all of them); parameter replacements and optimizer
    resets of the earlier ones (a rescale switch) are kept."""
    if len(vs) == 1:
        return vs[0]
    last = vs[-1]
    params, reset = {}, []
    for v in vs:
        params.update(v.params or {})
        reset += [p for p in (v.reset_optimizer_for or []) if p not in reset]
    # apply_variant reads the spatial size from the artifacts' info; data_hw matters only without it
    hw = last.data_hw
    if hw is None and getattr(last.artifacts, "info", None) is None:
        hw = next((v.data_hw for v in reversed(vs) if v.data_hw), None)
    return Variant(name=" + ".join(v.name for v in vs), artifacts=last.artifacts, params=params or None,
                   reset_optimizer_for=reset or None, data_hw=hw, info={k: v for x in vs for k, v in x.info.items()})


def _accuracy(logits: np.ndarray, y: np.ndarray) -> int:
    return int((np.asarray(logits).argmax(axis=1) == y).sum())


class NonFiniteLoss(AccelcError):
    pass


class Trainer:
    """Runs epochs of one engine (ORT TrainingSession or TorchSession) with controllers."""

    def __init__(self, engine, data: Dataset, run_dir, epochs: int, batch_size: int, seed: int = 0,
                 controllers: list[Controller] | None = None, resume: bool = False, progress: bool = True,
                 name: str = "ort", eval_batch_size: int = 500, checkpoints: bool = True,
                 variant_loader=None):
        if epochs <= 0:
            raise AccelcError(f"--epochs must be positive, got {epochs}")
        if batch_size <= 0 or batch_size > len(data.x_train):
            raise AccelcError(f"--batch-size must be in 1..{len(data.x_train)}, got {batch_size}")
        self.engine, self.data_full, self.data = engine, data, data
        self.run_dir = Path(run_dir) if run_dir else None
        self.epochs, self.batch_size, self.seed = epochs, batch_size, seed
        self._cost_of: tuple = (None, {})  # (artifacts, cost-model FLOPs/bytes per step of that variant)
        self.controllers = controllers or []
        self.progress, self.name = progress, name
        self.eval_batch_size = eval_batch_size
        self.checkpoints = checkpoints and self.run_dir is not None
        self.history: list[dict] = []
        self.start_epoch = 0
        self.train_time = 0.0
        self.wall_time = 0.0
        self.variant: Variant | None = None
        self._resized: dict = {}
        self._pending_arrays = None
        if resume and self.run_dir and ckpt.exists(self.run_dir):
            self._resume()
        for c in self.controllers:
            v = c.on_train_start(self)
            if v is not None and (self.variant is None or v.name != self.variant.name):
                self.apply_variant(v, initial=True)
        if resume and self.run_dir and self._pending_arrays is not None:
            self.engine.load_state_arrays(self._pending_arrays)
        self._pending_arrays = None

    def _resume(self) -> None:
        arrays, meta = ckpt.load(self.run_dir)
        self.history = meta["history"]
        self.start_epoch = meta["epoch"] + 1
        self.train_time = meta["train_time"]
        self.wall_time = meta["wall_time"]
        for c in self.controllers:
            c.load_state(meta["controllers"].get(c.name, {}))
        self._pending_arrays = arrays  # loaded after controllers restore the variant

    # ------------------------------------------------------------------ variants
    def apply_variant(self, v: Variant, initial: bool = False) -> None:
        if hasattr(self.engine, "swap"):
            self.engine.swap(v.artifacts, name=v.name, params=v.params, reset_optimizer_for=v.reset_optimizer_for)
        self.variant = v
        info = getattr(v.artifacts, "info", None)
        if v.data_hw:
            hw = tuple(v.data_hw)
        elif info is not None and len(info.input_shape) >= 2:  # e.g. a skip variant of the low-res stage
            hw = tuple(info.input_shape[-2:])
        else:
            hw = tuple(self.data_full.shape[1:])
        if hw != tuple(self.data.shape[1:]):
            if hw not in self._resized:
                self._resized[hw] = (self.data_full if hw == tuple(self.data_full.shape[1:])
                                     else self.data_full.resized(hw))
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
        from tqdm import tqdm
        for epoch in range(self.start_epoch, self.epochs):
            steps = self.data.steps_per_epoch(self.batch_size)
            bar = tqdm(total=steps, desc=f"{self.name} epoch {epoch + 1}/{self.epochs}", unit="step",
                       disable=not self.progress, leave=False, file=sys.stderr, dynamic_ncols=True)
            loss_sum, correct, seen = 0.0, 0, 0
            t0 = time.perf_counter()
            for step, x, y in self.data.batches(epoch, self.batch_size, self.seed):
                loss, logits = self.engine.train_step(x, y)
                if not math.isfinite(loss):
                    bar.close()
                    last = self.history[-1]["epoch"] if self.history else None
                    raise NonFiniteLoss(
                        f"loss became {loss} at epoch {epoch + 1}, step {step + 1}; training stopped. "
                        + (f"Last good checkpoint: epoch {last} in '{self.run_dir}'" if last and self.checkpoints
                           else "No checkpoint was written yet") + " (lower --lr?)")
                loss_sum += loss * len(y)
                if logits is not None:
                    correct += _accuracy(logits, y)
                seen += len(y)
                for c in self.controllers:
                    c.on_step(self, step, loss)
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
            m = {"epoch": epoch + 1, "config": self.name, "variant": getattr(self.variant, "name", "base"),
                 "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                 "test_loss": test_loss, "test_acc": test_acc, "train_seconds": train_s, "eval_seconds": eval_s,
                 "images_per_second": seen / train_s if train_s > 0 else None, "steps": steps,
                 "train_time": self.train_time, "wall_time": self.wall_time,
                 "input_hw": list(self.data.shape[1:])}
            m.update(self._step_cost())
            decisions = []
            pending = []
            for c in self.controllers:  # every controller sees the epoch that ran, then the swap
                n0 = len(c.log)
                v = c.on_epoch_end(epoch + 1, m, self)
                decisions += c.log[n0:]
                if v is not None:
                    pending.append(v)
            if pending:
                self.apply_variant(_merge_variants(pending))
            m["decisions"] = decisions
            self.history.append(m)
            if self.progress:
                print(f"{self.name} epoch {epoch + 1}: loss {m['train_loss']:.4f} train {m['train_acc']:.4f} "
                      f"test {test_acc:.4f} ({train_s:.1f}s train, {eval_s:.1f}s eval, "
                      f"{m['images_per_second']:.0f} img/s)", file=sys.stderr)
                for d in decisions:
                    print(f"  [{d['controller']}] {d['action']}: {d['why']}", file=sys.stderr)
            if self.run_dir:
                self._write_epoch(epoch)
        return self.summary()

    def _write_epoch(self, epoch: int) -> None:
        lines = "".join(json.dumps(h) + "\n" for h in self.history)
        atomic_write_text(self.run_dir / "metrics.jsonl", lines)
        if self.checkpoints:
            meta = {"epoch": epoch, "history": self.history, "train_time": self.train_time,
                    "wall_time": self.wall_time, "seed": self.seed, "batch_size": self.batch_size,
                    "variant": getattr(self.variant, "name", "base"),
                    "controllers": {c.name: c.state() for c in self.controllers},
                    "data_position": {"next_epoch": epoch + 1, "next_step": 0}}
            ckpt.save(self.run_dir, self.engine.state_arrays(), meta)

    def _step_cost(self) -> dict:
        """Cost-model FLOPs and bytes of one training step of the variant that ran this epoch
        (reuse nodes at their remain-ratio-1 bound; the reuse controller reports its savings)."""
        art = getattr(self.engine, "artifacts", None)
        if art is None:
            return {}
        if self._cost_of[0] is not art:  # computed once per variant
            cost = {}
            try:
                from ..compiler.compile import training_graph
                from ..compiler.cost import graph_costs
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
            "config": self.name, "epochs": len(h), "batch_size": self.batch_size, "seed": self.seed,
            "final_test_acc": h[-1]["test_acc"] if h else None,
            "best_test_acc": best["test_acc"] if best else None, "best_epoch": best["epoch"] if best else None,
            "train_time": self.train_time, "wall_time": self.wall_time,
            "mean_images_per_second": float(np.mean([m["images_per_second"] for m in h])) if h else None,
            "decisions": [d for m in h for d in m.get("decisions", [])],
            "controllers": {c.name: c.report() for c in self.controllers if hasattr(c, "report")},
            "history": h,
        }


def machine_info() -> dict:
    import onnxruntime
    import torch
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}


def plot_run(history: list[dict], path: Path, title: str = "") -> None:
    import matplotlib
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
            raise AccelcError(f"run directory '{run_dir}' is not empty (use --resume to continue or --force to replace)")
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


def train(artifact_dir, data: str = "synthetic", epochs: int = 3, batch_size: int = 64, run_dir="run",
          device: str = "cpu", seed: int = 0, resume: bool = False, lr: float | None = None,
          threads: int | None = None, train_limit: int | None = None, test_limit: int | None = None,
          force: bool = False, progress: bool = True, controllers: list | None = None) -> dict:
    """Train compiled artifacts; returns the summary (also written to RUN_DIR/summary.json)."""
    from .session import TrainingSession
    from .plan import controllers_for
    session = TrainingSession(artifact_dir, device=device, lr=lr, threads=threads)
    ds = load_data(data, session.info.input_shape, session.info.num_classes, train_limit, test_limit)
    if controllers is None:
        controllers = controllers_for(artifact_dir, session)
    created = not Path(run_dir).exists()
    rd = prepare_run_dir(run_dir, resume, force)
    try:
        trainer = Trainer(session, ds, rd, epochs, batch_size, seed, controllers, resume=resume, progress=progress,
                          name="ort")
    except BaseException:
        if created and not any(rd.iterdir()):
            rd.rmdir()
        raise
    summary = trainer.run()
    summary.update({"artifacts": Path(artifact_dir).name, "data": data.split(":")[0], "device": device,
                    "machine": machine_info()})
    atomic_write_text(rd / "summary.json", json.dumps(summary, indent=1))
    if trainer.history:
        plot_run(trainer.history, rd / "curves.png", f"accelc train — {Path(artifact_dir).name}")
    return summary


# ----------------------------------------------------------------------------- CLI
def add_train_args(p) -> None:
    p.add_argument("artifacts", help="artifact directory made by accelc compile")
    p.add_argument("--data", default="synthetic", help="synthetic[:N] | fashion-mnist[:DIR] | imagefolder:DIR (default synthetic)")
    p.add_argument("--epochs", type=int, default=3, help="epochs to train (default 3)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size (default 64)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (needs the gpu extra)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order (default 0)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the one compiled in)")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: all cores)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR's last checkpoint")
    p.add_argument("--force", action="store_true", help="replace a non-empty RUN_DIR")
    p.add_argument("-o", "--output", default="run", help="run directory (default ./run)")


WORKER_ENV = "ACCELC_TRAIN_WORKER"


def _supervise(argv: list[str], run_dir: Path) -> int:
    """Run the training in a child process so a native crash (ORT can die with SIGFPE/SIGSEGV)
    is reported with where it happened and what was saved, never as a silent death."""
    import signal
    import subprocess
    env = dict(os.environ, **{WORKER_ENV: "1"})
    p = subprocess.Popen([sys.executable, "-m", "accelc.compiler.cli"] + argv, env=env)
    try:
        rc = p.wait()
    except KeyboardInterrupt:
        p.send_signal(signal.SIGINT)
        rc = p.wait()
    if rc >= 0:
        return rc
    sig = signal.Signals(-rc).name
    done = []
    if (run_dir / "metrics.jsonl").exists():
        done = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    where = f"during epoch {len(done) + 1}"
    saved = (f"the last good checkpoint is epoch {done[-1]['epoch']} in '{run_dir}' (continue with --resume)"
             if done and ckpt.exists(run_dir) else "no epoch had finished, so nothing was saved")
    raise AccelcError(f"the training process was killed by {sig} {where}"
                      + (" (a native crash inside ONNX Runtime)" if sig in ("SIGFPE", "SIGSEGV", "SIGBUS", "SIGILL",
                                                                          "SIGABRT") else "") + f"; {saved}")


def train_cli(a) -> int:
    if not os.environ.get(WORKER_ENV) and not getattr(a, "in_process", False):
        # validate what can be validated cheaply here, then train in a supervised child
        from ..compiler.compile import load_artifacts
        load_artifacts(a.artifacts)
        if Path(a.output).exists() and any(Path(a.output).iterdir()) and not (a.resume or a.force):
            raise AccelcError(f"run directory '{a.output}' is not empty (use --resume to continue or --force to replace)")
        return _supervise(a.argv, Path(a.output))
    s = train(a.artifacts, a.data, a.epochs, a.batch_size, a.output, a.device, a.seed, a.resume, a.lr, a.threads,
              a.train_limit, a.test_limit, a.force, progress=not a.quiet)
    if not a.quiet:
        print(f"final test accuracy {s['final_test_acc']:.4f} (best {s['best_test_acc']:.4f} at epoch "
              f"{s['best_epoch']}), {s['train_time']:.1f}s training; wrote {a.output}/")
    return 0
