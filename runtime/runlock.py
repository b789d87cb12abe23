"""One writer per run directory: an OS file lock the kernel releases when its holders die.

``accelc train`` takes the lock in the parent process and hands the locked descriptor to its
training worker, so the lock is held until both are gone; a second ``train`` (or ``--resume``)
into the same run directory gets one line naming the holder's PID instead of racing it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from ..compiler.errors import AccelcError, show

LOCK = ".accelc-lock"


class RunLock:
    """An exclusive ``flock`` on RUN_DIR/.accelc-lock (held while ``fd`` is open in any process)."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path
        self.created = False  # whether the command that took it created the run directory
        self.created_file = False  # whether it created the lock file

    @classmethod
    def acquire(cls, run_dir) -> RunLock:
        run_dir = Path(run_dir)
        path = run_dir / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise AccelcError(f"cannot lock run directory '{show(run_dir)}': {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f"accelc process {holder}" if holder.isdigit() else "another accelc process"
            raise AccelcError(
                f"run directory '{show(run_dir)}' is in use by {who} (wait for it or stop it; "
                f"two trainings never share a run directory)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    @classmethod
    def inherited(cls, fd: int, run_dir) -> RunLock:
        """The lock a supervising parent took and passed down as descriptor ``fd``."""
        try:
            os.fstat(fd)
        except OSError:
            raise AccelcError(f"internal: lock descriptor {fd} is not open") from None
        return cls(fd, Path(run_dir) / LOCK)

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel kill this process when the parent that supervises it dies, and exit
    now if it already has (it was re-parented before the request was made)."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)
