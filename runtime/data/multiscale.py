"""``--data fashion-mnist-multiscale[:DIR]``: Fashion-MNIST items pasted at several scales on a
64×64 canvas, so that input resolution carries information (Fashion-MNIST itself is 28-px content:
a 64×64 model gets it up-sampled, and training it at lower resolution loses nothing).

Canvas ``i`` of a split holds one to three items: item 0 is image ``i`` of that split's IDX file,
the others are images of the *same* split drawn by the split's generator (test canvases are built
from the test file only, training canvases from the training file only). Each item is resized to a
random scale in [0.5, 1.5) of its own size (Fashion-MNIST: 14 to 42 px; bilinear, antialiased, as
the loader resizes) and pasted at a random position fully inside the canvas. Items may overlap;
they are composited with ``max()`` (Fashion-MNIST items are light on black, so an overlap shows
both, like two exposures, and the result does not depend on the paste order). A canvas is
labelled with the class of its *largest* item (pasted area in pixels); a tie goes to the item
pasted first (the lowest slot).

The composition is deterministic and does not depend on the limits: everything random is drawn
for the whole split at once from ``numpy.random.default_rng([SEED, split])`` (split 0 training,
1 test), and only the canvases a run asks for are built, so canvas ``i`` is the same canvas
whatever ``--train-limit``, ``--test-limit`` or ``--val-split`` (the validation canvases are the last
training canvases, as for fashion-mnist). The IDX files are read as untrusted exactly as for
``fashion-mnist`` (:mod:`.idx`), and the memory the canvases (and their fitting to the model
input) need is checked before any image is read.

:func:`layout` (where each item comes from and goes) and :func:`compose` (the canvases of a layout)
are public so that the composition can be inspected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ...compiler.errors import AccelcError, show
from ...compiler.resources import check_memory
from .dataset import RESIZE_CHUNK, Dataset, _check_labels, _float_bytes
from .idx import FASHION_CLASSES, READ_CHUNK, open_splits
from .split import take_validation

KIND = "fashion-mnist-multiscale"
CANVAS = 64  # the canvas side in pixels
SCALES = (0.5, 1.5)  # an item's scale, uniform in [low, high) of its own size
MAX_ITEMS = 3  # items per canvas: 1 to MAX_ITEMS, uniform
MAX_SOURCE = int(CANVAS / SCALES[1])  # the largest source side that fits the canvas at the largest scale (42)
SEED = 20261  # the generator of split s (0 training, 1 test) is default_rng([SEED, s])
SPLITS = {"train": 0, "test": 1}


@dataclass(frozen=True)
class Layout:
    """Every canvas of a split, one row each: ``items`` (N, MAX_ITEMS) the source image of each
    slot in paste order (column 0 is the canvas's own index; -1: no item), ``size`` (N, MAX_ITEMS, 2)
    each item's pasted height and width, ``pos`` (N, MAX_ITEMS, 2) its top and left on the canvas."""

    items: np.ndarray
    size: np.ndarray
    pos: np.ndarray

    @property
    def count(self) -> np.ndarray:
        """(N,) the number of items on each canvas."""
        return (self.items >= 0).sum(axis=1)

    @property
    def largest(self) -> np.ndarray:
        """(N,) the slot of each canvas's largest item (pasted area); a tie goes to the first pasted."""
        area = self.size[..., 0].astype(np.int64) * self.size[..., 1]
        return np.argmax(np.where(self.items >= 0, area, -1), axis=1)  # argmax: the first of equal maxima

    def labels(self, y: np.ndarray, rows=None) -> np.ndarray:
        """The label of each canvas in ``rows`` (all when None): the class ``y`` of its largest item."""
        rows = np.arange(len(self.items)) if rows is None else np.asarray(rows, dtype=np.int64)
        return np.asarray(y)[self.items[rows, self.largest[rows]]].astype(np.int64)


def layout(n: int, hw: tuple = (28, 28), split: str = "train") -> Layout:
    """The layout of the ``n`` canvases of ``split`` ("train" or "test") built from ``n`` source
    images of size ``hw``: fixed by the split's seed and ``n`` (never by the limits of a run)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {show(split)}")
    h, w = (int(v) for v in hw)
    if not (0 < h <= MAX_SOURCE and 0 < w <= MAX_SOURCE):
        raise ValueError(f"source images must be at most {MAX_SOURCE}x{MAX_SOURCE}, got {h}x{w}")
    rng = np.random.default_rng([SEED, SPLITS[split]])
    count = rng.integers(1, MAX_ITEMS + 1, n)
    items = np.empty((n, MAX_ITEMS), dtype=np.int64)
    items[:, 0] = np.arange(n)
    items[:, 1:] = rng.integers(0, n, (n, MAX_ITEMS - 1))
    items[np.arange(MAX_ITEMS) >= count[:, None]] = -1
    scale = rng.uniform(SCALES[0], SCALES[1], (n, MAX_ITEMS))
    size = np.floor(scale[..., None] * np.array([h, w]) + 0.5).astype(np.int64)  # rounded half up
    size = np.clip(size, 1, CANVAS)
    pos = np.floor(rng.random((n, MAX_ITEMS, 2)) * (CANVAS - size + 1)).astype(np.int64)  # fully inside
    return Layout(items, size, pos)


def compose(images: np.ndarray, lay: Layout, rows=None) -> np.ndarray:
    """The canvases ``rows`` (all when None) of ``lay`` as float32 (len(rows), 1, CANVAS, CANVAS)
    in [0, 1]: ``images`` (N, H, W) are the split's source images (uint8 0-255, or floats in
    [0, 1]). Items of one slot and one size are resized together, then pasted with ``max()``."""
    import torch  # heavy: loaded when canvases are built
    import torch.nn.functional as F

    rows = np.arange(len(lay.items)) if rows is None else np.asarray(rows, dtype=np.int64)
    out = np.zeros((len(rows), 1, CANVAS, CANVAS), dtype=np.float32)
    canvas = out[:, 0]
    for slot in range(MAX_ITEMS):
        src = lay.items[rows, slot]
        active = np.flatnonzero(src >= 0)  # positions in rows
        if not len(active):
            continue
        size = lay.size[rows[active], slot]
        key = size[:, 0] * (CANVAS + 1) + size[:, 1]
        order = np.argsort(key, kind="stable")
        groups = np.split(active[order], np.flatnonzero(np.diff(key[order])) + 1)
        for group in groups:
            h, w = (int(v) for v in lay.size[rows[group[0]], slot])
            for i in range(0, len(group), RESIZE_CHUNK):
                g = group[i : i + RESIZE_CHUNK]
                x = images[src[g]].astype(np.float32)
                if images.dtype == np.uint8:
                    x /= np.float32(255.0)
                if x.shape[1:] != (h, w):
                    t = torch.from_numpy(x[:, None])
                    t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
                    x = np.clip(t[:, 0].numpy(), 0.0, 1.0)
                top, left = lay.pos[rows[g], slot].T
                # every h x w window of every canvas, as a view: one block copy per item, no per-pixel
                # indices; one item per canvas in a slot, so no window is written twice
                windows = sliding_window_view(canvas, (h, w), axis=(1, 2), writeable=True)
                windows[g, top, left] = np.maximum(windows[g, top, left], x)
    return out


def _rows(n_train: int, req) -> tuple[np.ndarray, np.ndarray | None]:
    """The training canvases a run uses and its validation canvases (None without a split): the
    last canvases of the whole split are held out, then ``train_limit`` applies to those before."""
    if not req.val_split:
        return np.arange(min(req.train_limit or n_train, n_train)), None
    zeros = np.zeros(n_train, dtype=np.int64)
    idx = take_validation(Dataset("rows", np.arange(n_train), zeros, zeros, zeros, 1), req.val_split, req.train_limit)
    if idx.x_val is None:  # "auto" on a small split: none held out
        return idx.x_train[: req.train_limit or n_train], None
    return idx.x_train, idx.x_val


def _need(files, n_out: int, shape: tuple) -> int:
    """Bytes the load needs: both sources whole (every canvas may draw from any image of its split),
    their layouts, the canvases asked for, fitting them to ``shape`` and the working set of a chunk."""
    need = 0
    for images in (files[0], files[2]):
        n, px = images.count, math.prod(images.dims[1:])
        need += n * px + 9 * n + n * MAX_ITEMS * 8 * 8  # bytes as read, labels, the layout and its draws
    need += _float_bytes(n_out, (1, CANVAS, CANVAS))
    c, h, w = shape
    need += (_float_bytes(n_out, (1, h, w)) if (h, w) != (CANVAS, CANVAS) else 0) + (
        _float_bytes(n_out, shape) if c > 1 else 0
    )
    patch = MAX_SOURCE * MAX_SOURCE
    need += 8 * READ_CHUNK + 4 * RESIZE_CHUNK * (math.prod(files[0].dims[1:]) + 4 * patch)
    return need + _float_bytes(4 * RESIZE_CHUNK, shape)


def load_multiscale(directory: str | None, req) -> Dataset | None:
    """The canvases of ``directory`` (default Fashion-MNIST's folder) for the loader's request
    ``req`` (shape, num_classes, train_limit, test_limit, val_split, memory_limit_gb, decode):
    the training, validation and test canvases at CANVAS×CANVAS, not yet fitted to the model
    (None when ``req.decode`` is False: every check made, nothing composed)."""
    d, files = open_splits(directory, KIND)
    try:
        for images in (files[0], files[2]):
            h, w = images.dims[1:]
            if h > MAX_SOURCE or w > MAX_SOURCE:
                raise AccelcError(
                    f"'{show(images.path)}' holds {h}x{w} images; --data {KIND} pastes them at up to "
                    f"{SCALES[1]:g}x on a {CANVAS}x{CANVAS} canvas, so they must be at most {MAX_SOURCE}x{MAX_SOURCE}"
                )
        train_rows, val_rows = _rows(files[0].count, req)
        test_rows = np.arange(min(req.test_limit or files[2].count, files[2].count))
        n_out = len(train_rows) + len(test_rows) + (0 if val_rows is None else len(val_rows))
        check_memory(
            f"composing the {KIND} canvases from '{show(d)}'", _need(files, n_out, req.shape), req.memory_limit_gb
        )
        out = {}
        for split, images, labels in (("train", files[0], files[1]), ("test", files[2], files[3])):
            y = labels.read().astype(np.int64)
            _check_labels(y, req.num_classes, f"'{show(labels.path)}'")
            out[split] = (images, y)
        if not req.decode:
            return None
        built = {}
        for split, (images, y) in out.items():
            x = images.read()
            lay = layout(len(x), x.shape[1:], split)
            parts = {"test": test_rows} if split == "test" else {"train": train_rows, "val": val_rows}
            for part, rows in parts.items():
                if rows is not None:
                    built[part] = (compose(x, lay, rows), lay.labels(y, rows))
            del x
    finally:
        for f in files:
            f.close()
    k = max(FASHION_CLASSES, *(int(y.max()) + 1 for _, y in out.values()))
    ds = Dataset(KIND, *built["train"], *built["test"], k)
    if "val" in built:
        ds.x_val, ds.y_val = built["val"]
    return ds
