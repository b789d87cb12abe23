"""How ``accelc train`` runs its training processes.

* :func:`train_supervised`: the supervisor's side. The run directory is locked, the
  :class:`~accelc.runtime.spec.TrainSpec` written to a JSON file in it (:data:`SPEC_FILE`), and
  every training process is ``python -m accelc.worker SPEC_FILE`` (:mod:`accelc.worker`): never a
  command line. What a worker needs besides the spec (its rank, the rendezvous, the lock and error
  pipe it inherits, its supervisor) is a :class:`Worker` in its environment.
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
final error line to a pipe (:attr:`Worker.error_fd`) instead of stderr, so the job prints one line,
not one per rank.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .compiler.errors import AccelcError, InvalidValue, show
from .runtime import checkpoint as ckpt
from .runtime.distributed import PeerLost
from .runtime.spec import SPEC_FILE, TrainSpec

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


@dataclass(frozen=True)
class Worker:
    """What a launcher tells one worker process besides its spec, through the worker's environment
    (:meth:`environ` writes it, :meth:`from_environ` reads it in the worker; nothing else does).
    ``supervisor``: the PID of the process that supervises it (the worker dies with it);
    ``lock_fd``: the run directory's lock the supervisor holds and the worker inherits (the process
    that writes the run); ``error_fd``: a rank of :func:`launch_local` writes its error line to this
    pipe; ``rank``/``world_size``/``rendezvous``: a rank of :func:`launch_local` (under torchrun,
    torchrun's own variables say it); ``verbose``: ``-v`` (tracebacks)."""

    supervisor: int | None = None
    lock_fd: int | None = None
    error_fd: int | None = None
    rank: int | None = None
    world_size: int | None = None
    rendezvous: str | None = None
    verbose: bool = False

    _ENV = {
        "supervisor": "ACCELC_SUPERVISOR",
        "lock_fd": "ACCELC_LOCK_FD",
        "error_fd": "ACCELC_ERROR_FD",
        "rank": "ACCELC_RANK",
        "world_size": "ACCELC_WORLD_SIZE",
        "rendezvous": "ACCELC_RENDEZVOUS",
        "verbose": "ACCELC_VERBOSE",
    }

    def environ(self, base) -> dict[str, str]:
        """``base`` (the launcher's environment) with this worker's variables, and no others of ours."""
        env = {k: v for k, v in base.items() if k not in self._ENV.values()}
        for name, var in self._ENV.items():
            value = getattr(self, name)
            if value is not None and value is not False:
                env[var] = "1" if value is True else str(value)
        return env

    @classmethod
    def from_environ(cls, environ) -> "Worker":
        """The worker this process is (all None: started by hand, trains alone)."""
        got: dict = {}
        for name, var in cls._ENV.items():
            if var not in environ:
                continue
            value = environ[var]
            if name in ("rendezvous", "verbose"):
                got[name] = value if name == "rendezvous" else value == "1"
                continue
            try:
                got[name] = int(value)
            except ValueError:
                raise InvalidValue(f"{var} must be an integer (accelc's launcher sets it), got {show(value)}") from None
        return cls(**got)

    def dist(self, timeout_s: float):
        """This rank's DistConfig (a rank of :func:`launch_local`), else None."""
        if self.rank is None:
            return None
        from .runtime.distributed import DistConfig

        return DistConfig(
            rank=self.rank, world_size=self.world_size or 1, init_method=self.rendezvous or "", timeout_s=timeout_s
        )


def _start(spec_file: Path, worker: Worker, fds: tuple) -> subprocess.Popen:
    """``python -m accelc.worker SPEC_FILE`` in its own process group, ``worker`` in its environment."""
    return subprocess.Popen(
        [sys.executable, "-m", "accelc.worker", os.fspath(spec_file)],
        pass_fds=fds,
        process_group=0,
        env=worker.environ(os.environ),
    )


def supervise(spec_file: Path, run_dir: Path, lock, epochs: int, verbose: bool = False) -> int:
    """Run the training of ``spec_file`` in a worker process (see the module doc). ``lock``: the
    run directory's lock, shared with the worker (None for a rank that does not write the run
    directory). Returns the worker's exit code (it printed its error line itself)."""
    fds = (lock.fd,) if lock is not None else ()
    worker = Worker(supervisor=os.getpid(), lock_fd=lock.fd if lock is not None else None, verbose=verbose)
    p = _start(spec_file, worker, fds)
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
        + (" (a native crash: ONNX Runtime, torch or a library they load)" if native else "")
        + f"; {saved}"
    )


def launch_local(spec_file: Path, nproc: int, run_dir: Path, lock, epochs: int, verbose: bool = False) -> int:
    """Train ``spec_file`` on ``nproc`` local ranks (see the module doc)."""
    from .runtime.distributed import free_port  # light: no torch import at call time

    addr = f"tcp://127.0.0.1:{free_port()}"
    procs, pipes = [], []
    got: list[int] = []
    old = _forwarding(procs, got)
    try:
        for r in range(nproc):
            rfd, wfd = os.pipe()
            worker = Worker(
                supervisor=os.getpid(),
                lock_fd=lock.fd if r == 0 else None,
                error_fd=wfd,
                rank=r,
                world_size=nproc,
                rendezvous=addr,
                verbose=verbose,
            )
            try:
                procs.append(_start(spec_file, worker, (wfd, lock.fd) if r == 0 else (wfd,)))
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


def train_supervised(spec: TrainSpec, dist=None, *, local_ranks: bool | None = None, verbose: bool = False) -> int:
    """Train ``spec`` in supervised worker processes (see the module doc); returns the exit code.
    ``dist``: this process's rank under torchrun (a rank other than 0 neither locks nor writes the
    run directory; its spec goes to a private temporary folder). ``local_ranks``: train as
    ``spec.nproc`` ranks of :func:`launch_local` (default: when ``spec.nproc`` > 1), each with
    this machine's cores shared among them unless ``spec`` says its threads."""
    from .runtime.train import open_run_dir, release_run_dir

    if dist is not None and dist.rank != 0:
        with _spec_file(spec, None) as path:
            return supervise(path, Path(os.path.abspath(spec.run_dir)), None, spec.epochs, verbose)
    local_ranks = spec.nproc > 1 if local_ranks is None else local_ranks
    if local_ranks and spec.exec.threads is None:
        spec = spec.replace(exec=replace(spec.exec, threads=local_threads(os.environ, spec.nproc)))
    rd, lock = open_run_dir(spec.run_dir, spec.resume, spec.force, protect=[spec.artifacts])
    try:
        with _spec_file(spec, rd) as path:
            if local_ranks:
                return launch_local(path, spec.nproc, rd, lock, spec.epochs, verbose)
            return supervise(path, rd, lock, spec.epochs, verbose)
    finally:
        release_run_dir(rd, lock, lock.created)


@contextlib.contextmanager
def _spec_file(spec: TrainSpec, run_dir: Path | None):
    """``spec`` written (atomically) to ``run_dir``/:data:`SPEC_FILE` for the workers, removed once
    they are done; ``run_dir`` None: to a private temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="accelc-spec-")) if run_dir is None else run_dir
    path = folder / SPEC_FILE
    try:
        spec.write(path)
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        if run_dir is None:
            with contextlib.suppress(OSError):
                folder.rmdir()


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
