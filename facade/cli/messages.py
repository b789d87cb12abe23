"""Where the command line's error, warning and note lines go: stderr, or for a worker of ``--nproc``
the launcher's pipe; and whether this process is a supervised training worker (its supervisor
reports interruptions)."""

from __future__ import annotations

import contextlib
import os
import sys

from ..compiler.errors import show
from ..compiler.pass_api import PassOrderWarning


def note(message, category, *_args, **_kw) -> None:
    """accelc's own warnings (e.g. passes put into order) as one 'accelc: note:' line; others as usual."""
    if issubclass(category, PassOrderWarning):
        print(f"accelc: note: {show(str(message), 400)}", file=sys.stderr)
    else:
        print(f"accelc: warning: {show(str(message), 400)}", file=sys.stderr)


_SUPERVISED = False  # a training worker: its supervisor reports interruptions, in one line
_ERROR_FD = None  # a worker of --nproc: its error line goes to this pipe (the launcher prints one line)


def error_line(line: str) -> None:
    if _ERROR_FD is not None:
        with contextlib.suppress(OSError):
            os.write(_ERROR_FD, (line + "\n").encode())
            return
    print(line, file=sys.stderr)


def set_error_fd(fd: int) -> None:
    """A worker of --nproc: its error line goes to pipe ``fd``."""
    global _ERROR_FD
    _ERROR_FD = fd


def set_supervised() -> None:
    """A training worker: its supervisor reports interruptions, in one line."""
    global _SUPERVISED
    _SUPERVISED = True


def supervised() -> bool:
    return _SUPERVISED
