"""``accelc train``: the training loop, metrics, checkpoints and resume.

Per epoch it records train loss, train and test accuracy, training and evaluation seconds and
images per second, one JSON object a line in ``RUN_DIR/metrics.jsonl`` (and, with the ``csv``
logger, the same as a table in ``metrics.csv``; per step, the loss and images per second in
``steps.csv``, at most :data:`MAX_STEP_ROWS` rows a run); the ``tensorboard`` logger writes both
to ``RUN_DIR/tensorboard/``. ``summary.json`` holds the run as a whole and ``curves.png`` plots
loss and accuracy against training time, with the variant switches marked. A checkpoint is
written atomically after every epoch (parameters, optimizer state, controller state, data-order
position; data order is a pure function of (seed, epoch), so it needs no RNG snapshot) as
``checkpoint-NNNN.npz``, NNNN the epoch it holds (1-based, as everywhere a user sees epochs).
``--resume`` continues from it and reaches the same final metrics as an uninterrupted run.

Progress bars (training with images per second, the loss of every step and the variant in the
label; evaluation) are drawn only on a terminal; elsewhere one plain line per epoch.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import platform
import re
import shutil
import stat
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..compiler.artifact_dir import load_artifacts
from ..compiler.artifacts import Artifacts
from ..compiler.cost import graph_costs
from ..compiler.errors import AccelcError, show
from ..compiler.fileio import atomic_write_text, check_clearable, recover
from ..compiler.graph import training_graph
from ..compiler.model import check_step_memory
from . import checkpoint as ckpt
from .algorithm import Algorithm, Schedule, TrainState, algorithms_for
from .config import ExecConfig
from .data import Dataset, load_data
from .engine import ParamUpdate
from .runlock import LOCK, RunLock


def _accuracy(logits: np.ndarray, y: np.ndarray) -> int:
    return int((np.asarray(logits).argmax(axis=1) == y).sum())


class NonFiniteLoss(AccelcError):
    pass


LOGGERS = ("csv", "tensorboard")
MAX_STEP_ROWS = 100_000  # steps.csv: beyond this many steps a run logs the mean loss of every k-th step
STEP_COLUMNS = ("epoch", "step", "epoch_step", "loss", "images_per_second", "train_time", "variant", "input_hw")
TB_DIR = "tensorboard"
_TB_FILE = re.compile(r"events\.out\.tfevents\.[\w.-]+")


def check_loggers(loggers) -> tuple[str, ...]:
    """The ``--log`` choices as a tuple (a string may list them comma-separated; ``none``: only
    metrics.jsonl); one line for anything else, and for ``tensorboard`` without its package."""
    if loggers is None:
        return ()
    if isinstance(loggers, str):
        loggers = [x.strip() for x in loggers.split(",") if x.strip()]
    out = []
    for x in loggers:
        if not isinstance(x, str) or (x not in LOGGERS and x != "none"):
            raise AccelcError(f"--log takes {', '.join(LOGGERS)} or none, got {show(x)}")
        if x != "none" and x not in out:
            out.append(x)
    if "tensorboard" in out:
        import importlib.util

        try:
            found = importlib.util.find_spec("tensorboard") is not None
        except Exception:  # a broken install (its spec cannot be read): said when it is loaded
            found = True
        if not found:
            raise AccelcError(
                "--log tensorboard needs the tensorboard package (pip install tensorboard); or use --log csv"
            )
    return tuple(out)


def tensorboard_writer():
    """torch's TensorBoard ``SummaryWriter`` class; one line when it cannot be loaded (a broken or
    incompatible install raises anything on import, e.g. protobuf's TypeError)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # heavy: tensorboard
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise AccelcError(
            f"--log tensorboard: the tensorboard package cannot be loaded ({type(e).__name__}: {show(first, 160)}); "
            "reinstall it (pip install tensorboard) or use --log csv"
        ) from None
    return SummaryWriter


def _quiet_tensorboard_threads() -> None:
    """No traceback from TensorBoard's writer thread (e.g. on a full disk): the writer raises the
    thread's exception again in the training thread at its next write, flush or close, where it
    becomes one line (:meth:`RunLogs._tb`). Other threads' exceptions are printed as before."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "accelc_tensorboard", False):
        return

    def hook(args):
        if args.thread is not None and type(args.thread).__module__.startswith("tensorboard."):
            return
        previous(args)

    hook.accelc_tensorboard = True
    threading.excepthook = hook


def _hw(shape) -> str:
    return "x".join(str(int(v)) for v in shape)


def _csv_value(v):
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v):
        return _hw(v)
    return v


def _write_error(path, e: OSError) -> AccelcError:
    """A write into the run directory that failed (e.g. a full disk), as one line."""
    return AccelcError(f"cannot write '{show(path)}': {e.strerror or e}")


def _open_own(path: Path, flags: int, what: str = "log file") -> int:
    """A file descriptor of a regular file in the run directory, never through a symbolic link
    (a planted link would have accelc write or read elsewhere): one line otherwise."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise AccelcError(
                f"{what} '{show(path)}' is a symbolic link; accelc writes its logs only into files of its own "
                "in the run directory (remove the link)"
            ) from None
        raise _write_error(path, e) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AccelcError(f"{what} '{show(path)}' is not a regular file (remove it)")
    return fd


