"""A run's logs besides metrics.jsonl: ``metrics.csv``, ``steps.csv`` and TensorBoard event files
(:class:`RunLogs`), the ``--log`` choices (:func:`check_loggers`) and what a resume needs of the
logs an earlier run left (:func:`check_resumed_logs`)."""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import math
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np

from ...compiler.errors import AccelcError, show
from ...compiler.fileio import atomic_write_text
from ..spec import LOGGERS

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
