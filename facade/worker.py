"""``python -m accelc.worker SPEC_FILE``: one training process of ``accelc train`` or of
:func:`accelc.train` with ``nproc`` > 1 -- the supervised worker, or one rank of a data-parallel
job.

Its whole input is the :class:`~accelc.runtime.spec.TrainSpec` a launcher wrote to ``SPEC_FILE``
(read as untrusted: a bad file is one line, exit 2) and the :class:`~accelc.launch.Worker` its
launcher put in its environment (its supervisor, the lock and error pipe it inherits, its rank);
under torchrun, torchrun's variables give the rank. It trains with
:func:`accelc.runtime.train.train` and writes what the run directory holds; its supervisor prints
the summary. Errors go where :func:`accelc.cli.messages.reporting` sends them: one line, on the
launcher's pipe for a rank of ``--nproc``.
"""

from __future__ import annotations

import os
import sys
import warnings

from . import _startup
from .cli import messages
from .compiler.errors import AccelcError, show
from .compiler.pass_api import PassOrderWarning
from .launch import Worker, torchrun_config
from .runtime.runlock import die_with_parent
from .runtime.spec import TrainSpec

USAGE = "usage: python -m accelc.worker SPEC_FILE (a train spec accelc writes for its training processes)"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        worker = Worker.from_environ(os.environ)
    except AccelcError as e:
        messages.ErrorSink().line(f"accelc: error: {show(e, 2000)}")
        return 2
    sink = messages.ErrorSink(fd=worker.error_fd, supervised=worker.supervisor is not None)
    return messages.reporting(lambda: _run(argv, worker), verbose=worker.verbose, sink=sink)


def _run(argv: list[str], worker: Worker) -> int:
    if worker.supervisor is not None:
        die_with_parent(worker.supervisor)
    _startup.done()  # from here, a Ctrl-C is the KeyboardInterrupt messages.reporting catches
    if len(argv) != 1:
        raise AccelcError(USAGE)
    spec = TrainSpec.read(argv[0])
    dist = worker.dist(spec.dist_timeout) or torchrun_config(os.environ, spec.dist_timeout)
    from .runtime.train import train  # heavy: torch and ORT come with the training

    with warnings.catch_warnings():
        warnings.simplefilter("always" if spec.progress else "ignore", PassOrderWarning)
        warnings.showwarning = messages.note
        train(spec, lock_fd=worker.lock_fd, dist=dist)
    return 0


if __name__ == "__main__":
    sys.exit(main())
