"""Ctrl-C while the command line starts: one line, exit 130, as everywhere else.

``accelc``'s start-up imports (onnx, numpy, the passes; a second or two) run before
:func:`accelc.cli.main` can catch anything: a Ctrl-C there would print Python's traceback of
the import. So, when this process is the command line (``python -m accelc ...`` or the
``accelc`` console script, and only then: importing accelc from a program changes nothing), the
package installs :func:`_interrupted` as the SIGINT handler before its first heavy import, and
``main`` hands SIGINT back to Python (:func:`done`) as soon as it runs. Light: os, signal, sys.
"""

from __future__ import annotations

import os
import signal
import sys

_OPTIONS_WITH_VALUE = ("-W", "-X", "--check-hash-based-pycs")


def _main_module() -> str | None:
    """The module of ``python [options] -m MODULE ...``, or None."""
    argv = list(getattr(sys, "orig_argv", None) or [])
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-m":
            return argv[i + 1] if i + 1 < len(argv) else None
        if arg.startswith("-m"):
            return arg[2:]
        if arg in _OPTIONS_WITH_VALUE:
            i += 2
            continue
        if arg == "-" or arg == "-c" or not arg.startswith("-"):
            break  # a script, -c or stdin: the console script is a script named accelc
        i += 1
    return None


def started_as_cli() -> bool:
    """This process is ``python [options] -m accelc ...`` or the ``accelc`` console script."""
    if _main_module() is not None:
        return _main_module() == "accelc"
    script = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    return bool(sys.argv) and os.path.basename(sys.argv[0]) == "accelc" and os.path.basename(script) == "accelc"


def started_as_worker() -> bool:
    """This process is a training worker, ``python -m accelc.worker SPEC_FILE`` (accelc.worker)."""
    return _main_module() == "accelc.worker"


def _interrupted(signum, frame) -> None:
    if not started_as_worker():  # a training worker: its supervisor says it, once
        os.write(2, b"accelc: interrupted\n")
    os._exit(130)


def install() -> None:
    """SIGINT ends the starting command line with one line (see the module doc)."""
    if (started_as_cli() or started_as_worker()) and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        try:
            signal.signal(signal.SIGINT, _interrupted)
        except ValueError:  # not the main thread: leave Python's handler
            pass


def done() -> None:
    """Start-up is over (``main`` runs and catches KeyboardInterrupt): Python's SIGINT handler back."""
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)
