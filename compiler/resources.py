"""Resource limits: estimate memory from shapes before allocating, bound thread counts.

A command that would need more memory than the limit is refused up front with the estimate, so a
huge input (a 12000x12000 image, ``synthetic:100000000``) is one clear line in a second instead of
a machine swapping for minutes. The limit defaults to a fraction of the memory available now and
is raised with ``--memory-limit GB`` (``memory_limit=`` in the Python API).
"""

from __future__ import annotations

import math
import os

from .errors import InvalidValue

DEFAULT_FRACTION = 0.8  # of the memory available when the command starts


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else physical memory."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 8 << 30


def memory_limit(limit_gb: float | None = None) -> int:
    """The limit in bytes: ``limit_gb`` when given (must be positive and finite), else
    DEFAULT_FRACTION of the memory available now."""
    if limit_gb is None:
        return int(available_bytes() * DEFAULT_FRACTION)
    if isinstance(limit_gb, bool) or not isinstance(limit_gb, (int, float)):
        raise InvalidValue(f"--memory-limit must be a number of GB, got {type(limit_gb).__name__}")
    if not math.isfinite(limit_gb) or limit_gb <= 0:
        raise InvalidValue(f"--memory-limit must be a positive number of GB, got {limit_gb}")
    return int(limit_gb * (1 << 30))


def fmt_bytes(n: float) -> str:
    for unit, div in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def check_memory(what: str, nbytes: float, limit_gb: float | None = None) -> None:
    """Refuse ``what`` (e.g. "validating the model at batch 2") when its estimated ``nbytes``
    exceed the limit."""
    limit = memory_limit(limit_gb)
    if nbytes > limit:
        raise InvalidValue(
            f"{what} needs about {fmt_bytes(nbytes)} of memory, over the limit of {fmt_bytes(limit)} "
            f"(raise it with --memory-limit GB if this machine has the memory)"
        )


def max_threads() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(threads) -> int | None:
    """``threads`` validated: None (all cores) or an int in 1..4 x cores."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise InvalidValue(f"--threads must be an integer, got {type(threads).__name__}")
    top = 4 * max_threads()
    if not 1 <= threads <= top:
        raise InvalidValue(f"--threads must be in 1..{top} (this machine has {max_threads()} cores), got {threads}")
    return threads
