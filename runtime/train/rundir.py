"""The run directory: created or reused and locked (one writer per run directory), cleared only of
what ``accelc train`` writes, its killed writers' temporaries recovered, and released."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ...compiler.errors import AccelcError, show
from ...compiler.fileio import check_clearable, recover
from .. import checkpoint as ckpt
from ..runlock import LOCK, RunLock
from ..spec import SPEC_FILE
from .logs import TB_DIR, _tb_foreign

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
        # not the run's content: the lock, and the spec a launcher (killed before it removed it) left
        content = sorted(f.name for f in run_dir.iterdir() if f.name not in (LOCK, SPEC_FILE))
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
