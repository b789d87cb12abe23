"""Atomic file output: every file and directory accelc writes appears whole or not at all.

Outputs are written to a temporary sibling and renamed into place, so an interrupted or failed
command never leaves a half-written file or directory; temporaries of killed writers are removed
by the next run.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from pathlib import Path

from .errors import AccelcError


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, force: bool = False):
    """Yield a fresh temporary directory next to ``dest``; on success rename it to ``dest``.

    ``dest`` must not exist unless ``force``. On any exception the temporary directory is removed
    and ``dest`` is left untouched.
    """
    dest = Path(dest)
    if dest.exists() and not force:
        raise AccelcError(f"output '{dest}' already exists (use --force to replace it)")
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.exists():
        raise AccelcError(f"output folder '{parent}' does not exist")
    _remove_stale(parent, dest.name)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result is an ordinary folder
    except OSError as e:
        raise AccelcError(f"cannot write to '{parent}': {e.strerror}") from None
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=parent))
            os.replace(dest, old / "x")
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(parent: Path, name: str) -> None:
    """Remove temporary siblings left by killed runs (their writer process no longer exists)."""
    prefix = f".{name}.tmp-"
    for p in parent.glob(glob.escape(prefix) + "*"):
        pid = p.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the result is an ordinary file
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())
