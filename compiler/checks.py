"""Argument validators shared by the CLI, the Python API and the run's settings (the runtime).

One validation layer serves both: every function here takes the *flag* a value belongs to (as the
CLI spells it, e.g. ``"--lr"``) and the value, returns the value normalised, and raises
:class:`~accelc.compiler.errors.InvalidType` (a ``TypeError``) for a value of the wrong type or
:class:`~accelc.compiler.errors.InvalidValue` (a ``ValueError``) for one out of range, with a
message that names the flag::

    --lr must be a positive finite number, got -1.0

The CLI prints that message as ``accelc: error: MSG``; the Python API raises it, so a mistake
reads the same from both. Arguments that only exist in Python (``pass_options``, ``progress``)
are named by their keyword. Validators of what only the facade takes (the zoo's ``--input-shape``
and ``--num-classes``) are :mod:`accelc.checks`.

Seeds are integers in 0..2**32-1 (:data:`SEED_MAX`): numpy's ``default_rng`` would take any
non-negative integer, but torch's ``manual_seed`` and ORT's ``set_seed`` take 64-bit integers, and
a seed that one of them wraps or refuses would make the same run differ between engines.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

from .errors import InvalidType, InvalidValue, show

SEED_MAX = 2**32 - 1


def got(value) -> str:
    """``value`` as shown after "got" in a message (escaped, one line; '' for an empty string)."""
    if isinstance(value, str) and not value.strip():
        return repr(value)
    return show(value)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- numbers
def positive_float(flag: str, value, maximum: float | None = None) -> float:
    """A finite number > 0 (and <= ``maximum`` when given)."""
    what = f"{flag} must be a positive finite number" + (f" up to {maximum:g}" if maximum is not None else "")
    if not _is_real(value):
        raise InvalidType(f"{what}, got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and v > 0) or (maximum is not None and v > maximum):
        raise InvalidValue(f"{what}, got {got(value)}")
    return v


# sanity bounds: far beyond any useful setting, well inside what numpy, torch and ORT represent
MAX_LR = 1e12  # far above any useful rate (1e30 crashed ORT natively in bench); 1e12 still diverges cleanly
MAX_EPOCHS = 1_000_000
MAX_BATCH = 1 << 20


def optional_positive_float(flag: str, value, maximum: float | None = None) -> float | None:
    """None, or a finite number > 0 (and <= ``maximum``)."""
    return None if value is None else positive_float(flag, value, maximum)


def int_in(flag: str, value, low: int, high: int | None = None, what: str = "") -> int:
    """An integer in ``low``..``high`` (no upper bound when ``high`` is None)."""
    what = what or (f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}")
    if not _is_int(value):
        raise InvalidType(f"{flag} must be {what}, got {type(value).__name__}")
    v = int(value)
    if v < low or (high is not None and v > high):
        raise InvalidValue(f"{flag} must be {what}, got {got(value)}")
    return v


def positive_int(flag: str, value, maximum: int | None = None) -> int:
    """An integer >= 1 (and <= ``maximum`` when given)."""
    return int_in(flag, value, 1, maximum, f"a positive integer up to {maximum}" if maximum else "a positive integer")


def optional_positive_int(flag: str, value, maximum: int | None = None) -> int | None:
    """None, or an integer >= 1."""
    return None if value is None else positive_int(flag, value, maximum)


def seed(flag: str, value) -> int:
    """A seed: an integer in 0..2**32-1 (see the module docstring)."""
    return int_in(flag, value, 0, SEED_MAX)


def boolean(name: str, value) -> bool:
    """True or False (numpy booleans too); 0/1 and strings are refused so a typo is not a flag."""
    if value is True or value is False or type(value).__name__ == "bool_":
        return bool(value)
    raise InvalidType(f"{name} must be True or False, got {type(value).__name__}")


# ----------------------------------------------------------------------------- text and paths
def choice(flag: str, value, choices) -> str:
    """One of ``choices`` (strings)."""
    choices = tuple(choices)
    what = f"{flag} must be one of {', '.join(choices)}"
    if not isinstance(value, str):
        raise InvalidType(f"{what}, got {type(value).__name__}")
    if value not in choices:
        shown = got(value) if not value.strip() else f"'{show(value)}'"
        raise InvalidValue(f"{what}, got {shown}")
    return value


def path_like(name: str, value) -> Path:
    """A filesystem path: a non-empty ``str`` or ``os.PathLike`` of text, without NUL bytes."""
    if not isinstance(value, (str, os.PathLike)):
        raise InvalidType(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}")
    text = os.fspath(value)
    if not isinstance(text, str):
        raise InvalidType(f"{name} must be a path of text, not {type(text).__name__}")
    if not text.strip():
        raise InvalidValue(f"{name} must be a non-empty path, got {got(text)}")
    if "\x00" in text:
        raise InvalidValue(f"{name} must not contain a NUL byte, got {got(text)}")
    return Path(text)


def mapping(name: str, value, optional: bool = True) -> dict:
    """A dict (None -> {} when ``optional``)."""
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        raise InvalidType(f"{name} must be a dict, got {type(value).__name__}")
    return value


MAX_MEMORY_GB = 1e9  # an exabyte: beyond any machine, and far inside what a byte count represents


def memory_limit_gb(value) -> float | None:
    """None (the default limit) or a positive finite number of GB up to :data:`MAX_MEMORY_GB`
    (``--memory-limit``; 1e300 GB would overflow the byte count)."""
    if value is None:
        return None
    from .resources import memory_limit

    if not _is_real(value):
        raise InvalidType(f"--memory-limit must be a number of GB, got {type(value).__name__}")
    try:
        v = float(value)
    except OverflowError:  # an integer beyond float's range
        v = math.inf
    if math.isfinite(v) and v > MAX_MEMORY_GB:
        raise InvalidValue(f"--memory-limit must be a positive number of GB up to {MAX_MEMORY_GB:g}, got {got(value)}")
    # the range check and its message live with the limit (given the value as the user wrote it)
    memory_limit(value if isinstance(value, (int, float)) and math.isfinite(v) else v)
    return v


def threads(value) -> int | None:
    """None (all cores) or an integer in 1..4 x cores (``--threads``)."""
    from .resources import check_threads

    if value is not None and not _is_int(value):
        raise InvalidType(f"--threads must be an integer, got {type(value).__name__}")
    return check_threads(None if value is None else int(value))


DATA_KINDS = ("synthetic", "fashion-mnist", "fashion-mnist-multiscale", "imagefolder")
# the --data specs as every message lists them (one line)
DATA_SPECS = "synthetic[:N], fashion-mnist[:DIR], fashion-mnist-multiscale[:DIR] or imagefolder:DIR"


def data_spec(flag: str, value) -> str:
    """``synthetic[:N]``, ``fashion-mnist[:DIR]``, ``fashion-mnist-multiscale[:DIR]`` or
    ``imagefolder:DIR`` (the form only; what the spec names is checked when the data is loaded)."""
    if not isinstance(value, str):
        raise InvalidType(f"{flag} must be {DATA_SPECS}, got {type(value).__name__}")
    if "\x00" in value:
        raise InvalidValue(f"{flag} must not contain a NUL byte, got {got(value)}")
    kind, sep, arg = value.partition(":")
    if kind not in DATA_KINDS:
        raise InvalidValue(f"unknown {flag} {got(value)}; use {DATA_SPECS}")
    if kind == "synthetic" and sep:
        try:
            n = int(arg)
        except ValueError:
            raise InvalidValue(f"{flag} synthetic:N needs an integer N, got {got(arg)}") from None
        if n <= 0:
            raise InvalidValue(f"{flag} synthetic:N needs N > 0, got {n}")
    if kind == "imagefolder" and not arg.strip():
        raise InvalidValue(f"{flag} imagefolder:DIR needs a folder")
    if kind == "fashion-mnist-multiscale" and sep and not arg.strip():
        raise InvalidValue(f"{flag} fashion-mnist-multiscale:DIR needs a folder (or no ':' for the default one)")
    return value
