"""Where the error, warning and note lines go, and the one error policy of accelc's processes (the
command line and the training worker): :func:`reporting` runs a command and turns whatever it
raises into one line and an exit code. Where the line goes is an :class:`ErrorSink` handed in, not
module state: stderr, or for a rank of ``--nproc`` the launcher's pipe (the job prints one line)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from dataclasses import dataclass

from ..compiler.errors import AccelcError, show
from ..compiler.pass_api import PassOrderWarning


def note(message, category, *_args, **_kw) -> None:
    """accelc's own warnings (e.g. passes put into order) as one 'accelc: note:' line; others as usual."""
    if issubclass(category, PassOrderWarning):
        print(f"accelc: note: {show(str(message), 400)}", file=sys.stderr)
    else:
        print(f"accelc: warning: {show(str(message), 400)}", file=sys.stderr)


@dataclass(frozen=True)
class ErrorSink:
    """Where this process's error line goes. ``fd``: a pipe to the launcher (a rank of
    ``--nproc``), else stderr; ``supervised``: a training worker, whose supervisor reports an
    interruption (in one line), so the worker says nothing of it."""

    fd: int | None = None
    supervised: bool = False

    def line(self, text: str) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.fd, (text + "\n").encode())
                return
        print(text, file=sys.stderr)


def reporting(body, *, verbose: bool = False, sink: ErrorSink = ErrorSink()) -> int:
    """Run ``body()`` (returns an exit code or None for 0) with accelc's error policy: an
    AccelcError or OSError is one ``accelc: error:`` line (exit 2, or the error's ``exit_code``),
    anything else one ``accelc: internal error:`` line (exit 1), Ctrl-C exit 130; ``verbose``
    (``-v``) adds the traceback. Never a traceback otherwise."""
    try:
        return body() or 0
    except AccelcError as e:
        if verbose:
            traceback.print_exc()
        sink.line(f"accelc: error: {show(e, 2000)}")
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        if not sink.supervised:  # a worker's supervisor says it, once
            print("accelc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        if verbose:
            traceback.print_exc()
        where = f": {show(e.filename)}" if e.filename else ""
        sink.line(f"accelc: error: {show(e.strerror or e)}{where}")
        return 2
    except Exception as e:  # never a traceback for users; -v shows it
        if verbose:
            traceback.print_exc()
        sink.line(f"accelc: internal error: {type(e).__name__}: {show(e, 300)} (run with -v for details)")
        return 1
    finally:
        if sink.supervised:  # a signal the supervisor forwards late must not interrupt interpreter shutdown
            signal.signal(signal.SIGINT, signal.SIG_IGN)
