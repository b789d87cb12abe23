"""Data-parallel training on ``torch.distributed`` (gloo on CPU, NCCL on CUDA).

Each of the ``world_size`` processes (ranks) runs the same compiled training graph on its shard of
every global batch; gradients are averaged across ranks before the optimizer step, so every rank
applies the same step to the same parameters. What this module provides, and the runtime uses:

* :class:`DistConfig` — who this process is (rank, world size, rendezvous address, timeout). The
  facade builds it from its flags or from ``torchrun``'s environment; nothing here reads the
  environment.
* :class:`Group` — the process group: shards of a batch (a pure function of the batch, the rank and
  the world size, so data order stays a function of (seed, epoch)), sums of scalars, broadcast of
  tensors and of JSON (never pickles) from rank 0. A failed collective — a rank died, or nothing
  arrived within the timeout — becomes :class:`PeerLost`, one line.
* :class:`GradReducer` — gradient buffers laid out in *buckets* (flat tensors; each parameter's
  gradient is a view into one, so the graph writes straight into them), all-reduced asynchronously
  as soon as every gradient of a bucket is written: with the segmented executor the all-reduce of
  the last layers' gradients runs while the earlier layers' backward still computes (the buckets
  follow the reverse parameter order, the order backward produces them).

Gradients are pre-divided by the world size and summed, so the update equals a single process's on
the whole global batch (equal shards: the global batch size must be a multiple of the world size).
BatchNorm uses each rank's own batch statistics in the forward (as torch DDP does by default);
running statistics are rank 0's (broadcast before every evaluation and checkpoint, which is what
DDP's ``broadcast_buffers`` gives).
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from ..compiler.errors import AccelcError, InvalidValue, show

MAX_WORLD = 4096
DEFAULT_TIMEOUT_S = 300.0
BUCKET_MB = 1.0  # small enough that the last layers' all-reduce starts while backward goes on


class PeerLost(AccelcError):
    """A collective failed: another rank died or did not answer within the timeout."""

    exit_code = 3


@dataclass(frozen=True)
class DistConfig:
    rank: int = 0
    world_size: int = 1
    # where the ranks meet: "tcp://HOST:PORT" (accelc's own launcher), or "env://" under torchrun
    # (torch then reads torchrun's MASTER_ADDR/MASTER_PORT and shares its agent's store)
    init_method: str = "env://"
    timeout_s: float = DEFAULT_TIMEOUT_S
    bucket_mb: float = BUCKET_MB
    local_rank: int | None = None  # the rank on this machine (its GPU); None: the rank

    def __post_init__(self):
        if not isinstance(self.world_size, int) or not 1 <= self.world_size <= MAX_WORLD:
            raise InvalidValue(f"the world size must be in 1..{MAX_WORLD}, got {show(self.world_size)}")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise InvalidValue(f"the rank must be in 0..{self.world_size - 1}, got {show(self.rank)}")
        if not isinstance(self.init_method, str) or not (
            self.init_method == "env://" or re.fullmatch(r"tcp://[A-Za-z0-9.\-\[\]:]+:\d{1,5}", self.init_method)
        ):
            raise InvalidValue(f"the rendezvous must be env:// or tcp://HOST:PORT, got {show(self.init_method)}")
        if not 1 <= float(self.timeout_s) <= 86400:
            raise InvalidValue(f"--dist-timeout must be in 1..86400 seconds, got {show(self.timeout_s)}")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def free_port() -> int:
    """A TCP port free on this machine now (for a local job's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _native_stderr_held():
    """Hold what torch's C++ side writes to fd 2 while the block runs: joining a job it cannot
    reach, c10d logs every retry with a C++ stack trace (dozens of lines before accelc's one).
    Yields a list the block sets ``[True]`` in when it succeeded: the held text is then written
    out as it would have been; on a failure it is dropped (the exception says why, in one line)."""
    ok: list = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no fd 2 to redirect: nothing to hold
        yield ok
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield ok
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            if ok:
                held.seek(0)
                text = held.read()
                if text:
                    os.write(2, text)


class Group:
    """This process's membership in the job (see the module doc)."""

    def __init__(self, config: DistConfig, device: str = "cpu"):
        import torch
        import torch.distributed as dist

        self.config = config
        self.rank, self.world = config.rank, config.world_size
        self.device = device
        self.backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":  # one GPU per rank of this machine, chosen before anything is allocated
            local = config.rank if config.local_rank is None else config.local_rank
            torch.cuda.set_device(local % max(torch.cuda.device_count(), 1))
        if not dist.is_available() or (self.backend == "gloo" and not dist.is_gloo_available()):
            raise AccelcError(f"this torch build has no torch.distributed {self.backend} backend")
        # torch.distributed.nn binds ``group.WORLD`` into its functions' defaults when first imported,
        # and torch imports it late (the first optimizer imports torch._dynamo, which imports it):
        # imported after the group exists, it would hold the group past destroy_process_group, with
        # its gloo threads (and rank 0's store server), into the interpreter's exit, where their
        # native teardown can abort the process after its error line. Imported now, it binds None.
        import torch.distributed.nn  # noqa: F401

        try:
            with _native_stderr_held() as ok:
                dist.init_process_group(
                    self.backend,
                    init_method=config.init_method,
                    rank=self.rank,
                    world_size=self.world,
                    timeout=timedelta(seconds=float(config.timeout_s)),
                )
                ok.append(True)
        except Exception as e:
            raise PeerLost(
                f"rank {self.rank}: could not join the job at {show(config.init_method)} "
                f"({show(str(e).splitlines()[0] if str(e) else type(e).__name__, 200)})"
            ) from None
        self._dist = dist

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _fail(self, what: str, e: BaseException) -> PeerLost:
        return PeerLost(
            f"rank {self.rank}: lost the other ranks during {what} (one of them stopped, or nothing arrived "
            f"within --dist-timeout {self.config.timeout_s:g} s)"
        )

    def wait(self, work, what: str) -> None:
        try:
            work.wait()
        except Exception as e:
            raise self._fail(what, e) from None

    # ------------------------------------------------------------------ data
    def shard(self, x, y):
        """This rank's part of a global batch (contiguous equal slices, rank order)."""
        b = len(y) // self.world
        return x[self.rank * b : (self.rank + 1) * b], y[self.rank * b : (self.rank + 1) * b]

    def owns(self, index: int) -> bool:
        """Round-robin ownership (evaluation batches)."""
        return index % self.world == self.rank

    # ------------------------------------------------------------------ collectives
    def sum(self, values: list[float], what: str = "a reduction") -> list[float]:
        import torch

        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        if self.device == "cuda":
            t = t.cuda()
        try:
            self._dist.all_reduce(t)
        except Exception as e:
            raise self._fail(what, e) from None
        return [float(v) for v in t.cpu()]

    def all_reduce_async(self, t, what: str):
        """Start summing ``t`` across ranks in place; returns the work to :meth:`wait` for."""
        try:
            return self._dist.all_reduce(t, async_op=True)
        except Exception as e:
            raise self._fail(what, e) from None

    def broadcast(self, tensors: list, what: str = "a broadcast") -> None:
        """Rank 0's values into every rank's tensors (in place)."""
        try:
            for t in tensors:
                self._dist.broadcast(t, 0)
        except Exception as e:
            raise self._fail(what, e) from None

    def broadcast_json(self, value, what: str = "a broadcast"):
        """Rank 0's JSON-able value on every rank (sent as UTF-8 JSON, never as a pickle)."""
        import torch

        data = json.dumps(value, sort_keys=True).encode() if self.is_main else b""
        n = torch.tensor([len(data)], dtype=torch.int64)
        self.broadcast([n], what)
        buf = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if self.is_main
            else torch.empty(int(n[0]), dtype=torch.uint8)
        )
        if int(n[0]):
            self.broadcast([buf], what)
        return json.loads(bytes(buf.numpy()).decode()) if not self.is_main else value

    def barrier(self, what: str = "a barrier") -> None:
        self.sum([0.0], what)

    def close(self) -> None:
        try:
            self._dist.destroy_process_group()
        except Exception:  # already torn down by a failure: nothing left to release
            pass


