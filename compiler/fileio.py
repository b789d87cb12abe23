"""Atomic file output: every file and directory accelc writes appears whole or not at all, and
never in place of something that was not there when the command checked its output.

An output is written inside a temporary folder beside it (``.NAME.tmp-PID-XXXX``) and moved into
place at the end:

* where nothing was at the output when the command started, with a rename that never replaces
  (``renameat2(RENAME_NOREPLACE)``): a folder or file that appeared there meanwhile (a user's, a
  second writer's) is refused, left as it is, and the finished work is removed;
* where ``--force`` replaces an output, only that very output (the same file system object, still
  an accelc output of the same kind holding nothing accelc did not write) is replaced, in one
  atomic ``renameat2(RENAME_EXCHANGE)``, so a kill at any moment leaves the old or the new output
  under the name, never neither; what is swapped out is checked again and swapped back when it is
  not what was checked. Where the file system cannot exchange, two renames are used and the next
  run puts an old output hidden by a kill back. ``--force`` only ever replaces a directory accelc
  wrote (it carries a marker file naming its kind), never the input, the current directory or a
  folder above either.

Signals that stop a command (SIGINT, SIGTERM, SIGHUP) are held back while an output is being moved
into place, so a handler that unwinds cannot leave it half exchanged. Leftovers of killed writers
are removed by the next run -- only temporary folders accelc provably made: they hold a proof file
naming the folder and its writer, owned by this user; a folder that merely looks like one is left
alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

from .errors import AccelcError, show

MARKER = ".accelc-output"
PROOF = ".accelc-temporary"  # in every temporary folder accelc makes: {"pid": writer, "name": the folder's name}
NEW, OLD = "new", "old"  # in a temporary folder: the output being written; an output being replaced
ANY = object()  # atomic_write_bytes(expect=ANY): replace whatever is there (files of a run accelc owns)


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


class Existing(NamedTuple):
    """What was at an output path when a command checked it: the file system object (device,
    inode, type) and, for a file, its size and modification time."""

    dev: int
    ino: int
    fmt: int
    size: int
    mtime_ns: int


def output_state(path) -> Existing | None:
    """What is at ``path`` now (not following a symbolic link), or None when nothing is. A writer
    given it (``atomic_write_bytes(expect=...)``) replaces only that, unchanged."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    fmt = stat.S_IFMT(st.st_mode)
    if fmt == stat.S_IFDIR:  # a folder's content is checked by its marker's entries
        return Existing(st.st_dev, st.st_ino, fmt, 0, 0)
    return Existing(st.st_dev, st.st_ino, fmt, st.st_size, st.st_mtime_ns)


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


def _foreign(dest: Path, doc: dict) -> list[str]:
    return sorted(set(os.listdir(dest)) - set(doc["entries"]) - {MARKER})


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
    foreign = _foreign(dest, doc)
    if foreign:
        raise AccelcError(
            f"output '{show(dest)}' holds '{show(foreign[0])}', which accelc did not write"
            + (f" (+{len(foreign) - 1} more)" if len(foreign) > 1 else "")
            + "; --force would delete it (move it away first)"
        )


def _changed(path: Path, expect: Existing, kind: str | None) -> str | None:
    """Why ``path`` is no longer the output checked at the start (``expect``; for a folder also
    still an accelc output of ``kind`` holding only what its marker lists), or None."""
    if output_state(path) != expect:
        return f"it is not the {'folder' if kind else 'file'} that was there when accelc started"
    if kind is None:
        return None
    doc = read_marker(path)
    if doc is None or doc["kind"] != kind:
        return "its accelc marker was changed"
    try:
        foreign = _foreign(path, doc)
    except OSError as e:
        return f"it cannot be read ({e.strerror})"
    if foreign:
        return f"it now holds '{show(foreign[0])}', which accelc did not write"
    return None


# ----------------------------------------------------------------------------- renames
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP)