def _check_own_folder(path: Path) -> None:
    """RUN/tensorboard, when it exists, is a folder of the run directory's own (no symbolic link)."""
    if path.is_symlink():
        raise AccelcError(
            f"'{show(path)}' is a symbolic link; accelc writes TensorBoard events only into a folder of its own "
            "in the run directory (remove the link)"
        )
    if os.path.lexists(path) and not path.is_dir():
        raise AccelcError(f"'{show(path)}' is not a folder (remove it)")


STEPS_CSV = "steps.csv"
MAX_STEP_ROW_BYTES = 1 << 20  # one steps.csv row (a variant names layers) when a resume reads it back
_HW = re.compile(r"\d+(x\d+)*")


def _valid_step_rows(fh, done: int, total: int) -> int | None:
    """How many leading bytes of steps.csv (``fh``, binary) hold rows of the epochs a checkpoint
    holds: the header, then complete rows (a torn last row, without its newline, is not) of epochs
    1..``done`` in order with steps rising up to ``total``; None when the header is not accelc's.
    Read a row at a time, each at most :data:`MAX_STEP_ROW_BYTES`: memory stays bounded whatever
    the file's size, and reading stops at the first row that does not fit (no more than ``total``
    rows are read)."""
    header = (",".join(STEP_COLUMNS) + "\n").encode()
    first = fh.readline(len(header) + 1)
    if first != header:
        return 0 if first == b"" else None
    good, last_epoch, last_step = len(first), 1, 0
    while True:
        row = b""
        while True:  # a quoted field may hold a newline: a row ends at a newline outside quotes
            line = fh.readline(MAX_STEP_ROW_BYTES + 1 - len(row))
            row += line
            if not line.endswith(b"\n") or len(row) > MAX_STEP_ROW_BYTES:
                return good  # the end, a torn row or one too long
            if row.count(b'"') % 2 == 0:
                break
        try:
            f = next(csv.reader([row.decode("utf-8")], strict=True))
            epoch, step, epoch_step = int(f[0]), int(f[1]), int(f[2])
            float(f[3]), float(f[5])
            if f[4]:
                float(f[4])
            ok = (
                len(f) == len(STEP_COLUMNS)
                and last_epoch <= epoch <= done
                and last_step < step <= total
                and epoch_step >= 1
                and _HW.fullmatch(f[7]) is not None
            )
        except (ValueError, IndexError, UnicodeDecodeError, csv.Error, StopIteration):
            ok = False
        if not ok:
            return good
        good, last_epoch, last_step = good + len(row), epoch, step


