"""Datasets for ``accelc train`` and ``accelc bench``, shaped to the model's input.

Specs (``--data``):
  synthetic[:N]          built in, deterministic, no download: N training images (default 6000)
  fashion-mnist[:DIR]    IDX files (default DIR /usr/share/datasets/fashion-mnist, Debian's
                         dataset-fashion-mnist package)
  imagefolder:DIR        DIR/<class>/*.png|jpg (or DIR/train/<class>, DIR/test/<class>)

Every dataset is adapted to the model input (channels replicated or averaged, bilinear resize) and
normalised to zero mean / unit variance with training-set statistics. Shuffling is seeded per
epoch, so two runs with one seed see the same batches.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..compiler.errors import AccelcError

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray  # N, C, H, W float32
    y_train: np.ndarray  # N int64
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def shape(self):
        return tuple(self.x_train.shape[1:])

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(self.x_train) // batch_size

    def order(self, epoch: int, seed: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(len(self.x_train))

    def batches(self, epoch: int, batch_size: int, seed: int, start: int = 0):
        """Yield (step, x, y) for one epoch; the last partial batch is dropped (fixed shapes)."""
        perm = self.order(epoch, seed)
        for s in range(start, self.steps_per_epoch(batch_size)):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            yield s, self.x_train[idx], self.y_train[idx]

    def test_batches(self, batch_size: int):
        for i in range(0, len(self.x_test), batch_size):
            yield self.x_test[i : i + batch_size], self.y_test[i : i + batch_size]

    def resized(self, hw: tuple) -> "Dataset":
        """The same data at another spatial size (for low-resolution training stages)."""
        return Dataset(
            self.name + f"@{hw[0]}x{hw[1]}",
            resize(self.x_train, hw),
            self.y_train,
            resize(self.x_test, hw),
            self.y_test,
            self.num_classes,
        )


def resize(x: np.ndarray, hw: tuple) -> np.ndarray:
    import torch  # heavy: loaded when data is resized
    import torch.nn.functional as F

    if tuple(x.shape[2:]) == tuple(hw):
        return x
    out = []
    for i in range(0, len(x), 4096):
        t = torch.from_numpy(np.ascontiguousarray(x[i : i + 4096]))
        out.append(F.interpolate(t, size=tuple(hw), mode="bilinear", align_corners=False, antialias=True).numpy())
    return np.concatenate(out).astype(np.float32)


def adapt(x: np.ndarray, shape: tuple) -> np.ndarray:
    """Fit N,C,H,W images to the model's (C, H, W)."""
    c, h, w = shape
    if x.shape[1] != c:
        if x.shape[1] == 1:
            x = np.repeat(x, c, axis=1)
        elif c == 1:
            x = x.mean(axis=1, keepdims=True)
        else:
            raise AccelcError(f"cannot map {x.shape[1]}-channel images to a {c}-channel model input")
    return resize(x.astype(np.float32), (h, w))


def _normalise(ds: Dataset) -> Dataset:
    mean, std = float(ds.x_train.mean()), float(ds.x_train.std()) or 1.0
    ds.x_train = ((ds.x_train - mean) / std).astype(np.float32)
    ds.x_test = ((ds.x_test - mean) / std).astype(np.float32)
    return ds