def _renameat2(a: Path, b: Path, flags: int) -> int:
    """renameat2(2): 0, the errno, or -1 where this system has no renameat2."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return -1
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return 0
    return ctypes.get_errno()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    err = _renameat2(a, b, _RENAME_EXCHANGE)
    if err == 0:
        return True
    if err == -1 or err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(b))


def _place(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst`` unless something is at ``dst`` (then False, nothing changed)."""
    err = _renameat2(src, dst, _RENAME_NOREPLACE)
    if err == 0:
        return True
    if err == errno.EEXIST:
        return False
    if err != -1 and err not in _UNSUPPORTED:
        raise OSError(err, os.strerror(err), str(dst))
    # no renameat2 here: a file is linked (never replaces); a folder is renamed after a look,
    # which replaces nothing but an empty folder made in between
    if os.path.lexists(dst):
        return False
    if not src.is_dir() or src.is_symlink():
        try:
            os.link(src, dst, follow_symlinks=False)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
        else:
            os.unlink(src)
            return True
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
            return False
        raise
    return True


# ----------------------------------------------------------------------------- signals, commits
_HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _signals_held():
    """Hold back SIGINT/SIGTERM/SIGHUP while the block runs; they are taken (by their handlers, or
    their default action) when it ends. In the main thread only: handlers run nowhere else."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {}
    try:
        for s in _HELD:
            h = signal.getsignal(s)
            if h is not None:  # None: a handler installed outside Python, left alone
                old[s] = signal.signal(s, lambda signum, _frame: got.append(signum))
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in dict.fromkeys(got):
            signal.raise_signal(s)


_LOGS: list[list[str]] = []


def output_key(path) -> str:
    """``path`` absolute with its folder resolved: how outputs are compared in :func:`written_outputs`."""
    p = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))


@contextlib.contextmanager
def written_outputs():
    """Collect the outputs moved into place while the block runs (as :func:`output_key`)."""
    log: list[str] = []
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS[:] = [x for x in _LOGS if x is not log]


def _written(path: Path) -> None:
    for log in _LOGS:
        log.append(output_key(path))


# ----------------------------------------------------------------------------- temporaries
def _make_temporary(parent: Path, name: str) -> Path:
    """A new temporary folder ``parent/.NAME.tmp-PID-XXXX`` with its proof inside (OSError if
    ``parent`` cannot be written)."""
    box = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=parent))
    try:
        fd = os.open(box / PROOF, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "name": box.name}) + "\n")
    except BaseException:
        shutil.rmtree(box, ignore_errors=True)
        raise
    return box


def _writer(p: Path, prefix: str) -> int | None:
    pid = p.name[len(prefix) :].split("-", 1)[0]
    return int(pid) if pid.isdigit() and len(pid) < 12 else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _made_by_accelc(box: Path, pid: int) -> bool:
    """Whether ``box`` is a temporary folder accelc made: a real folder owned by this user holding
    a proof file, also this user's, that names the folder and its writer ``pid``."""
    uid = os.geteuid()
    try:
        st = os.lstat(box)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
            return False
        fd = os.open(box / PROOF, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            pst = os.fstat(fd)
            if not stat.S_ISREG(pst.st_mode) or pst.st_uid != uid or pst.st_size > 4096:
                return False
            doc = json.loads(os.read(fd, 4096))
        finally:
            os.close(fd)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("name") == box.name and type(doc.get("pid")) is int and doc["pid"] == pid


def _remove(box: Path) -> None:
    """Remove a temporary folder of ours, its proof last: a removal cut short stays recognisable."""
    with contextlib.suppress(OSError):
        for e in os.listdir(box):
            p = box / e
            if e == PROOF:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
    with contextlib.suppress(OSError):
        (box / PROOF).unlink()
    with contextlib.suppress(OSError):
        box.rmdir()


class _Stranded(AccelcError):
    """What was swapped out could not be put back: the temporary folder holds it and is kept
    (its proof removed, so no later run removes it either)."""


def recover(parent: Path, name: str) -> None:
    """Clean up after writers of ``parent/name`` that were killed: the temporary folders they
    made are removed, and an old output hidden by an interrupted two-rename replacement goes back
    under the name first (if nothing took its place). Only folders accelc provably made are
    touched (see :func:`_made_by_accelc`); anything else named like them is left alone."""
    parent = Path(parent)
    prefix = f".{name}.tmp-"
    for p in sorted(parent.glob(glob.escape(prefix) + "*")):
        pid = _writer(p, prefix)
        if pid is None or pid == os.getpid() or _pid_alive(pid) or not _made_by_accelc(p, pid):
            continue
        old = p / OLD
        if read_marker(old) is not None and not os.path.lexists(parent / name):
            with contextlib.suppress(OSError):
                _place(old, parent / name)
        _remove(p)


# ----------------------------------------------------------------------------- writers
def _appeared(dest: Path) -> AccelcError:
    return AccelcError(
        f"output '{show(dest)}' appeared while accelc was writing it; it was left as it is and nothing "
        "was written (move it away or choose another output)"
    )


def _changed_error(dest: Path, why: str) -> AccelcError:
    return AccelcError(
        f"output '{show(dest)}' changed while accelc was writing it ({why}); it was left as it is and "
        "nothing was written"
    )


def _kept(dest: Path, why: str, where: Path) -> str:
    return (
        f"output '{show(dest)}' changed while accelc was writing it ({why}) and could not be put back; "
        f"nothing was written and what was there is kept in '{show(where)}'"
    )


def _undo(move, a: Path, b: Path) -> bool:
    """Put back what a swap or rename moved (``move(a, b)``); False where it cannot be."""
    try:
        return move(a, b)
    except OSError:
        return False


def _put_dir(box: Path, dest: Path, expect: Existing | None, kind: str) -> None:
    """Move ``box/NEW`` to ``dest``: where nothing was (``expect`` None) without replacing what
    appeared, else in place of ``expect`` only. On refusal, everything is as it was."""
    new = box / NEW
    if expect is None or not os.path.lexists(dest):
        if not _place(new, dest):
            raise _appeared(dest)
        return
    why = _changed(dest, expect, kind)
    if why:
        raise _changed_error(dest, why)
    if _exchange(new, dest):
        why = _changed(new, expect, kind)  # what was swapped out, checked again
        if why:
            if not _undo(_exchange, new, dest):
                raise _Stranded(_kept(dest, why, new))
            raise _changed_error(dest, why)
        return
    old = box / OLD
    os.rename(dest, old)  # a kill from here on leaves the old output hidden: recover() restores it
    why = _changed(old, expect, kind)
    if why:
        if not _undo(_place, old, dest):
            raise _Stranded(_kept(dest, why, old))
        raise _changed_error(dest, why)
    if not _place(new, dest):
        raise _Stranded(
            f"output '{show(dest)}' appeared while accelc was replacing it; nothing was written and the previous "
            f"output is kept in '{show(old)}'"
        )


def _commit(box: Path, dest: Path, put) -> None:
    """Run ``put()`` (the move of ``box``'s content to ``dest``) with signals held, and remove
    ``box`` after it either way (unless what it holds is no longer ours)."""
    with _signals_held():
        try:
            put()
        except _Stranded:
            with contextlib.suppress(OSError):
                (box / PROOF).unlink()  # no longer ours to remove, now or in a later run
            raise
        except BaseException:
            if read_marker(box / OLD) is not None and not os.path.lexists(dest):
                with contextlib.suppress(OSError):
                    _place(box / OLD, dest)  # an output hidden for a replacement that failed goes back
            _remove(box)
            raise
        _written(dest)
        _remove(box)
        _fsync_dir(dest.parent)


def _abandon(box: Path | None) -> None:
    """Remove ``box`` after a failure or a signal, unless it is gone (committed) or no longer ours
    (:class:`_Stranded`: its proof was removed)."""
    if box is not None and os.path.lexists(box / PROOF):
        with _signals_held():
            _remove(box)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, force: bool = False, kind: str = "artifacts", protect=()):
    """Yield a fresh temporary directory; on success it becomes ``dest``.

    ``dest`` must not exist unless ``force``, and then it must be an accelc output of ``kind``
    that holds none of ``protect`` (the command's inputs). At the end, what is at ``dest`` must
    still be what was checked here (nothing, or that same output): whatever appeared or changed
    there meanwhile is refused and left untouched. On any exception the temporary directory is
    removed and ``dest`` is left untouched.
    """
    dest = Path(os.path.abspath(dest))
    if not dest.name:
        raise AccelcError(f"output '{show(dest)}' is not a folder name")
    parent = dest.parent
    if not parent.is_dir():
        raise AccelcError(f"output folder '{show(parent)}' does not exist")
    dest = parent.resolve() / dest.name
    recover(parent, dest.name)
    expect = output_state(dest)
    if expect is not None:
        if not force:
            raise AccelcError(f"output '{show(dest)}' already exists (use --force to replace it)")
        _check_replace(dest, kind, protect)
    box = None
    try:
        with _signals_held():  # one arriving now is taken once ``box`` is known, so it is removed below
            try:
                box = _make_temporary(parent, dest.name)
                (box / NEW).mkdir()  # an ordinary folder (the umask applies), unlike the temporary one
            except OSError as e:
                raise AccelcError(f"cannot write to '{show(parent)}': {e.strerror}") from None
        new = box / NEW
        yield new
        # the marker lists what this output holds: --force later replaces exactly that, nothing a
        # user put beside it
        entries = sorted(e for e in os.listdir(new) if e != MARKER)
        (new / MARKER).write_text(json.dumps({"kind": kind, "entries": entries}) + "\n")
        for f in new.rglob("*"):
            if f.is_file() and not f.is_symlink():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(new)
        _commit(box, dest, lambda: _put_dir(box, dest, expect, kind))
    except BaseException:
        _abandon(box)
        raise