class RunLogs:
    """The run directory's logs besides metrics.jsonl: ``metrics.csv`` (rewritten atomically from
    the history each epoch), ``steps.csv`` (the epoch's step rows appended before its checkpoint;
    a resume cuts it back to the checkpoint's epoch) and TensorBoard event files (step events
    flushed before the checkpoint, epoch events after it). Only the process that writes the run
    directory makes one. Every file is opened without following symbolic links; a write that
    fails (a full disk) is one line and leaves no torn row."""

    def __init__(self, run_dir: Path, kinds, history: list[dict], total_steps: int):
        self.run_dir, self.kinds = Path(run_dir), tuple(kinds)
        self.stride = max(1, math.ceil(total_steps / MAX_STEP_ROWS))
        self.global_step = sum(int(h.get("steps", 0)) for h in history)
        self.rows: list[dict] = []
        self._pending: list[tuple[float, int, float]] = []  # (loss, images, seconds) since the last row
        self.tb = None
        tb_dir = self.run_dir / TB_DIR
        self.tb_new = not os.path.lexists(tb_dir)  # a resume's TensorBoard folder made now: every epoch goes in
        writer = None
        if "tensorboard" in self.kinds:
            writer = tensorboard_writer()
            _check_own_folder(tb_dir)
        if "csv" in self.kinds:
            self._cut_steps(history)
        if writer is not None:
            made = self.tb_new
            _quiet_tensorboard_threads()
            try:
                # purge_step: events a killed run wrote past the checkpoint (steps after its last) are dropped on resume
                self.tb = writer(str(tb_dir), purge_step=self.global_step + 1 if history else None)
            except Exception as e:
                if made and _tb_foreign(self.run_dir) is None:  # the folder it made, holding its event file only
                    shutil.rmtree(tb_dir, ignore_errors=True)
                raise self._tb_error(e) from None

    def _tb_error(self, e: Exception) -> AccelcError:
        where = show(self.run_dir / TB_DIR)
        if isinstance(e, OSError):
            return AccelcError(f"cannot write TensorBoard events in '{where}': {e.strerror or e}")
        first = str(e).splitlines()[0] if str(e) else ""
        return AccelcError(f"TensorBoard's writer failed in '{where}': {type(e).__name__}: {show(first, 160)}")

    def _tb(self, fn, *args):
        """A call of the TensorBoard writer; what it raises (its thread's error too) is one line."""
        try:
            return fn(*args)
        except Exception as e:
            raise self._tb_error(e) from None

    def _cut_steps(self, history: list[dict]) -> None:
        """steps.csv holding only rows of the epochs the checkpoint holds (rows of an epoch the run
        was killed in, a torn last row and anything after the first row that does not fit go),
        cut in place; what is kept is read a row at a time (:func:`_valid_step_rows`)."""
        path = self.run_dir / STEPS_CSV
        if not os.path.lexists(path):
            return
        done = history[-1]["epoch"] if history else 0
        total = sum(int(h.get("steps", 0)) for h in history)
        fd = _open_own(path, os.O_RDWR)
        try:
            with os.fdopen(fd, "rb", closefd=False) as fh:
                good = _valid_step_rows(fh, done, total)
            if good is None:  # not accelc's columns: a table of its own, started again
                os.ftruncate(fd, 0)
            elif good < os.fstat(fd).st_size:
                os.ftruncate(fd, good)
        except OSError as e:
            raise _write_error(path, e) from None
        finally:
            os.close(fd)

    @staticmethod
    def _csv(columns, rows, header: bool) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        if header:
            w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(v) for k, v in r.items()})
        return buf.getvalue()

    def step(self, epoch: int, epoch_step: int, last: bool, loss: float, images: int, seconds: float, m: dict):
        """One training step (every ``stride``-th, and the epoch's last, becomes a row: the mean
        loss and the images per second since the previous row)."""
        self.global_step += 1
        self._pending.append((loss, images, seconds))
        if self.global_step % self.stride and not last:
            return
        n = sum(p[1] for p in self._pending)
        t = sum(p[2] for p in self._pending)
        row = {
            "epoch": epoch,
            "step": self.global_step,
            "epoch_step": epoch_step,
            "loss": float(np.mean([p[0] for p in self._pending])),
            "images_per_second": n / t if t > 0 else None,
            "train_time": m["train_time"],
            "variant": m["variant"],
            "input_hw": m["input_hw"],
        }
        self._pending = []
        self.rows.append(row)
        if self.tb is not None:
            self._tb(self.tb.add_scalar, "step/loss", row["loss"], self.global_step)
            if row["images_per_second"] is not None:
                self._tb(self.tb.add_scalar, "step/images_per_second", row["images_per_second"], self.global_step)

    def steps_done(self) -> None:
        """Before the epoch's checkpoint: its step rows appended to steps.csv and its step events
        flushed (a resume from an earlier checkpoint cuts them away again), so a kill after the
        checkpoint loses none of them."""
        if "csv" in self.kinds and self.rows:
            self._append_steps()
        self.rows = []
        if self.tb is not None:
            self._tb(self.tb.flush)

    def _append_steps(self) -> None:
        path = self.run_dir / STEPS_CSV
        existed = os.path.lexists(path)
        fd = _open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            size = os.fstat(fd).st_size
            data = memoryview(self._csv(STEP_COLUMNS, self.rows, header=size == 0).encode())
            try:
                while data:
                    data = data[os.write(fd, data) :]
            except OSError as e:  # e.g. a full disk: no torn row left behind
                with contextlib.suppress(OSError):
                    if existed:
                        os.ftruncate(fd, size)
                    else:
                        os.unlink(path)
                raise _write_error(path, e) from None
        finally:
            os.close(fd)

    def epoch_records(self, epochs: list[dict]) -> None:
        """After the checkpoint: TensorBoard's records of ``epochs`` (the one that ended, or on a
        resume those metrics.jsonl lacks)."""
        if self.tb is not None and epochs:
            for m in epochs:
                e = m["epoch"]
                for k in ("train_loss", "test_loss", "train_acc", "test_acc", "images_per_second", "train_time"):
                    if isinstance(m.get(k), (int, float)):
                        self._tb(self.tb.add_scalar, f"epoch/{k}", m[k], e)
                for d in m.get("decisions", []):
                    self._tb(
                        self.tb.add_text, f"decisions/{d['controller']}", f"epoch {e}: {d['action']}: {d['why']}", e
                    )
                self._tb(self.tb.add_text, "variant", f"epoch {e}: {m['variant']} ({_hw(m['input_hw'])})", e)
            self._tb(self.tb.flush)

    def metrics_csv(self, history: list[dict]) -> None:
        if "csv" not in self.kinds:
            return
        columns: list[str] = []
        for h in history:
            columns += [k for k, v in h.items() if k not in columns and _scalar(v)]
        path = self.run_dir / "metrics.csv"
        try:
            atomic_write_text(path, self._csv(columns, history, header=True))
        except OSError as e:
            raise _write_error(path, e) from None

    def close(self, quiet: bool = False) -> None:
        """Flush and close the TensorBoard writer (an error it had is one line, unless ``quiet``:
        another error is already on its way)."""
        tb, self.tb = self.tb, None
        if tb is None:
            return
        try:
            self._tb(tb.flush)
        except AccelcError:
            if not quiet:
                with contextlib.suppress(Exception):
                    tb.close()
                raise
        with contextlib.suppress(Exception):
            tb.close()


def _scalar(v) -> bool:
    return (
        v is None
        or isinstance(v, (int, float, str, bool))
        or (isinstance(v, list) and all(isinstance(x, (int, float)) for x in v))
    )


LOG_FILES = {"csv": ("metrics.csv", STEPS_CSV), "tensorboard": (TB_DIR,)}