# ----------------------------------------------------------------------------- synthetic
def _shape_masks(kind: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """u, v: per-image coordinates relative to the shape centre, in units of its radius."""
    r = np.sqrt(u * u + v * v)
    m = np.zeros_like(u, dtype=bool)
    k = kind[:, None, None]
    m |= (k == 0) & (r <= 1.0)  # disk
    m |= (k == 1) & (np.maximum(abs(u), abs(v)) <= 0.85)  # square
    m |= (k == 2) & (v <= 0.8) & (v >= 1.7 * abs(u) - 0.9)  # triangle
    m |= (k == 3) & (((abs(u) <= 0.3) & (abs(v) <= 1.0)) | ((abs(v) <= 0.3) & (abs(u) <= 1.0)))  # cross
    m |= (k == 4) & (r <= 1.0) & (r >= 0.6)  # ring
    return m


def synthetic(shape: tuple, num_classes: int, n_train: int = 6000, n_test: int = 1000, seed: int = 1234) -> Dataset:
    """Shapes × textures at random positions, scales and contrasts over smooth background clutter.

    Class k is (shape k mod 5, texture k div 5 mod 4); textures are solid, horizontal stripes,
    vertical stripes, checker, with random phase and frequency. Learnable, not trivial.
    """
    c, h, w = shape

    def make(n, rng):
        y = rng.integers(0, num_classes, n)
        kind = y % 5
        tex = (y // 5) % 4
        extra = y // 20  # beyond 20 classes: orientation of the shape
        yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
        scale = rng.uniform(0.22, 0.42, n).astype(np.float32) * min(h, w)
        cy = rng.uniform(0.3, 0.7, n).astype(np.float32) * h
        cx = rng.uniform(0.3, 0.7, n).astype(np.float32) * w
        ang = (extra * 0.7 + rng.normal(0, 0.15, n)).astype(np.float32)
        du = (xx[None] - cx[:, None, None]) / scale[:, None, None]
        dv = (yy[None] - cy[:, None, None]) / scale[:, None, None]
        ca, sa = np.cos(ang)[:, None, None], np.sin(ang)[:, None, None]
        u, v = ca * du - sa * dv, sa * du + ca * dv
        mask = _shape_masks(kind, u, v).astype(np.float32)
        freq = rng.uniform(2.5, 4.0, n).astype(np.float32)[:, None, None]
        ph = rng.uniform(0, 2 * np.pi, n).astype(np.float32)[:, None, None]
        t = tex[:, None, None]
        stripes_h = np.sin(freq * v * np.pi + ph) > 0
        stripes_v = np.sin(freq * u * np.pi + ph) > 0
        fill = np.where(t == 0, 1.0, np.where(t == 1, stripes_h, np.where(t == 2, stripes_v, stripes_h ^ stripes_v)))
        fill = fill.astype(np.float32) * 0.8 + 0.2
        contrast = rng.uniform(0.5, 1.0, n).astype(np.float32)[:, None, None]
        img = mask * fill * contrast
        # smooth clutter: a few random low-frequency waves
        bg = np.zeros_like(img)
        for _ in range(3):
            fy, fx = rng.uniform(0.5, 2.5, (2, n)).astype(np.float32)
            p0 = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
            bg += np.sin(
                2 * np.pi * (fy[:, None, None] * yy[None] / h + fx[:, None, None] * xx[None] / w) + p0[:, None, None]
            )
        img = img + 0.12 * bg + rng.normal(0, 0.12, img.shape).astype(np.float32)
        if c == 1:
            x = img[:, None]
        else:
            colour = rng.uniform(0.4, 1.0, (n, c, 1, 1)).astype(np.float32)
            x = img[:, None] * colour + rng.normal(0, 0.05, (n, c, h, w)).astype(np.float32)
        return x.astype(np.float32), y.astype(np.int64)

    rng = np.random.default_rng(seed)
    xtr, ytr = _chunked(make, n_train, rng)
    xte, yte = _chunked(make, n_test, rng)
    return _normalise(Dataset("synthetic", xtr, ytr, xte, yte, num_classes))


def _chunked(make, n, rng, chunk=2000):
    xs, ys = [], []
    for i in range(0, n, chunk):
        x, y = make(min(chunk, n - i), rng)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


# ----------------------------------------------------------------------------- Fashion-MNIST
def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 8 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise AccelcError(f"'{path}' is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise AccelcError(f"'{path}' is truncated")
    return arr.reshape(dims)


def _find(d: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (d / name).exists():
            return d / name
    raise AccelcError(
        f"Fashion-MNIST file '{stem}[.gz]' not found in '{d}'. Install Debian's package "
        f"(apt-get install dataset-fashion-mnist) or pass --data fashion-mnist:DIR"
    )


def fashion_mnist(directory: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    d = Path(directory or FASHION_DIR)
    if not d.is_dir():
        raise AccelcError(
            f"Fashion-MNIST folder '{d}' not found. Install Debian's package "
            f"(apt-get install dataset-fashion-mnist) or pass --data fashion-mnist:DIR"
        )
    xtr = _read_idx(_find(d, "train-images-idx3-ubyte"))
    ytr = _read_idx(_find(d, "train-labels-idx1-ubyte"))
    xte = _read_idx(_find(d, "t10k-images-idx3-ubyte"))
    yte = _read_idx(_find(d, "t10k-labels-idx1-ubyte"))
    f = lambda a: (a.astype(np.float32) / 255.0)[:, None]  # noqa: E731
    return f(xtr), ytr.astype(np.int64), f(xte), yte.astype(np.int64)


# ----------------------------------------------------------------------------- image folder
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm"}


def _read_folder(d: Path, shape: tuple, classes: list[str] | None = None):
    from PIL import Image  # heavy, optional: only image folders need it

    c, h, w = shape
    classes = classes or sorted(p.name for p in d.iterdir() if p.is_dir())
    if not classes:
        raise AccelcError(f"image folder '{d}' has no class subfolders")
    xs, ys = [], []
    for k, name in enumerate(classes):
        sub = d / name
        if not sub.is_dir():
            continue
        for f in sorted(sub.iterdir()):
            if f.suffix.lower() not in IMAGE_EXT:
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
                    a = np.asarray(im, dtype=np.float32) / 255.0
            except OSError as e:
                raise AccelcError(f"cannot read image '{f}': {e}") from None
            xs.append(a[None] if c == 1 else a.transpose(2, 0, 1))
            ys.append(k)
    if not xs:
        raise AccelcError(f"image folder '{d}' has no images")
    x = np.stack(xs).astype(np.float32)
    if x.shape[1] != c:
        x = adapt(x, shape)
    return x, np.array(ys, dtype=np.int64), classes


def image_folder(directory: str, shape: tuple):
    d = Path(directory)
    if not d.is_dir():
        raise AccelcError(f"image folder '{d}' not found")
    if (d / "train").is_dir() and (d / "test").is_dir():
        xtr, ytr, classes = _read_folder(d / "train", shape)
        xte, yte, _ = _read_folder(d / "test", shape, classes)
        return xtr, ytr, xte, yte, len(classes)
    x, y, classes = _read_folder(d, shape)
    perm = np.random.default_rng(0).permutation(len(x))
    n_test = max(1, len(x) // 5)
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te], len(classes)


# ----------------------------------------------------------------------------- entry point
def load_data(
    spec: str, shape: tuple, num_classes: int, train_limit: int | None = None, test_limit: int | None = None
) -> Dataset:
    """Build the dataset ``spec`` fitted to a model input ``shape`` (C, H, W) and class count."""
    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        try:
            n = int(arg) if arg else (train_limit or 6000)
        except ValueError:
            raise AccelcError(f"--data synthetic:N needs an integer N, got '{arg}'") from None
        if n <= 0:
            raise AccelcError("--data synthetic:N needs N > 0")
        ds = synthetic(shape, num_classes, n, test_limit or max(500, n // 6))
    elif kind == "fashion-mnist":
        xtr, ytr, xte, yte = fashion_mnist(arg or None)
        if num_classes < 10:
            raise AccelcError(f"Fashion-MNIST has 10 classes; the model outputs {num_classes}")
        ds = Dataset("fashion-mnist", xtr, ytr, xte, yte, 10)
    elif kind == "imagefolder":
        if not arg:
            raise AccelcError("--data imagefolder:DIR needs a folder")
        xtr, ytr, xte, yte, k = image_folder(arg, shape)
        if k > num_classes:
            raise AccelcError(f"image folder has {k} classes; the model outputs {num_classes}")
        ds = Dataset(f"imagefolder:{os.path.basename(arg.rstrip('/'))}", xtr, ytr, xte, yte, k)
    else:
        raise AccelcError(f"unknown --data '{spec}'; use synthetic[:N], fashion-mnist[:DIR] or imagefolder:DIR")
    if train_limit and kind != "synthetic":
        ds.x_train, ds.y_train = ds.x_train[:train_limit], ds.y_train[:train_limit]
    if test_limit and kind != "synthetic":
        ds.x_test, ds.y_test = ds.x_test[:test_limit], ds.y_test[:test_limit]
    if kind != "synthetic":
        ds.x_train, ds.x_test = adapt(ds.x_train, shape), adapt(ds.x_test, shape)
        ds = _normalise(ds)
    return ds