def _put_file(box: Path, path: Path, expect) -> None:
    new = box / NEW
    if expect is ANY:
        os.replace(new, path)
        return
    if expect is None or not os.path.lexists(path):
        if not _place(new, path):
            raise _appeared(path)
        return
    why = _changed(path, expect, None)
    if why:
        raise _changed_error(path, why)
    if _exchange(new, path):
        why = _changed(new, expect, None)
        if why:
            if not _undo(_exchange, new, path):
                raise _Stranded(_kept(path, why, new))
            raise _changed_error(path, why)
        return
    os.replace(new, path)  # no exchange here: checked just before


def atomic_write_bytes(path: str | os.PathLike, data: bytes, expect=ANY) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (temporaries left by
    killed writers of the same file are removed first).

    ``expect``: what may be at ``path`` when the data is moved there -- :data:`ANY` (the default:
    a file of a run accelc owns, replaced whatever it is), None (nothing: a file that appeared
    since is refused, not replaced) or :func:`output_state` taken when the command checked its
    output (that file, unchanged, is replaced; anything else is refused)."""
    path = Path(path)
    if expect is not ANY and expect is not None and expect.fmt != stat.S_IFREG:
        raise AccelcError(f"output '{show(path)}' exists and is not a regular file; remove it yourself")
    recover(path.parent, path.name)
    box = None
    try:
        with _signals_held():  # one arriving now is taken once ``box`` is known, so it is removed below
            box = _make_temporary(path.parent, path.name)
        fd = os.open(box / NEW, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _commit(box, path, lambda: _put_file(box, path, expect))
    except BaseException:
        _abandon(box)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, expect=ANY) -> None:
    atomic_write_bytes(path, text.encode(), expect)
