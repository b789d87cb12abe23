"""Where a run's data comes from (:class:`DataSource`): a ``--data`` spec, or arrays given in Python.

A run records the data by :meth:`DataSource.describe` -- the spec itself, or for arrays
``arrays(sha256=..., N+M images)``, the SHA-256 of the four arrays' dtypes, shapes and bytes -- in
its fingerprint and summary, so a resume with other data is refused."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


def arrays_digest(x_train, y_train, x_test, y_test) -> str:
    """The SHA-256 (hex) of four arrays' dtypes, shapes and bytes: the identity a run records."""
    h = hashlib.sha256()
    for a in (x_train, y_train, x_test, y_test):
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class DataSource:
    """The data of a run: ``spec``, a ``--data`` spec (``synthetic[:N]``, ``fashion-mnist[:DIR]``,
    ``fashion-mnist-multiscale[:DIR]``, ``imagefolder:DIR``; checked when loaded), or ``arrays``,
    ``(x_train, y_train, x_test, y_test)`` given in Python, read and checked by :func:`~accelc.runtime.data.in_memory_data` (which builds
    this); ``digest`` is their SHA-256. Images given as arrays are used as given (N, C, H, W float32:
    neither resized nor normalised, as torch would take them); :func:`~accelc.runtime.data.load_data` checks them against the
    model's input shape and class count. Two sources are equal when they describe the same data."""

    spec: str | None = None
    arrays: tuple | None = field(default=None, repr=False)
    digest: str | None = field(default=None, init=False)

    def __post_init__(self):
        if (self.spec is None) == (self.arrays is None):
            raise TypeError("a DataSource is either a spec or arrays")
        if self.spec is not None and not isinstance(self.spec, str):
            raise TypeError(f"a DataSource's spec is a string, got {type(self.spec).__name__}")
        if self.arrays is not None:
            arrays = tuple(self.arrays)
            if len(arrays) != 4:
                raise TypeError("a DataSource's arrays are (x_train, y_train, x_test, y_test)")
            object.__setattr__(self, "arrays", arrays)
            object.__setattr__(self, "digest", arrays_digest(*arrays))

    @property
    def in_memory(self) -> bool:
        """Data given in Python (arrays), not a spec."""
        return self.arrays is not None

    def describe(self) -> str:
        """The data's stable description, what a run records: the spec, or
        ``arrays(sha256=..., N+M images)``."""
        if self.spec is not None:
            return self.spec
        return f"arrays(sha256={self.digest}, {len(self.arrays[0])}+{len(self.arrays[2])} images)"

    __str__ = describe

    @property
    def name(self) -> str:
        """The data as a summary names it: a spec's kind (``synthetic``, ``fashion-mnist``,
        ``imagefolder``), the arrays' description."""
        return self.describe().split(":")[0]

    @property
    def directory(self) -> str | None:
        """The folder a spec reads (a run directory must not be it), None for synthetic data and arrays."""
        spec = self.spec
        return spec.partition(":")[2] if spec is not None and ":" in spec and not spec.startswith("synthetic") else None

    @property
    def x_train(self) -> np.ndarray:
        return self._array(0)

    @property
    def y_train(self) -> np.ndarray:
        return self._array(1)

    @property
    def x_test(self) -> np.ndarray:
        return self._array(2)

    @property
    def y_test(self) -> np.ndarray:
        return self._array(3)

    def _array(self, i: int) -> np.ndarray:
        if self.arrays is None:
            raise AttributeError(f"the data '{self.spec}' is a spec: it holds no arrays until it is loaded")
        return self.arrays[i]

    def __eq__(self, other) -> bool:
        if not isinstance(other, DataSource):
            return NotImplemented
        return (self.spec, self.digest) == (other.spec, other.digest)

    def __hash__(self) -> int:
        return hash((self.spec, self.digest))
