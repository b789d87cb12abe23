"""Atomic file output: every file and directory accelc writes appears whole or not at all.

Outputs are written to a temporary sibling and renamed into place, so an interrupted or failed
command never leaves a half-written file or directory. Replacing an existing output (``--force``)
swaps the two directories in one atomic ``renameat2(RENAME_EXCHANGE)``, so a kill at any moment
leaves the old or the new output under the name, never neither; where the file system cannot
exchange, two renames are used and the next run puts a hidden old output back. ``--force`` only
ever replaces a directory accelc wrote (it carries a marker file naming its kind), never the
input, the current directory or a folder above either. Leftovers of killed writers are removed
by the next run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import AccelcError, show

MARKER = ".accelc-output"


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


def read_marker(path: Path) -> dict | None:
    """The marker of an accelc output folder ({"kind": ..., "entries": [...]}) or None."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return None
    m = path / MARKER
    if not m.is_file() or m.is_symlink():
        return None
    try:
        doc = json.loads(m.read_bytes()[: 1 << 16])
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str):
        return None
    entries = doc.get("entries")
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        return None
    return doc


def output_kind(path: Path) -> str | None:
    """The kind of accelc output ``path`` is ("artifacts", "bench", ...), or None."""
    doc = read_marker(path)
    return doc["kind"] if doc else None


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_clearable(dest: Path, protect, what: str = "output") -> None:
    """Refuse to delete ``dest`` (``--force``) when it is the current folder or above it, or holds
    one of ``protect`` (the command's inputs)."""
    real = Path(dest).resolve()
    if _is_within(Path.cwd().resolve(), real):
        raise AccelcError(f"{what} '{show(dest)}' is the current folder or a folder above it; choose another -o")
    for p in protect:
        p = Path(p).resolve()
        if _is_within(p, real):
            raise AccelcError(f"{what} '{show(dest)}' holds the input '{show(p)}'; --force would delete it")


def _check_replace(dest: Path, kind: str, protect) -> None:
    """Refuse to replace ``dest`` unless it is an accelc output of ``kind`` holding nothing protected."""
    check_clearable(dest, protect)
    if dest.is_symlink() or not dest.is_dir():
        raise AccelcError(f"output '{show(dest)}' exists and is not a folder accelc wrote; remove it yourself")
    doc = read_marker(dest)
    found = doc["kind"] if doc else None
    if found != kind:
        what = f"an accelc {found} folder" if found else "not a folder accelc wrote (no marker file)"
        raise AccelcError(f"output '{show(dest)}' is {what}; --force replaces only a previous {kind} output")
    foreign = sorted(set(os.listdir(dest)) - set(doc["entries"]) - {MARKER})
    if foreign:
        raise AccelcError(
            f"output '{show(dest)}' holds '{show(foreign[0])}', which accelc did not write"
            + (f" (+{len(foreign) - 1} more)" if len(foreign) > 1 else "")
            + "; --force would delete it (move it away first)"
        )


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, force: bool = False, kind: str = "artifacts", protect=()):
    """Yield a fresh temporary directory next to ``dest``; on success it becomes ``dest``.

    ``dest`` must not exist unless ``force``, and then it must be an accelc output of ``kind``
    that holds none of ``protect`` (the command's inputs). On any exception the temporary
    directory is removed and ``dest`` is left untouched.
    """
    dest = Path(os.path.abspath(dest))
    if not dest.name:
        raise AccelcError(f"output '{show(dest)}' is not a folder name")
    parent = dest.parent
    if not parent.is_dir():
        raise AccelcError(f"output folder '{show(parent)}' does not exist")
    dest = parent.resolve() / dest.name
    recover(parent, dest.name)
    if os.path.lexists(dest):
        if not force:
            raise AccelcError(f"output '{show(dest)}' already exists (use --force to replace it)")
        _check_replace(dest, kind, protect)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result is an ordinary folder
    except OSError as e:
        raise AccelcError(f"cannot write to '{show(parent)}': {e.strerror}") from None
    try:
        yield tmp
        # the marker lists what this output holds: --force later replaces exactly that, nothing a
        # user put beside it
        entries = sorted(e for e in os.listdir(tmp) if e != MARKER)
        (tmp / MARKER).write_text(json.dumps({"kind": kind, "entries": entries}) + "\n")
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if not os.path.lexists(dest):
            os.replace(tmp, dest)
        elif _exchange(tmp, dest):
            # tmp now holds the old output; a kill from here on leaves the new output in place
            # and the old one as a stale temporary the next run removes
            _fsync_dir(parent)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            old = parent / f".{dest.name}.old-{os.getpid()}-{tmp.name.rsplit('-', 1)[-1]}"
            os.rename(dest, old)  # a kill here leaves the old output hidden: recover() restores it
            os.rename(tmp, dest)
            _fsync_dir(parent)
            shutil.rmtree(old, ignore_errors=True)
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


def _writer_dead(p: Path, prefix: str) -> bool:
    pid = p.name[len(prefix) :].split("-", 1)[0]
    return pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid))


def recover(parent: Path, name: str) -> None:
    """Clean up after writers of ``parent/name`` that were killed: an old output hidden by an
    interrupted two-rename replacement goes back under the name (if nothing took its place) or is
    removed; temporary folders and files are removed."""
    parent = Path(parent)
    old_prefix = f".{name}.old-"
    for p in sorted(parent.glob(glob.escape(old_prefix) + "*")):
        if _writer_dead(p, old_prefix):
            if not os.path.lexists(parent / name):
                with contextlib.suppress(OSError):
                    os.rename(p, parent / name)
                    continue
            shutil.rmtree(p, ignore_errors=True)
    tmp_prefix = f".{name}.tmp-"
    for p in parent.glob(glob.escape(tmp_prefix) + "*"):
        if _writer_dead(p, tmp_prefix):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (temporaries left by
    killed writers of the same file are removed first)."""
    path = Path(path)
    recover(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
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
