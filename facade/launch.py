"""How ``accelc train`` runs its training processes.

* :func:`supervise`: one worker process (the default). A native crash inside ONNX Runtime, or a
  signal, is reported in one line with what was saved, never as a silent death.
* :func:`launch_local`: ``--nproc N``, N workers on this machine that train data-parallel
  (ranks 0..N-1 meeting at a free TCP port on 127.0.0.1), supervised together: a rank that dies ends
  the job on every rank at once (the others are stopped), with one line naming the rank, why, and
  the checkpoint to resume from.
* :func:`stop_on_signals`: SIGTERM/SIGHUP to a command that writes an output (compile, bench,
  export, export-run) end it as train's are: one line, exit code 128 + the signal's number, and
  its temporaries removed.
* :func:`torchrun_config`: the rank this process is when ``torchrun`` started it (its environment
  variables, read here and nowhere else).

Workers run in their own process group, die with their parent (``PR_SET_PDEATHSIG``) and get
every SIGTERM/SIGHUP/SIGINT the parent gets. A worker started by :func:`launch_local` writes its
final error line to a pipe (``--error-fd``) instead of stderr, so the job prints one line, not one
per rank.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .compiler.errors import AccelcError, InvalidValue, show
from .runtime import checkpoint as ckpt
from .runtime.distributed import PeerLost

STOP_GRACE_S = 3.0  # a surviving rank gets SIGTERM, then SIGKILL after this


class Stopped(AccelcError):
    """Training stopped by a signal: one line, exit code 128 + the signal's number."""

    def __init__(self, msg: str, code: int):
        super().__init__(msg)
        self.exit_code = code


def saved_checkpoint(run_dir: Path) -> tuple[int | None, str]:
    """What is on disk to resume from (read from the verified checkpoint.json, not the metrics)."""
    try:
        meta = ckpt.read_meta(run_dir) if ckpt.exists(run_dir) else None
    except AccelcError:
        meta = None
    if meta is None:
        return None, "no epoch had finished, so nothing was saved"
    done = meta["epoch"] + 1
    return done, f"the last checkpoint on disk is epoch {done} in '{show(run_dir)}' (continue with --resume)"


def _where(run_dir: Path, epochs: int) -> tuple[str, str]:
    done, saved = saved_checkpoint(run_dir)
    where = f"during epoch {done + 1}" if done else "during epoch 1"
    if done and done >= epochs:  # every epoch was trained and saved: it stopped while finishing up
        where = f"after its last epoch ({done})"
        saved = f"the checkpoint of epoch {done} is on disk in '{show(run_dir)}' (--resume writes the summary)"
    return where, saved


def _forwarding(procs: list[subprocess.Popen], got: list[int]):
    """Install handlers that forward SIGTERM/SIGHUP/SIGINT to ``procs``; returns the old ones."""

    def forward(signum, _frame):
        got.append(signum)
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signum)

    return {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}


