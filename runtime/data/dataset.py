"""The dataset a run trains on (:class:`Dataset`) and what every source shares: fitting images to
the model's input (:func:`adapt`, :func:`resize`), normalising with training-set statistics, and the
check of labels against the model's class count."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...compiler.errors import AccelcError


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray  # N, C, H, W float32
    y_train: np.ndarray  # N int64
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    # held out of the training split (--val-split): decides early stopping, targets and controllers
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    @property
    def shape(self):
        return tuple(self.x_train.shape[1:])

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(self.x_train) // batch_size

    def order(self, epoch: int, seed: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(len(self.x_train))

    def batches(self, epoch: int, batch_size: int, seed: int, start: int = 0):
        """Yield (step, x, y) for one epoch; the last partial batch is dropped (fixed shapes)."""
        for s, idx in self.batch_indices(epoch, batch_size, seed, start):
            yield s, self.x_train[idx], self.y_train[idx]

    def batch_indices(self, epoch: int, batch_size: int, seed: int, start: int = 0):
        """Yield (step, rows of the training split) for one epoch, as :meth:`batches` cuts it."""
        perm = self.order(epoch, seed)
        for s in range(start, self.steps_per_epoch(batch_size)):
            yield s, perm[s * batch_size : (s + 1) * batch_size]

    def test_batches(self, batch_size: int):
        for i in range(0, len(self.x_test), batch_size):
            yield self.x_test[i : i + batch_size], self.y_test[i : i + batch_size]

    def val_batches(self, batch_size: int):
        for i in range(0, len(self.x_val), batch_size):
            yield self.x_val[i : i + batch_size], self.y_val[i : i + batch_size]

    def resized(self, hw: tuple) -> "Dataset":
        """The same data at another spatial size (for low-resolution training stages)."""
        return Dataset(
            self.name + f"@{hw[0]}x{hw[1]}",
            resize(self.x_train, hw),
            self.y_train,
            resize(self.x_test, hw),
            self.y_test,
            self.num_classes,
            None if self.x_val is None else resize(self.x_val, hw),
            self.y_val,
        )


RESIZE_CHUNK = 4096  # images per interpolation call


def resize(x: np.ndarray, hw: tuple) -> np.ndarray:
    import torch  # heavy: loaded when data is resized
    import torch.nn.functional as F

    if tuple(x.shape[2:]) == tuple(hw):
        return x
    out = np.empty((len(x), x.shape[1], *hw), dtype=np.float32)  # filled chunk by chunk: no second copy
    for i in range(0, len(x), RESIZE_CHUNK):
        t = torch.from_numpy(np.ascontiguousarray(x[i : i + RESIZE_CHUNK], dtype=np.float32))
        out[i : i + RESIZE_CHUNK] = F.interpolate(
            t, size=tuple(hw), mode="bilinear", align_corners=False, antialias=True
        ).numpy()
    return out


def adapt(x: np.ndarray, shape: tuple) -> np.ndarray:
    """Fit N,C,H,W images to the model's (C, H, W)."""
    c, h, w = shape
    x = x.astype(np.float32, copy=False)
    if x.shape[1] == c:
        return resize(x, (h, w))
    if x.shape[1] == 1:
        # the resize works per channel: resizing the one channel, then replicating it, gives the same
        # values as replicating first, with a C times smaller intermediate
        return np.repeat(resize(x, (h, w)), c, axis=1)
    if c == 1:
        return resize(x.mean(axis=1, keepdims=True), (h, w))
    raise AccelcError(f"cannot map {x.shape[1]}-channel images to a {c}-channel model input")


def _normalise(ds: Dataset) -> Dataset:
    """Zero mean, unit variance with training-set statistics, in place (no full-size temporaries)."""
    x = ds.x_train
    mean = float(x.mean())
    sq = 0.0
    for i in range(0, len(x), RESIZE_CHUNK):
        d = x[i : i + RESIZE_CHUNK].astype(np.float64) - mean
        d = d.ravel()
        sq += float(np.dot(d, d))
    std = math.sqrt(sq / max(x.size, 1)) or 1.0
    for a in (ds.x_train, ds.x_test) + (() if ds.x_val is None else (ds.x_val,)):
        a -= np.float32(mean)
        a /= np.float32(std)
    return ds


def _float_bytes(n: int, shape: tuple) -> int:
    """Bytes of ``n`` float32 images of ``shape`` (C, H, W)."""
    return 4 * n * math.prod(shape)


def _check_labels(y: np.ndarray, num_classes: int, where: str) -> None:
    """Every label in 0..num_classes-1 (ORT's SoftmaxCrossEntropyLoss does not check: a label out
    of range reads out of bounds)."""
    if y.size == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        i = int(np.flatnonzero(y == bad)[0])
        raise AccelcError(
            f"{where} has label {bad} (at index {i}); the model has {num_classes} classes, "
            f"so labels must be 0..{num_classes - 1}"
        )
