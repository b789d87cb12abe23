"""Validators of arguments only the facade takes: a zoo model's input shape (``--input-shape``, the
CLI's ``"C,H,W"`` text or a sequence) and number of classes. Every other validator is
:mod:`accelc.compiler.checks` (shared with the compiler and the runtime), re-exported here so facade
code validates through one module; the conventions are that module's (the flag first, the value
normalised, :class:`~accelc.compiler.errors.InvalidType` or ``InvalidValue`` naming the flag)."""

from __future__ import annotations

from .compiler.checks import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_LR,
    MAX_MEMORY_GB,
    SEED_MAX,
    _is_int,
    boolean,
    choice,
    data_spec,
    got,
    int_in,
    mapping,
    memory_limit_gb,
    optional_positive_float,
    optional_positive_int,
    path_like,
    positive_float,
    positive_int,
    seed,
    threads,
)
from .compiler.errors import InvalidType, InvalidValue

__all__ = [
    "MAX_BATCH",
    "MAX_CLASSES",
    "MAX_EPOCHS",
    "MAX_LR",
    "MAX_MEMORY_GB",
    "SEED_MAX",
    "boolean",
    "choice",
    "data_spec",
    "got",
    "input_shape",
    "int_in",
    "mapping",
    "memory_limit_gb",
    "optional_positive_float",
    "optional_positive_int",
    "path_like",
    "positive_float",
    "positive_int",
    "seed",
    "threads",
]

MAX_CLASSES = 1 << 20  # classes of a zoo model's head: far beyond any useful head


def input_shape(flag: str, value) -> tuple[int, int, int]:
    """A model input shape C,H,W: the CLI string ``"1,28,28"`` or a sequence of three positive
    integers."""
    what = f"{flag} must be three positive integers C,H,W"
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        try:
            items = [int(p) for p in parts]
        except ValueError:
            raise InvalidValue(f"{what}, got {got(value)}") from None
    elif isinstance(value, (list, tuple)):
        if not all(_is_int(v) for v in value):
            raise InvalidType(f"{what}, got {got(tuple(value))}")
        items = [int(v) for v in value]
    else:
        raise InvalidType(f"{what}, got {type(value).__name__}")
    if len(items) != 3 or min(items) <= 0:
        raise InvalidValue(f"{what}, got {got(','.join(map(str, items)) if items else value)}")
    return tuple(items)