class GradReducer:
    """Gradient buckets and their asynchronous all-reduce (see the module doc)."""

    def __init__(self, group: Group):
        self.group = group
        self.cap = max(1, int(group.config.bucket_mb * 2**20))
        self.buckets: list[dict] = []
        self.bucket_of: dict[str, int] = {}
        self.steps = 0
        self.wait_s = 0.0  # time the step waited for all-reduces after its backward (exposed cost)
        self.bytes = 0

    def layout(self, shapes: dict[str, tuple], dtype, device) -> dict:
        """Gradient buffers for the parameters ``shapes`` (in parameter order): views into flat
        buckets of about ``bucket_mb``, filled from the last parameter backwards."""
        import torch

        names = list(shapes)[::-1]
        groups, cur, size = [], [], 0
        esize = torch.empty((), dtype=dtype).element_size()
        for n in names:
            numel = 1
            for d in shapes[n]:
                numel *= int(d)
            if cur and (size + numel) * esize > self.cap:
                groups.append(cur)
                cur, size = [], 0
            cur.append((n, numel))
            size += numel
        if cur:
            groups.append(cur)
        views, self.buckets, self.bucket_of = {}, [], {}
        for k, grp in enumerate(groups):
            flat = torch.zeros(sum(m for _, m in grp), dtype=dtype, device=device)
            off = 0
            for n, numel in grp:
                views[n] = flat[off : off + numel].view(shapes[n])
                self.bucket_of[n] = k
                off += numel
            self.buckets.append({"flat": flat, "names": {n for n, _ in grp}, "ready": set(), "work": None})
        self.bytes = sum(b["flat"].numel() * esize for b in self.buckets)
        return views

    def ready(self, names) -> None:
        """Gradients ``names`` are written for this step: start the all-reduce of every bucket
        they complete."""
        for n in names:
            k = self.bucket_of.get(n)
            if k is None:
                continue
            b = self.buckets[k]
            b["ready"].add(n)
            if b["work"] is None and len(b["ready"]) == len(b["names"]):
                self._launch(b)

    def _launch(self, b: dict) -> None:
        b["flat"].div_(self.group.world)
        b["work"] = self.group.all_reduce_async(b["flat"], "the gradient all-reduce")

    def finish(self, scalars: list[float]) -> list[float]:
        """Wait for every bucket (launching those not yet complete) and average ``scalars`` (the
        loss and the step's probes) across ranks; returns the averages."""
        t0 = time.perf_counter()
        for b in self.buckets:
            if b["work"] is None:
                self._launch(b)
        for b in self.buckets:
            self.group.wait(b["work"], "the gradient all-reduce")
            b["work"], b["ready"] = None, set()
        out = [v / self.group.world for v in self.group.sum(scalars, "the loss all-reduce")]
        self.wait_s += time.perf_counter() - t0
        self.steps += 1
        return out

    def measure(self, rounds: int = 10) -> float:
        """Median milliseconds of one all-reduce of every gradient bucket on its own (no compute
        to hide it behind): the communication cost of a step. Leaves the gradients scaled; call it
        only after the last optimizer step."""
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            works = [self.group.all_reduce_async(b["flat"], "the all-reduce measurement") for b in self.buckets]
            for w in works:
                self.group.wait(w, "the all-reduce measurement")
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return times[len(times) // 2]

    def stats(self) -> dict:
        return {
            "buckets": len(self.buckets),
            "gradient_bytes": self.bytes,
            "allreduce_wait_ms_per_step": 1e3 * self.wait_s / max(self.steps, 1),
        }