class _Signalled(BaseException):
    """SIGTERM/SIGHUP arrived: unwinds the command like KeyboardInterrupt (no ``except Exception``
    on the way stops it), removing its temporaries; :func:`stop_on_signals` turns it into one line."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


WRITERS = ("compile", "bench", "export", "export-run")  # the commands that write outputs (compiler.fileio)


@contextlib.contextmanager
def _stopping(command: str, outputs: list):
    """See :func:`stop_on_signals`; ``outputs``: the paths the command writes, as given."""
    from .compiler.fileio import output_key, written_outputs

    got: list[int] = []

    def stop(signum, _frame):
        if not got:  # the first one unwinds; a second must not cut the clean-up short
            got.append(signum)
            raise _Signalled(signum)

    old = {}
    for s in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(s) == signal.SIG_DFL:  # an ignored SIGHUP (nohup) stays ignored
            old[s] = signal.signal(s, stop)
    try:
        with written_outputs() as log:
            try:
                yield
            except _Signalled as e:
                sig = signal.Signals(e.signum)
                done = [o for o in outputs if output_key(o) in log]
                rest = [o for o in outputs if output_key(o) not in log]
                msg = f"{command} stopped by {sig.name}"
                if done:
                    msg += "; wrote " + " and ".join(f"'{show(o)}'" for o in done)
                if rest:
                    msg += "; nothing was written to " + " or ".join(f"'{show(o)}'" for o in rest)
                atexit.register(_end_at_once, 128 + sig.value)
                raise Stopped(msg, 128 + sig.value) from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _end_at_once(code: int) -> None:
    """The process's last act once a signal stopped its command (after the one line): flush and
    end with ``code``, without the interpreter's teardown -- native destructors would run under
    threads the signal cut short (ONNX Runtime's import thread mid-import aborts with 'terminate
    called without an active exception')."""
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            f.flush()
    os._exit(code)


def stop_on_signals(a):
    """For the commands that write outputs (:data:`WRITERS`; ``a``: their parsed arguments), a
    context in which SIGTERM and SIGHUP stop the command as train's supervisor does: one line
    naming the signal and what was written or not, exit code 128 + the signal's number, the
    command's temporaries removed on the way out (an output being moved into place is finished
    first). Other commands: nothing changes."""
    if getattr(a, "cmd", None) not in WRITERS or threading.current_thread() is not threading.main_thread():
        return contextlib.nullcontext()
    outputs = [o for o in (getattr(a, "output", None), getattr(a, "ort_checkpoint", None)) if o is not None]
    return _stopping(a.cmd, outputs)


def _stopped_by_signal(got: list[int], where: str, saved: str) -> Stopped:
    sig = signal.Signals(got[0])
    return Stopped(f"training stopped by {sig.name} {where}; {saved}", 128 + sig.value)


def supervise(argv: list[str], run_dir: Path, lock, epochs: int) -> int:
    """Run the training in a child process (see the module doc). ``lock``: the run directory's
    lock, shared with the child (None for a rank that does not write the run directory)."""
    fds = (lock.fd,) if lock is not None else ()
    p = subprocess.Popen([sys.executable, "-m", "accelc"] + argv, pass_fds=fds, process_group=0)
    got: list[int] = []
    old = _forwarding([p], got)
    try:
        rc = p.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if rc == 0 or (rc > 0 and not got):
        return rc
    where, saved = _where(run_dir, epochs)
    if got:
        raise _stopped_by_signal(got, where, saved)
    raise _killed("the training process", rc, where, saved)


def _killed(who: str, rc: int, where: str, saved: str) -> AccelcError:
    """A worker that died by signal ``-rc``: which signal, when, whether ORT crashed, what is saved."""
    sig = signal.Signals(-rc).name
    native = sig in ("SIGFPE", "SIGSEGV", "SIGBUS", "SIGILL", "SIGABRT")
    return AccelcError(
        f"{who} was killed by {sig} {where}"
        + (" (a native crash inside ONNX Runtime)" if native else "")
        + f"; {saved}"
    )


def launch_local(argv: list[str], nproc: int, run_dir: Path, lock, epochs: int, threads: int) -> int:
    """Train on ``nproc`` local ranks (see the module doc). ``argv``: the worker's arguments
    (``--in-process`` and the supervision flags included); ``threads``: each rank's threads."""
    from .runtime.distributed import free_port  # light: no torch import at call time

    addr = f"tcp://127.0.0.1:{free_port()}"
    procs, pipes = [], []
    got: list[int] = []
    old = _forwarding(procs, got)
    try:
        for r in range(nproc):
            rfd, wfd = os.pipe()
            extra = ["--dist-rank", str(r), "--dist-world", str(nproc), "--dist-init", addr, "--error-fd", str(wfd)]
            extra += ["--threads", str(threads)]
            fds = (wfd, lock.fd) if r == 0 else (wfd,)
            if r == 0:
                extra += ["--lock-fd", str(lock.fd)]
            try:
                procs.append(
                    subprocess.Popen([sys.executable, "-m", "accelc"] + argv + extra, pass_fds=fds, process_group=0)
                )
            finally:
                os.close(wfd)
            pipes.append(rfd)
        failed: list[tuple[int, int]] = []  # (rank, return code) in the order seen
        while True:
            codes = [p.poll() for p in procs]
            new = [(r, c) for r, c in enumerate(codes) if c not in (None, 0) and r not in {f for f, _ in failed}]
            # a rank that died on its own comes before the ranks that then lost it
            new.sort(key=lambda rc: (rc[1] == PeerLost.exit_code, rc[0]))
            failed += new
            if failed or got or all(c is not None for c in codes):
                break
            time.sleep(0.05)
        if failed or got:
            _stop(procs)
        codes = [p.wait() for p in procs]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for p in procs:  # never leave a rank behind, whatever happened here
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait()
    messages = [_read_all(fd) for fd in pipes]
    where, saved = _where(run_dir, epochs)
    if got:
        raise _stopped_by_signal(got, where, saved)
    if not failed:
        failed = [(r, c) for r, c in enumerate(codes) if c]
    if not failed:
        return 0
    rank, rc = failed[0]
    msg = messages[rank]
    if rc < 0:
        raise _killed(f"rank {rank} of {nproc}", rc, where, f"the other ranks were stopped; {saved}")
    if not msg:
        msg = f"rank {rank} of {nproc} exited with status {rc} {where}; the other ranks were stopped; {saved}"
    elif rank and not msg.startswith("rank "):
        msg = f"rank {rank}: {msg}"
    if rc == PeerLost.exit_code:
        msg += f"; the other ranks were stopped; {saved}"
    err = AccelcError(msg)
    err.exit_code = rc if rc in (1, 2, PeerLost.exit_code) else 2
    raise err


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to every rank still running, SIGKILL to those that outlive the grace period."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.0, deadline - time.monotonic()))
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()


def _read_all(fd: int) -> str:
    """A worker's error line (the last one it wrote), without its ``accelc: error:`` prefix."""
    chunks = []
    try:
        while True:
            b = os.read(fd, 65536)
            if not b:
                break
            chunks.append(b)
            if sum(len(c) for c in chunks) > 1 << 20:
                break
    finally:
        os.close(fd)
    lines = [ln for ln in b"".join(chunks).decode(errors="replace").splitlines() if ln.strip()]
    if not lines:
        return ""
    last = lines[-1]
    for prefix in ("accelc: error: ", "accelc: "):
        if last.startswith(prefix):
            return last[len(prefix) :]
    return last


def torchrun_config(environ, timeout_s: float):
    """The DistConfig of a process ``torchrun`` started (RANK and WORLD_SIZE set), else None."""
    from .runtime.distributed import DistConfig

    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
    except ValueError:
        raise InvalidValue(
            f"RANK/WORLD_SIZE must be integers (torchrun sets them), got {show(environ['RANK'])}/"
            f"{show(environ['WORLD_SIZE'])}"
        ) from None
    if world <= 1:
        return None
    local = None
    with contextlib.suppress(KeyError, ValueError):
        local = int(environ["LOCAL_RANK"])
    return DistConfig(rank=rank, world_size=world, init_method="env://", timeout_s=timeout_s, local_rank=local)


def local_threads(environ, nproc: int) -> int:
    """Threads per rank when not given: this machine's cores shared by the ranks on it."""
    from .compiler.resources import max_threads

    local = nproc
    with contextlib.suppress(KeyError, ValueError):
        local = max(1, int(environ["LOCAL_WORLD_SIZE"]))
    return max(1, max_threads() // local)
