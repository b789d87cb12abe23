"""User-facing errors and atomic output helpers.

Every error a user can cause is an :class:`AccelcError`: the CLI prints its message as one line
on stderr and exits with code 2. Outputs are written to a temporary sibling and renamed into
place, so an interrupted or failed command never leaves a half-written file or directory.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


class AccelcError(Exception):
    """An error caused by the user's input; shown as one line, exit code 2."""


def ort_message(e: BaseException, limit: int = 300) -> str:
    """The human part of an ORT exception (drop source paths and C++ signatures)."""
    import re
    text = " ".join(str(e).split()) or type(e).__name__
    text = re.sub(r"/onnxruntime_src/\S+", "", text)
    for marker in ("Failed to load model with error:", "[ONNXRuntimeError] :"):
        if marker in text:
            text = text.rsplit(marker, 1)[-1]
    if ") " in text and "::" in text:
        text = text.rsplit(") ", 1)[-1]
    return text.strip()[:limit]


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
    for p in parent.glob(glob_escape(prefix) + "*"):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def glob_escape(s: str) -> str:
    import glob
    return glob.escape(s)


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