def check_resumed_logs(run_dir: Path, loggers) -> None:
    """A resume continues the logs the run has: refused (one line, nothing changed) when the run
    directory holds the files of a logger this resume leaves out -- they would stay behind,
    stale beside metrics.jsonl -- or when a log is a symbolic link or not what accelc writes."""
    for kind, names in LOG_FILES.items():
        for name in names:
            path = run_dir / name
            if name == TB_DIR:
                _check_own_folder(path)
            elif path.is_symlink():
                raise AccelcError(
                    f"log file '{show(path)}' is a symbolic link; accelc writes its logs only into files of its own "
                    "in the run directory (remove the link)"
                )
            elif os.path.lexists(path) and not path.is_file():
                raise AccelcError(f"log file '{show(path)}' is not a regular file (remove it)")
    stale = {
        k: [n for n in names if os.path.lexists(run_dir / n)] for k, names in LOG_FILES.items() if k not in loggers
    }
    stale = {k: v for k, v in stale.items() if v}
    if stale:
        files = [n for v in stale.values() for n in v]
        want = ",".join(k for k in LOGGERS if k in loggers or k in stale)
        them = "it" if len(files) == 1 else "them"
        raise AccelcError(
            f"run directory '{show(run_dir)}' holds {', '.join(files)} of --log {','.join(stale)} from its earlier "
            f"run, which this resume (--log {','.join(loggers) or 'none'}) would leave stale beside metrics.jsonl; "
            f"resume with --log {want} to continue {them}, or move {them} away"
        )


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
        fingerprint: dict | None = None,
        allow_change: set | frozenset = frozenset(),
        artifacts_sha: str | None = None,
        dist=None,
        loggers=("csv",),
    ):
        """``dist``: this process's :class:`~accelc.runtime.distributed.Group` when training
        data-parallel (each rank trains its shard of every batch; only rank 0 writes).
        ``loggers``: logs besides metrics.jsonl, of :data:`LOGGERS` (see :class:`RunLogs`)."""
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
        self.writer = self.dist is None or self.dist.is_main  # only rank 0 writes the run directory
        self.loggers = check_loggers(loggers)
        self.logs: RunLogs | None = None
        self.history: list[dict] = []
        # what a resume must agree with: the run's settings and the artifact set's content
        self.fingerprint = dict(fingerprint or {}, epochs=epochs, batch_size=batch_size, seed=seed)
        self.allow_change = set(allow_change)
        self.artifacts_sha = artifacts_sha
        self.artifacts_dir = None  # recorded in checkpoints (export-run finds the artifacts by it)
        self.start_epoch = 0
        self.train_time = 0.0
        self.wall_time = 0.0
        # stop after an epoch whose metrics satisfy it (bench's --stop-at-target); None: run every epoch
        self.stop_when = None
        self._resized: dict = {}
        pending = None
        if resume and self.run_dir and ckpt.exists(self.run_dir):
            pending = self._resume()
            if self.writer:
                check_resumed_logs(self.run_dir, self.loggers)
        self.state.sample = self._sample_batch
        self.state.recalibrate_batchnorm = self._recalibrate_batchnorm
        self._epoch = self.start_epoch  # the epoch that trains (0-based): recalibration batches come from its order
        t0 = time.perf_counter()
        for a in self.algorithms:
            a.on_train_start(self.state)
        self._switch(self.algorithms, initial=True)
        # what the algorithms spend before the first step (measurements, choosing the first variant)
        # is part of what training costs: counted in the training time of a run that starts here
        self.setup_seconds = time.perf_counter() - t0
        # the sessions of the variant training starts with: built here, whichever it is, and (as a
        # session built before training, for every configuration alike) not counted as training
        ready = getattr(self.engine, "ready", None)
        if ready is not None and pending is None:  # a resume builds them when it loads the state
            ready()
        if pending is None:
            self.train_time = self.wall_time = self.setup_seconds
        if pending is not None:  # loaded after the algorithms restored the variant
            stored = self._resume_meta["variant"]
            variant = self._variant() if isinstance(stored, dict) else getattr(self.engine, "variant_name", "base")
            if stored != variant:
                raise ckpt.CheckpointError(
                    f"the checkpoint in '{show(self.run_dir)}' is of variant {show(ckpt.variant_text(stored))}, "
                    f"its controllers' state gives {show(ckpt.variant_text(variant))}"
                )
            stateful = (getattr(self.engine, "hyper", None) or {}).get("kind", "adamw") != "sgd"
            ckpt.check_against(pending, self.engine.state_arrays(), self.run_dir, stateful)
            self.engine.load_state_arrays(pending)
        if self.dist is not None:
            self._check_same_start()

    def _variant(self) -> dict:
        """The current variant, per method its decision ({} for the plain graph)."""
        return self.schedule.decisions() if self.schedule is not None else {}

    def _check_same_start(self) -> None:
        """Every rank starts from rank 0's epoch, variant, parameters and optimizer state (a rank
        that cannot read rank 0's checkpoint, e.g. a run directory that is not on a file system
        every machine shares, would otherwise train something else silently)."""
        import hashlib

        arrays = self.engine.state_arrays()
        h = hashlib.sha256()
        for k in sorted(arrays):
            h.update(k.encode())
            h.update(np.ascontiguousarray(arrays[k]).tobytes())
        mine = {
            "epoch": self.start_epoch,
            "variant": self._variant(),
            "state": h.hexdigest(),
        }
        main = self.dist.broadcast_json(mine, "the start check")
        bad = int(mine != main)
        if self.dist.sum([bad], "the start check")[0]:
            where = f"'{show(self.run_dir)}'" if self.run_dir else "its run directory"
            raise AccelcError(
                f"rank {self.dist.rank}: the ranks do not start from the same state "
                f"(rank 0: epoch {main['epoch'] + 1}, this rank: epoch {mine['epoch'] + 1}); with --resume every "
                f"rank reads rank 0's checkpoint from {where}, which must be on a file system all machines share"
                if bad
                else "the ranks do not start from the same state: another rank could not read rank 0's checkpoint "
                "(with --resume the run directory must be on a file system all machines share)"
            )

    def _resume(self) -> dict:
        """The verified checkpoint: refused whole (one line) when it is damaged, belongs to other
        artifacts or was written with other settings."""
        arrays, meta = ckpt.load(self.run_dir)
        self._resume_meta = meta
        if self.artifacts_sha and meta["artifacts_sha256"] != self.artifacts_sha:
            raise ckpt.CheckpointError(
                f"the checkpoint in '{show(self.run_dir)}' was trained from other artifacts "
                "(their files differ from the ones given); resume with the same artifact directory"
            )
        ckpt.compare_fingerprint(meta["fingerprint"], self.fingerprint, self.allow_change, self.run_dir)
        if meta["epoch"] + 1 > self.epochs:
            raise ckpt.CheckpointError(
                f"the checkpoint in '{show(self.run_dir)}' is at epoch {meta['epoch'] + 1}, past --epochs {self.epochs}"
            )
        self.history = meta["history"]
        self.start_epoch = meta["epoch"] + 1
        self.train_time = float(meta["train_time"])
        self.wall_time = float(meta["wall_time"])
        controllers = meta["controllers"]
        names = sorted(a.name for a in self.algorithms)
        if sorted(controllers) != names:
            raise ckpt.CheckpointError(
                f"the checkpoint in '{show(self.run_dir)}' holds state of controllers "
                f"{show(', '.join(sorted(controllers)) or 'none')}; this run has {show(', '.join(names) or 'none')}"
            )
        for a in self.algorithms:
            try:
                a.load_state_dict(controllers[a.name])
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
                raise ckpt.CheckpointError(
                    f"controller state of {show(a.name)} in '{show(self.run_dir / ckpt.META)}' is malformed "
                    f"({type(e).__name__})"
                ) from None
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
        variant = getattr(self.engine, "variant_name", "base")
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

    def _recalibrate_batchnorm(self, artifacts, batches: int) -> dict | None:
        """``state.recalibrate_batchnorm``: the engine's BatchNorm running statistics gathered
        again by forward passes of ``artifacts`` over ``batches`` training batches (the first of
        the data order of the epoch that just trained, continuing into the next epochs' orders when
        it has fewer; at the current input size). Data-parallel: rank 0 alone runs them, on its
        shard of each batch (the shard its running statistics come from in training); the other
        ranks get its statistics from the broadcast before every evaluation, as after a training
        epoch. Returns {"batches", "images"}, or None when there is nothing to recalibrate."""
        fn = getattr(self.engine, "recalibrate_batchnorm", None)
        batches = int(batches)
        if fn is None or batches <= 0:
            return None
        main = self.dist is None or self.dist.is_main
        images = []

        def source():
            epoch = self._epoch
            while True:
                for _, x, y in self.data.batches(epoch, self.batch_size, self.seed):
                    if self.dist is not None:
                        x, y = self.dist.shard(x, y)
                    images.append(len(y))
                    yield x, y
                    if len(images) == batches:
                        return
                epoch += 1

        done = fn(artifacts, source() if main else iter(()))
        if done is None:
            return None
        if not main:  # what rank 0 ran (the same batches, by the same rule)
            return {"batches": batches, "images": batches * (self.batch_size // self.dist.world)}
        return {"batches": int(done), "images": int(sum(images))}

    def evaluate(self, label: str = "eval", split: str = "test") -> tuple[float, float]:
        """Loss and accuracy on the test (or validation) split; data-parallel, each rank evaluates
        every world-th batch with rank 0's BatchNorm statistics and the sums are all-reduced."""
        total, correct, loss_sum = 0, 0, 0.0
        if self.dist is not None and getattr(self.engine, "buffers", None):
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
            bar = self._bar(steps, label, "step")
            loss_sum, correct, seen = 0.0, 0, 0
            variant = getattr(self.engine, "variant_name", "base")
            step_m = {"variant": variant, "input_hw": list(self.data.shape[1:]), "train_time": self.train_time}
            t0 = time.perf_counter()
            ts = t0
            for step, x, y in self.data.batches(epoch, self.batch_size, self.seed):
                n_global = len(y)
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
                "variant": getattr(self.engine, "variant_name", "base"),
                "train_loss": loss_sum / max(seen, 1),
                "train_acc": correct / max(seen, 1),
                "test_loss": test_loss,
                "test_acc": test_acc,
                "train_seconds": train_s,
                "eval_seconds": eval_s,
                "images_per_second": seen / train_s if train_s > 0 else None,
                "before_eval_seconds": pre_eval_s,
                "steps": steps,
                "train_time": self.train_time,
                "wall_time": self.wall_time,
                "input_hw": list(self.data.shape[1:]),
            }
            m.update(val)
            m.update(self._step_cost())
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
                print(
                    f"{label}: loss {m['train_loss']:.4f} train {m['train_acc']:.4f} "
                    + (f"val {val['val_acc']:.4f} " if val else "")
                    + f"test {test_acc:.4f} ({train_s:.1f}s train, {eval_s:.1f}s eval, "
                    f"{m['images_per_second']:.0f} img/s)",
                    file=sys.stderr,
                )
                for d in decisions:
                    print(f"  [{d['controller']}] {d['action']}: {d['why']}", file=sys.stderr)
                if len(self.history) == 1:
                    print(f"  [engine] {engine_line(self.engine.engine_report())}", file=sys.stderr)
            if self.run_dir and self.writer:
                self._write_epoch(epoch)
            if self.stop_when is not None and self.stop_when(m):
                break
        summary = self.summary()
        reducer = getattr(self.engine, "reducer", None)
        if self.dist is not None and reducer is not None:
            summary["distributed"] = {
                "world_size": self.dist.world,
                "backend": self.dist.backend,
                **reducer.stats(),
                "allreduce_alone_ms": reducer.measure(),
            }
        return summary

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

    def _write_epoch(self, epoch: int) -> None:
        # the epoch's step rows first (a resume cuts rows past its checkpoint), then the
        # checkpoint, then the records of the history it holds: metrics.jsonl never names an epoch
        # whose checkpoint is not on disk, and a resume restores what a kill after it lost
        if self.logs is not None:
            self.logs.steps_done()
        if self.checkpoints:
            meta = {
                "epoch": epoch,
                "history": self.history,
                "train_time": self.train_time,
                "wall_time": self.wall_time,
                "fingerprint": self.fingerprint,
                "artifacts_sha256": self.artifacts_sha,
                "artifacts_dir": self.artifacts_dir,
                "variant": self._variant(),
                "controllers": {a.name: a.state_dict() for a in self.algorithms},
                "data_position": {"next_epoch": epoch + 1, "next_step": 0},
            }
            try:
                ckpt.save(self.run_dir, self.engine.state_arrays(), meta)
            except OSError as e:
                raise AccelcError(
                    f"cannot write the checkpoint of epoch {epoch + 1} in '{show(self.run_dir)}': {e.strerror or e}"
                    + (f" (the one of epoch {epoch} is kept)" if epoch and ckpt.exists(self.run_dir) else "")
                ) from None
        self._write_records(self.history[-1:])

    def _write_records(self, tb_epochs: list[dict]) -> None:
        """What the history gives: TensorBoard's epoch records of ``tb_epochs``, metrics.jsonl and
        metrics.csv (in this order: an epoch in metrics.jsonl is in TensorBoard)."""
        if self.logs is not None:
            self.logs.epoch_records(tb_epochs)
        path = self.run_dir / "metrics.jsonl"
        try:
            atomic_write_text(path, "".join(json.dumps(h) + "\n" for h in self.history))
        except OSError as e:
            raise _write_error(path, e) from None
        if self.logs is not None:
            self.logs.metrics_csv(self.history)

    def _restore_records(self) -> None:
        """On a resume: metrics.jsonl and metrics.csv as the checkpoint's history gives them, and
        TensorBoard's records of the epochs metrics.jsonl lacked (a kill between the checkpoint
        and these records loses nothing)."""
        lines = [(json.dumps(h) + "\n").encode() for h in self.history]
        have = b""
        try:
            fd = os.open(self.run_dir / "metrics.jsonl", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            fd = None
        if fd is not None:
            with os.fdopen(fd, "rb") as fh:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    have = fh.read(sum(map(len, lines)))  # at most what the history gives
        logged = 0
        for line in lines:
            if not have.startswith(line):
                break
            have, logged = have[len(line) :], logged + 1
        self._write_records(self.history if self.logs is not None and self.logs.tb_new else self.history[logged:])

    def _step_cost(self) -> dict:
        """Cost-model FLOPs and bytes of one training step of the variant that ran this epoch
        (custom nodes at their expected values; flops_bound holds the bound)."""
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
            "final_val_acc": h[-1].get("val_acc") if h else None,
            "best_val_acc": max((m["val_acc"] for m in h if "val_acc" in m), default=None),
            "train_time": self.train_time,
            "wall_time": self.wall_time,
            "setup_seconds": self.setup_seconds,
            "mean_images_per_second": float(np.mean([m["images_per_second"] for m in h])) if h else None,
            "decisions": [d for m in h for d in m.get("decisions", [])],
            "controllers": {a.name: a.report() for a in self.algorithms},
            "engine": self.engine.engine_report(),
            "history": h,
        }


def engine_line(rep: dict) -> str:
    """One line on where a step ran: accelc's kernels, and what fell back to ORT at what cost."""
    if "engine" in rep:
        return str(rep["engine"])
    if not rep.get("kernel_nodes"):
        return "the whole step on ORT (one session)"
    line = f"{rep['kernel_nodes']} nodes on accelc's kernels"
    if rep.get("ort_segments"):
        ops = ", ".join(f"{k}×{v}" for k, v in sorted(rep.get("fell_back", {}).items()))
        ms = rep.get("ort_ms_per_step")
        line += f"; {rep['ort_segments']} ORT segment(s) for {ops}" + (f" ({ms:.1f} ms/step)" if ms is not None else "")
    else:
        line += ", no ORT in the step"
    return line


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


def _switches(history: list[dict]) -> list[tuple[float, str]]:
    """(training time at the start of the epoch, its variant and input size) wherever the variant
    or the input size differs from the previous epoch's, the first epoch included when it is not
    the plain graph at full size."""
    out, prev = [], ("base", None)
    full = max((tuple(m.get("input_hw") or ()) for m in history), default=())
    for i, m in enumerate(history):
        cur = (m.get("variant", "base"), tuple(m.get("input_hw") or ()))
        if cur != prev and (i or cur[0] != "base" or cur[1] != full):
            start = history[i - 1]["train_time"] if i else 0.0
            hw = f" {_hw(cur[1])}" if cur[1] and cur[1] != full else ""
            out.append((start, f"{cur[0]}{hw}"))
        prev = cur
    return out


def plot_run(history: list[dict], path: Path, title: str = "") -> None:
    """Loss and accuracy against training time, each variant switch a dotted vertical line with
    the variant's name (a controller's decision, a resolution stage)."""
    import matplotlib  # heavy: loaded when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [m["train_time"] for m in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(t, [m["train_loss"] for m in history], "o-", color="C0", label="train loss")
    ax[0].plot(t, [m["test_loss"] for m in history], "s--", color="C1", label="test loss")
    ax[0].set_xlabel("training time (s)")
    ax[0].set_ylabel("loss")
    ax[1].plot(t, [m["train_acc"] for m in history], "o-", color="C0", label="train acc")
    ax[1].plot(t, [m["test_acc"] for m in history], "s--", color="C1", label="test acc")
    ax[1].set_xlabel("training time (s)")
    ax[1].set_ylabel("accuracy")
    for a in ax:
        a.set_xlim(left=0)
        for x, name in _switches(history):
            a.axvline(x, color="0.5", linestyle=":", linewidth=1)
            a.annotate(
                name,
                (x, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -2),
                textcoords="offset points",
                rotation=90,
                va="top",
                ha="left",
                fontsize=7,
                color="0.35",
            )
        a.legend(loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


RUN_FILES = ("metrics.jsonl", "metrics.csv", "steps.csv", ckpt.META, "summary.json", "curves.png", TB_DIR)


def _is_run_file(name: str) -> bool:
    """A name ``accelc train`` writes in a run directory (outputs, checkpoints, their temporaries)."""
    if name in RUN_FILES or name == LOCK or re.fullmatch(r"checkpoint-\d{4,9}\.npz", name):
        return True
    m = re.fullmatch(r"\.(.+)\.tmp-\d+-.*", name)
    return bool(m) and _is_run_file(m.group(1))


def open_run_dir(run_dir, resume: bool, force: bool, lock_fd: int | None = None, protect=()) -> tuple[Path, RunLock]:
    """Create or reuse the run directory and lock it (one writer per run directory).

    Not empty: needs ``resume`` (continue from its checkpoint) or ``force`` (start again: its
    contents are removed, which is only done when everything in it is something accelc train
    writes, and it holds none of ``protect``, the run's inputs). ``lock_fd``: the lock a
    supervising parent already holds. A refusal leaves the folder as it was.
    """
    if resume and force:
        raise AccelcError("--resume continues a run and --force starts it again: give one of them")
    run_dir = Path(os.path.abspath(run_dir))
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise AccelcError(f"run directory '{show(run_dir)}' is not a folder")
    if not run_dir.parent.is_dir():
        raise AccelcError(f"folder '{show(run_dir.parent)}' does not exist")
    created = not run_dir.exists()
    had_lock = os.path.lexists(run_dir / LOCK)
    try:
        run_dir.mkdir(exist_ok=True)
    except OSError as e:
        raise AccelcError(f"cannot create run directory '{show(run_dir)}': {e.strerror}") from None
    if not os.access(run_dir, os.W_OK):
        raise AccelcError(f"run directory '{show(run_dir)}' is not writable")
    try:
        lock = RunLock.acquire(run_dir) if lock_fd is None else RunLock.inherited(lock_fd, run_dir)
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    lock.created, lock.created_file = created, not had_lock
    try:
        recover_run_dir(run_dir)
        content = sorted(f.name for f in run_dir.iterdir() if f.name != LOCK)
        if content and not resume:
            if not force:
                raise AccelcError(
                    f"run directory '{show(run_dir)}' is not empty (use --resume to continue or --force to replace)"
                )
            _check_clear(run_dir, content, protect)
            for name in content:
                f = run_dir / name
                if f.is_dir() and not f.is_symlink():
                    shutil.rmtree(f)
                else:
                    f.unlink()
        if resume and not ckpt.exists(run_dir):
            outputs = [n for n in content if _is_run_file(n)]
            if outputs:
                raise AccelcError(
                    f"run directory '{show(run_dir)}' has no {ckpt.META} to resume from (it holds "
                    f"{show(outputs[0])}); use --force to start the run again"
                )
    except BaseException:
        release_run_dir(run_dir, lock, created)
        raise
    return run_dir, lock


def _tb_foreign(run_dir: Path) -> str | None:
    """A name in RUN_DIR/tensorboard that is not an event file accelc train writes (or the folder
    itself when it is not one), so --force never deletes a folder of the user's by its name."""
    d = run_dir / TB_DIR
    if not os.path.lexists(d):
        return None
    if d.is_symlink() or not d.is_dir():
        return TB_DIR
    for f in d.iterdir():
        if f.is_symlink() or not f.is_file() or not _TB_FILE.fullmatch(f.name):
            return f"{TB_DIR}/{f.name}"
    return None


def _check_clear(run_dir: Path, content: list[str], protect) -> None:
    check_clearable(run_dir, protect, "run directory")
    foreign = [n for n in content if not _is_run_file(n)]
    tb = _tb_foreign(run_dir) if TB_DIR in content else None
    if tb is not None:
        foreign.insert(0, tb)
    if foreign:
        raise AccelcError(
            f"run directory '{show(run_dir)}' holds '{show(foreign[0])}', which accelc train did not write"
            + (f" (+{len(foreign) - 1} more)" if len(foreign) > 1 else "")
            + "; --force would delete it (move it away or choose another -o)"
        )


def recover_run_dir(run_dir: Path) -> None:
    """Remove temporaries (``.NAME.tmp-PID-*``) left in the run directory by killed writers."""
    for name in {p.name[1:].split(".tmp-", 1)[0] for p in run_dir.glob(".*.tmp-*")}:
        recover(run_dir, name)


def release_run_dir(run_dir: Path, lock: RunLock, created: bool) -> None:
    """Unlock. What this command added and left unused goes: a run directory it created that holds
    nothing, or the lock file it put into a folder that holds nothing else of a run."""
    try:
        rest = [f.name for f in run_dir.iterdir() if f.name != LOCK]
        if created and not rest:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif getattr(lock, "created_file", False) and not any(_is_run_file(n) for n in rest):
            (run_dir / LOCK).unlink()
    except OSError:
        pass
    lock.release()


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
    allow_change=(),
    memory_limit_gb: float | None = None,
    lock_fd: int | None = None,
    dist=None,
    log=("csv",),
) -> dict:
    """Train compiled artifacts; returns the summary (also written to RUN_DIR/summary.json).
    ``algorithms`` default to those the artifacts' plan asks for; ``allow_change``: settings a
    resume may change (``batch_size``, ``epochs``, ``nproc``). ``dist``: a
    :class:`~accelc.runtime.distributed.DistConfig` to train as one rank of a data-parallel job
    (``batch_size`` is the global batch; rank 0 alone writes the run directory). ``log``: logs
    besides metrics.jsonl, of ``csv`` (metrics.csv, steps.csv) and ``tensorboard`` (a list, or a
    comma-separated string; ``none`` or empty: metrics.jsonl alone)."""
    from .distributed import GradReducer, Group  # heavy: torch
    from .session import TrainingSession  # heavy: torch and ORT

    config = config or ExecConfig()
    loggers = check_loggers(log)
    if "tensorboard" in loggers and (dist is None or not dist.distributed or dist.rank == 0):
        tensorboard_writer()  # a broken install: one line before anything is written
    bad = sorted(set(allow_change) - set(ckpt.CHANGEABLE))
    if bad:
        raise AccelcError(
            f"--allow-change takes {', '.join(c.replace('_', '-') for c in ckpt.CHANGEABLE)}, got {show(bad[0])}"
        )
    dist = dist if dist is not None and dist.distributed else None
    world = dist.world_size if dist else 1
    if batch_size % world:
        raise AccelcError(
            f"--batch-size {batch_size} (the global batch) must be a multiple of the number of processes ({world})"
        )
    data_dir = data.partition(":")[2] if ":" in data and not data.startswith("synthetic") else None
    if dist is None or dist.rank == 0:
        rd, lock = open_run_dir(
            run_dir,
            resume,
            force,
            lock_fd,
            protect=[p for p in (artifact_dir, data_dir) if isinstance(p, (str, os.PathLike))],
        )
    else:  # another rank: reads the run directory (a checkpoint to resume), never writes it
        rd, lock = Path(os.path.abspath(run_dir)), None
    group = None
    try:
        art = artifact_dir if isinstance(artifact_dir, Artifacts) else load_artifacts(artifact_dir)[0]
        info = art.info
        check_step_memory(info, batch_size // world, memory_limit_gb, f"training at --batch-size {batch_size}")
        # the data first: a bad file is refused before ONNX Runtime is loaded
        ds = load_data(
            data, info.input_shape, info.num_classes, train_limit, test_limit, memory_limit_gb=memory_limit_gb
        )
        if dist is not None:  # joins the job: every rank waits here for the others
            group = Group(dist, config.device)
        # the artifacts loaded (and verified) once; the sessions built for the variant training starts with
        session = TrainingSession(art, config, lr=lr, lazy=True)
        if group is not None:
            session.attach_reducer(GradReducer(group))
        if algorithms is None:
            algorithms = algorithms_for(session.artifacts)
        fingerprint = {
            "data": data,
            "train_limit": train_limit,
            "test_limit": test_limit,
            "train_images": int(len(ds.x_train)),
            "test_images": int(len(ds.x_test)),
            "lr": session.lr,
            "nproc": world,
        }
        trainer = Trainer(
            session,
            ds,
            rd,
            epochs,
            batch_size,
            seed,
            algorithms,
            resume=resume,
            progress=progress and (dist is None or dist.rank == 0),
            name="ort",
            fingerprint=fingerprint,
            allow_change=set(allow_change),
            artifacts_sha=ckpt.artifacts_sha256(artifact_dir) if not isinstance(artifact_dir, Artifacts) else None,
            dist=group,
            loggers=loggers,
        )
        trainer.artifacts_dir = None if isinstance(artifact_dir, Artifacts) else os.path.abspath(artifact_dir)
        summary = trainer.run()
        summary.update(
            {
                "artifacts": Path(str(artifact_dir)).name,
                "data": data.split(":")[0],
                "device": config.device,
                "machine": machine_info(),
            }
        )
        if trainer.writer:
            try:
                atomic_write_text(rd / "summary.json", json.dumps(summary, indent=1))
                if trainer.history:
                    plot_run(trainer.history, rd / "curves.png", f"accelc train — {Path(str(artifact_dir)).name}")
            except OSError as e:
                raise _write_error(rd, e) from None
        return summary
    finally:
        if group is not None:
            group.close()
        if lock is not None:
            release_run_dir(rd, lock, lock.created)
