"""Datasets for ``accelc train`` and ``accelc bench``, shaped to the model's input.

Specs (``--data``):
  synthetic[:N]          built in, deterministic, no download: N training images (default 6000)
  fashion-mnist[:DIR]    IDX files (default DIR /usr/share/datasets/fashion-mnist, Debian's
                         dataset-fashion-mnist package)
  imagefolder:DIR        DIR/<class>/*.png|jpg (or DIR/train/<class>, DIR/test/<class>)

Data given in Python (``accelc.train(..., data=...)``; :func:`in_memory_data`):
``(x_train, y_train, x_test, y_test)`` numpy arrays or torch tensors, ``(train, test)`` with each
a torch ``Dataset``, ``DataLoader`` or ``(x, y)`` pair, or a dict with those four keys. Images are
N, C, H, W floating point at the model's input shape and are used as given (not resized, not
normalised: preprocess them as for torch); labels are integer class indices. A torch dataset is
read once into memory (random transforms apply once); a shuffling DataLoader reads in another
order each time, so give its Dataset instead to resume a run (accelc shuffles by its seed).

Every dataset given as a spec is adapted to the model input (channels replicated or averaged,
bilinear resize) and normalised to zero mean / unit variance with training-set statistics.
Shuffling is seeded per epoch, so two runs with one seed see the same batches.

Data files are untrusted: every label is checked against the model's class count, image and label
counts must agree, and a damaged file is one clear error naming it. The memory a dataset needs is
estimated from its headers (IDX dimensions, file counts, N for synthetic) and checked against the
limit *before* anything large is read or generated, so a gzip bomb or ``synthetic:100000000`` is
refused in a second instead of exhausting the machine.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import operator
import os
import stat
import sys
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..compiler import checks
from ..compiler.errors import AccelcError, InvalidType, InvalidValue, exception_text, show
from ..compiler.resources import check_memory, fmt_bytes

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = 10


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
        perm = self.order(epoch, seed)
        for s in range(start, self.steps_per_epoch(batch_size)):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            yield s, self.x_train[idx], self.y_train[idx]

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


# ----------------------------------------------------------------------------- synthetic
SYNTH_CHUNK = 2000  # images generated per step
# float32 arrays of one chunk's n x H x W alive at once while generating (coordinates, masks,
# stripes, clutter, noise): measured (tracemalloc) about 9 + 3.6 C; counted with margin
SYNTH_TEMPS = 14


def _synthetic_bytes(shape: tuple, n_train: int, n_test: int) -> int:
    """Peak memory of ``synthetic``: both splits (float32, filled in place) plus one chunk's
    temporaries."""
    c, h, w = shape
    chunk = min(SYNTH_CHUNK, max(n_train, n_test))
    temps = 4 * chunk * h * w * (SYNTH_TEMPS + 3 * c)
    return _float_bytes(n_train + n_test, shape) + 8 * (n_train + n_test) + temps


def _check_synthetic_memory(shape: tuple, n_train: int, n_test: int, memory_limit_gb: float | None) -> None:
    what = f"generating synthetic data ({n_train} + {n_test} images of {'x'.join(map(str, shape))})"
    check_memory(what, _synthetic_bytes(shape, n_train, n_test), memory_limit_gb)


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


def synthetic(
    shape: tuple,
    num_classes: int,
    n_train: int = 6000,
    n_test: int = 1000,
    seed: int = 1234,
    memory_limit_gb: float | None = None,
) -> Dataset:
    """Shapes × textures at random positions, scales and contrasts over smooth background clutter.

    Class k is (shape k mod 5, texture k div 5 mod 4); textures are solid, horizontal stripes,
    vertical stripes, checker, with random phase and frequency. Learnable, not trivial.
    """
    c, h, w = shape
    _check_synthetic_memory(shape, n_train, n_test, memory_limit_gb)

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
    xtr, ytr = _chunked(make, n_train, shape, rng)
    xte, yte = _chunked(make, n_test, shape, rng)
    return _normalise(Dataset("synthetic", xtr, ytr, xte, yte, num_classes))


def _chunked(make, n, shape, rng, chunk=SYNTH_CHUNK):
    x = np.empty((n, *shape), dtype=np.float32)  # filled in place: no list of chunks plus a concatenation
    y = np.empty(n, dtype=np.int64)
    for i in range(0, n, chunk):
        x[i : i + chunk], y[i : i + chunk] = make(min(chunk, n - i), rng)
    return x, y


# ----------------------------------------------------------------------------- IDX files (Fashion-MNIST)
GZIP_MAGIC = b"\x1f\x8b"
IDX_TYPES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}
READ_CHUNK = 1 << 20  # bytes per read: a stream is never inflated further than this ahead of its check
# deflate cannot expand more than 1032:1; a header declaring more than this per compressed byte is a lie
MAX_DEFLATE_RATIO = 1100
# real image data compresses a few times (Fashion-MNIST 1.8x, MNIST 4.7x); a large images file that
# claims to inflate more than this is refused as a gzip bomb (a plain IDX file is tied to its size on
# disk, so one that is genuine can be gunzipped and read)
MAX_GZIP_EXPANSION = 100
GZIP_EXPANSION_FLOOR = 64 << 20  # below this many declared bytes, no expansion check


def _decode_error(path: Path, e: BaseException) -> AccelcError:
    """One line for an error raised while reading ``path`` (never the file's content)."""
    if isinstance(e, EOFError):
        why = "truncated (the compressed stream ends early)"
    elif isinstance(e, gzip.BadGzipFile):
        why = f"not a valid gzip stream ({str(e).split(' (b')[0].strip() or 'bad header'})"
    elif isinstance(e, zlib.error):
        why = f"a damaged gzip stream ({e})"
    elif isinstance(e, MemoryError):
        why = "too large for the memory available"
    elif isinstance(e, OSError):
        why = f"unreadable ({e.strerror or e})"
    else:
        why = f"malformed ({type(e).__name__}: {e})"
    return AccelcError(f"'{show(path)}' is {show(why)}")


class _IdxFile:
    """An IDX file of unsigned bytes (plain or gzip), opened with its header read and checked and
    its data not yet read: the caller sizes the load from ``dims`` before any data is inflated."""

    def __init__(self, path: Path, role: str, ndim: int):
        self.path, self.role = path, role
        self._raw = self._fh = None
        try:
            self._open(ndim)
        except BaseException as e:
            self.close()
            if isinstance(e, AccelcError):
                raise
            if isinstance(e, (OSError, EOFError, zlib.error, ValueError, MemoryError)):
                raise _decode_error(path, e) from None
            raise

    def _bad(self, why: str) -> AccelcError:
        return AccelcError(f"'{show(self.path)}' {why}")

    def _open(self, ndim: int) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO or device must not block
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self._bad("is not a regular file")
        os.set_blocking(fd, True)
        self._raw = os.fdopen(fd, "rb")
        file_size = os.fstat(self._raw.fileno()).st_size
        self.compressed = self._raw.read(2) == GZIP_MAGIC
        self._raw.seek(0)
        if self.compressed:
            self._fh = gzip.GzipFile(fileobj=self._raw, mode="rb")
        elif self.path.suffix == ".gz":
            raise self._bad("is named .gz but is not a gzip file")
        else:
            self._fh = self._raw
        head = self._fh.read(4)  # a gzip stream is inflated only this far
        if len(head) < 4 or head[:2] != b"\x00\x00":
            raise self._bad("is not an IDX file (bad magic number)")
        if head[2] != 0x08:
            kind = IDX_TYPES.get(head[2])
            if kind is None:
                raise self._bad(f"is not an IDX file (unknown type code 0x{head[2]:02X})")
            raise self._bad(
                f"holds {kind} values (IDX type 0x{head[2]:02X}); {self.role} must be unsigned bytes (0x08)"
            )
        if head[3] != ndim:
            layout = "1-D (N)" if ndim == 1 else "3-D (N, H, W)"
            dims = f"{head[3]} dimension" + ("" if head[3] == 1 else "s")
            raise self._bad(f"has {dims}; an IDX {self.role} file must be {layout}")
        raw_dims = self._fh.read(4 * ndim)
        if len(raw_dims) < 4 * ndim:
            raise self._bad("is truncated (its header ends early)")
        self.dims = tuple(int.from_bytes(raw_dims[4 * i : 4 * i + 4], "big") for i in range(ndim))
        if self.dims[0] == 0:
            raise self._bad(f"holds no {self.role}")
        if 0 in self.dims[1:]:
            raise self._bad(f"holds images of size {self.dims[1]}x{self.dims[2]}")
        self.size = math.prod(self.dims)  # bytes of data the header declares
        header = 4 + 4 * ndim
        if not self.compressed and file_size != header + self.size:
            state = "is truncated" if file_size < header + self.size else "has trailing data"
            raise self._bad(
                f"{state}: its header declares {self.size} bytes of data, the file holds {file_size - header}"
            )
        if self.compressed and self.size > MAX_DEFLATE_RATIO * file_size + (1 << 20):
            raise self._bad(
                f"is truncated or corrupt: its header declares {self.size} bytes of data, more than a "
                f"{file_size}-byte gzip file can hold"
            )
        if (
            self.compressed
            and self.role == "images"
            and self.size > GZIP_EXPANSION_FLOOR
            and self.size > MAX_GZIP_EXPANSION * file_size
        ):
            raise self._bad(
                f"would inflate from {fmt_bytes(file_size)} to {fmt_bytes(self.size)} ({self.size // file_size}x), "
                f"far more than image data compresses: a gzip bomb? If the file is genuine, gunzip it and "
                f"pass the plain IDX file"
            )

    @property
    def count(self) -> int:
        return self.dims[0]

    def read(self, keep: int | None = None) -> np.ndarray:
        """The first ``keep`` records (all when None), read in bounded chunks; the rest of the file is
        streamed through and verified (exact length, gzip CRC) without being kept."""
        keep = self.count if keep is None else min(keep, self.count)
        record = self.size // self.count
        try:
            out = np.empty(keep * record, dtype=np.uint8)
            got = self._fill(memoryview(out))
            rest = (self.count - keep) * record
            while rest and got == len(out):  # verified, not kept
                n = len(self._fh.read(min(READ_CHUNK, rest)))
                if not n:
                    break
                rest -= n
            if got < len(out) or rest:
                raise self._bad(f"is truncated: its header declares {self.size} bytes of data, it holds fewer")
            try:
                extra = self._fh.read(1)  # also ends the gzip member: its CRC and length are checked
            except gzip.BadGzipFile as e:
                if str(e).startswith("Not a gzipped file"):  # bytes after the member that start no other
                    raise self._bad("has trailing data after its gzip stream") from None
                raise
            if extra:
                raise self._bad(f"has trailing data after the {self.size} bytes its header declares")
        except AccelcError:
            raise
        except (OSError, EOFError, zlib.error, ValueError, MemoryError) as e:
            raise _decode_error(self.path, e) from None
        finally:
            self.close()
        return out.reshape((keep, *self.dims[1:]))

    def _fill(self, buf: memoryview) -> int:
        got = 0
        while got < len(buf):
            n = self._fh.readinto(buf[got : got + READ_CHUNK])
            if not n:
                break
            got += n
        return got

    def close(self) -> None:
        for f in (self._fh, self._raw):
            if f is not None:
                try:
                    f.close()
                except (OSError, EOFError, zlib.error):
                    pass


def _find(d: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (d / name).exists():
            return d / name
    raise AccelcError(
        f"Fashion-MNIST file '{stem}[.gz]' not found in '{show(d)}'. Install Debian's package "
        f"(apt-get install dataset-fashion-mnist) or pass --data fashion-mnist:DIR"
    )


def fashion_mnist(
    directory: str | None = None,
    *,
    shape: tuple | None = None,
    num_classes: int | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    memory_limit_gb: float | None = None,
    read_images: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST (or any IDX image/label set) as float32 N,1,H,W in [0, 1] and int64 labels.

    All four headers are read and checked (dimensions, image/label counts) and the memory the load
    needs -- adapted to a model input ``shape`` when given -- is checked before any data is read;
    labels are checked against ``num_classes`` when given. ``read_images=False`` stops after the
    labels (the image arrays come back as None): every check but the images' bodies, in a second."""
    d = Path(directory or FASHION_DIR)
    if not d.is_dir():
        raise AccelcError(
            f"Fashion-MNIST folder '{show(d)}' not found. Install Debian's package "
            f"(apt-get install dataset-fashion-mnist) or pass --data fashion-mnist:DIR"
        )
    files = []
    try:
        for split, limit in (("train", train_limit), ("t10k", test_limit)):
            images = _IdxFile(_find(d, f"{split}-images-idx3-ubyte"), "images", 3)
            files.append(images)
            labels = _IdxFile(_find(d, f"{split}-labels-idx1-ubyte"), "labels", 1)
            files.append(labels)
            if images.count != labels.count:
                raise AccelcError(
                    f"'{show(images.path)}' holds {images.count} images but '{show(labels.path)}' "
                    f"holds {labels.count} labels"
                )
        need = 0
        for images, limit in ((files[0], train_limit), (files[2], test_limit)):
            n = images.count if limit is None else min(limit, images.count)
            pixels = n * math.prod(images.dims[1:])
            need += pixels + 4 * pixels + 8 * n  # bytes as read, as float32, labels as int64
            if shape is not None:  # adapted to the model input: resized, then the channel replicated
                c, h, w = shape
                need += (_float_bytes(n, (1, h, w)) if (h, w) != images.dims[1:] else 0) + (
                    _float_bytes(n, shape) if c > 1 else 0
                )
        need += 8 * READ_CHUNK + (_float_bytes(4 * RESIZE_CHUNK, shape) if shape is not None else 0)
        check_memory(f"loading the IDX data in '{show(d)}'", need, memory_limit_gb)
        out = []
        for images, labels, limit in ((files[0], files[1], train_limit), (files[2], files[3], test_limit)):
            y = labels.read(limit).astype(np.int64)
            if num_classes is not None:
                _check_labels(y, num_classes, f"'{show(labels.path)}'")
            if not read_images:
                out += [None, y]
                continue
            raw = images.read(limit)
            x = raw.astype(np.float32)
            del raw
            x /= np.float32(255.0)
            out += [x[:, None], y]
    finally:
        for f in files:
            f.close()
    return out[0], out[1], out[2], out[3]


# ----------------------------------------------------------------------------- image folder
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm"}
MAX_IMAGE_PIXELS = 50_000_000  # per image: a larger one is refused before it is decoded (decompression bombs)


def _image_files(d: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """The images of each class folder; every one (and every class folder) must lie inside the data
    folder once symbolic links are resolved: nothing is read from outside it."""
    root = (d.parent if d.name in ("train", "test") else d).resolve()

    def inside(p: Path) -> Path:
        r = p.resolve()
        if r != root and root not in r.parents:
            raise AccelcError(f"'{show(p)}' is a symbolic link out of the image folder '{show(root)}'; refused")
        return r

    files = []
    for k, name in enumerate(classes):
        sub = d / name
        if not sub.is_dir():
            continue
        inside(sub)
        for f in sorted(sub.iterdir()):
            if f.suffix.lower() in IMAGE_EXT and f.is_file():
                inside(f)
                files.append((f, k))
    return files


@contextlib.contextmanager
def _decoding_image(f: Path):
    """Any failure while opening or decoding image ``f`` (an untrusted file) as one line."""
    from PIL import Image  # heavy, optional: only image folders need it

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's own limit: an error, too
            yield Image
    except AccelcError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise AccelcError(f"image '{show(f)}' is too large to decode safely ({show(e, 120)})") from None
    except OSError as e:
        raise AccelcError(f"cannot read image '{show(f)}': {show(e, 160)}") from None
    except Exception as e:  # any decoder failure is a bad image, never a traceback
        raise AccelcError(f"cannot read image '{show(f)}': {type(e).__name__}: {show(e, 160)}") from None


def _image_pixels(f: Path) -> int:
    """Pixels of image ``f`` from its header (nothing decoded); refuses one over MAX_IMAGE_PIXELS."""
    with _decoding_image(f) as Image, Image.open(f) as im:
        iw, ih = im.size
    if iw * ih > MAX_IMAGE_PIXELS:
        raise AccelcError(
            f"image '{show(f)}' is {iw}x{ih} pixels, over the limit of {MAX_IMAGE_PIXELS:,} (a decompression bomb?)"
        )
    return iw * ih


def _read_image(f: Path, c: int, h: int, w: int) -> np.ndarray:
    with _decoding_image(f) as Image, Image.open(f) as im:
        if im.size[0] * im.size[1] > MAX_IMAGE_PIXELS:  # changed since its header was checked
            raise AccelcError(f"image '{show(f)}' is over the limit of {MAX_IMAGE_PIXELS:,} pixels")
        im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
        a = np.asarray(im, dtype=np.float32) / 255.0
    return a[None] if c == 1 else a.transpose(2, 0, 1)


def _read_folder(
    d: Path,
    shape: tuple,
    classes: list[str] | None = None,
    memory_limit_gb: float | None = None,
    decode: bool = True,
    num_classes: int | None = None,
):
    c, h, w = shape
    try:
        classes = classes or sorted(p.name for p in d.iterdir() if p.is_dir())
        files = _image_files(d, classes)
    except OSError as e:
        raise AccelcError(f"cannot read image folder '{show(d)}': {e.strerror or e}") from None
    if not classes:
        raise AccelcError(f"image folder '{show(d)}' has no class subfolders")
    if num_classes is not None and len(classes) > num_classes:
        raise AccelcError(f"image folder '{show(d)}' has {len(classes)} classes; the model outputs {num_classes}")
    if not files:
        raise AccelcError(f"image folder '{show(d)}' has no images")
    largest = max(_image_pixels(f) for f, _ in files)  # every header checked before anything is decoded
    ic = 1 if c == 1 else 3
    # the stack, the train/test split's copy, the adapted copy, and the largest image decoded (RGBA,
    # plus its converted copy)
    need = 3 * _float_bytes(len(files), (max(c, ic), h, w)) + 8 * largest
    check_memory(f"loading {len(files)} images from '{show(d)}'", need, memory_limit_gb)
    y = np.array([k for _, k in files], dtype=np.int64)
    if not decode:
        return None, y, classes
    x = np.empty((len(files), ic, h, w), dtype=np.float32)
    for i, (f, _) in enumerate(files):
        x[i] = _read_image(f, c, h, w)
    if ic != c:
        x = adapt(x, shape)
    return x, y, classes


def image_folder(
    directory: str,
    shape: tuple,
    memory_limit_gb: float | None = None,
    decode: bool = True,
    num_classes: int | None = None,
):
    """(x_train, y_train, x_test, y_test, classes); ``decode=False``: every image's header checked,
    nothing decoded (the x come back as None)."""
    d = Path(directory)
    if not d.is_dir():
        raise AccelcError(f"image folder '{show(d)}' not found")
    if (d / "train").is_dir() and (d / "test").is_dir():
        xtr, ytr, classes = _read_folder(d / "train", shape, None, memory_limit_gb, decode, num_classes)
        xte, yte, _ = _read_folder(d / "test", shape, classes, memory_limit_gb, decode)
        return xtr, ytr, xte, yte, len(classes)
    x, y, classes = _read_folder(d, shape, None, memory_limit_gb, decode, num_classes)
    if len(y) < 2:
        raise AccelcError(f"image folder '{show(d)}' has {len(y)} image; a training and a test split need at least 2")
    perm = np.random.default_rng(0).permutation(len(y))
    n_test = max(1, len(y) // 5)
    te, tr = perm[:n_test], perm[n_test:]
    if x is None:
        return None, y[tr], None, y[te], len(classes)
    return x[tr], y[tr], x[te], y[te], len(classes)


# ----------------------------------------------------------------------------- data given in Python
DATA_FORMS = (
    "(x_train, y_train, x_test, y_test) arrays, (train, test) with each a torch Dataset, DataLoader or "
    "(x, y) pair, or a dict with keys x_train, y_train, x_test, y_test"
)
MATERIALISE_CHECK = 1024  # items between memory checks while a torch dataset is read
# A torch dataset or DataLoader without a __len__ (an IterableDataset, a generator-backed stream) is
# read until it ends, at most this many samples: an endless stream is refused here, in seconds,
# instead of being read until memory runs out. ``train_limit``/``test_limit`` read only that many
# samples of a split (any torch dataset), which is how to train on the start of an endless stream.
MAX_STREAM_SAMPLES = 1_000_000


class InMemoryData(str):
    """``data`` given in Python (numpy arrays, torch tensors, a torch ``Dataset``/``DataLoader``),
    read once and checked on its own (see :func:`in_memory_data`).

    The string is the data's stable description -- ``arrays(sha256=..., N+M images)``, the SHA-256
    of the four arrays' dtypes, shapes and bytes -- which is what a run's fingerprint and summary
    record (a resume with other arrays is refused by it); the object carries the arrays. Images are
    used as given (N, C, H, W float32: neither resized nor normalised, as torch would take them);
    :func:`load_data` checks them against the model's input shape and class count."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def __new__(cls, x_train, y_train, x_test, y_test):
        h = hashlib.sha256()
        for a in (x_train, y_train, x_test, y_test):
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
        self = super().__new__(cls, f"arrays(sha256={h.hexdigest()}, {len(x_train)}+{len(x_test)} images)")
        self.x_train, self.y_train, self.x_test, self.y_test = x_train, y_train, x_test, y_test
        return self

    def __reduce__(self):  # a copy (pickle, deepcopy) keeps the arrays, not just the description
        return (InMemoryData, (self.x_train, self.y_train, self.x_test, self.y_test))


def _torch():
    return sys.modules.get("torch")  # a torch object exists only where torch is imported already


def _is_torch_source(obj) -> bool:
    torch = _torch()
    if torch is None:
        return False
    return isinstance(obj, (torch.utils.data.Dataset, torch.utils.data.DataLoader))


def _tensor_array(torch, v, what: str) -> np.ndarray:
    """A torch tensor's values as a numpy array; a tensor that holds no plain values (sparse,
    nested, quantized, on the meta device) is one line saying what to give instead."""
    if v.is_nested:
        raise InvalidValue(f"data: {what} is a nested tensor; give one (N, C, H, W) tensor (torch.stack the images)")
    if v.layout != torch.strided:
        raise InvalidValue(
            f"data: {what} is a sparse tensor ({str(v.layout).removeprefix('torch.')}); give a dense one (.to_dense())"
        )
    if v.is_meta:
        raise InvalidValue(f"data: {what} is on the meta device: it has shapes but no values")
    if v.is_quantized:
        raise InvalidValue(f"data: {what} is a quantized tensor ({v.dtype}); give float images (.dequantize())")
    v = v.detach()
    if v.dtype == torch.bfloat16:  # numpy has no bfloat16: images widen exactly to float32
        if what.startswith("y"):
            raise InvalidValue(f"data: {what} must hold integer class indices, got {v.dtype}")
        v = v.float()
    try:
        return v.cpu().resolve_conj().resolve_neg().numpy()
    except (TypeError, RuntimeError, NotImplementedError, ValueError) as e:
        raise InvalidValue(f"data: {what} ({v.dtype}) cannot be read as an array: {exception_text(e, 160)}") from None


def _as_array(v, what: str) -> np.ndarray:
    torch = _torch()
    if torch is not None and isinstance(v, torch.Tensor):
        return _tensor_array(torch, v, what)
    if isinstance(v, np.ndarray):
        return v
    if isinstance(v, (list, tuple)) or np.isscalar(v):
        try:
            return np.asarray(v)
        except (ValueError, TypeError):
            raise InvalidValue(f"data: {what} is not a rectangular array") from None
    raise InvalidType(f"data: {what} must be a numpy array or torch tensor, got {type(v).__name__}")


def _length(source, split: str, kind: str) -> int | None:
    """``len(source)``, or None where it has none (an IterableDataset; a DataLoader over one)."""
    length = getattr(type(source), "__len__", None)
    if length is None:
        return None
    try:
        n = operator.index(length(source))
    except TypeError:  # no usable length (torch's DataLoader over an IterableDataset raises this)
        return None
    except Exception as e:  # the user's __len__ failing: its reason, in one line
        raise AccelcError(
            f"data: the {split} {kind}'s __len__ failed: {type(e).__name__}: {exception_text(e, 160)}"
        ) from None
    if n < 0:
        raise InvalidValue(f"data: the {split} {kind}'s __len__ returned a negative number ({n})")
    return n


def _materialise(source, split: str, memory_limit_gb, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A torch Dataset (map-style or iterable) or DataLoader read once into (x, y) arrays; items or
    batches must be (x, y). Random transforms are applied once, here. ``limit``: read only the
    first ``limit`` samples. A source without a ``__len__`` is read until it ends, at most
    :data:`MAX_STREAM_SAMPLES` samples (beyond: refused as endless); one with a ``__len__`` that
    is iterated may yield no more items than it says."""
    torch = _torch()
    loader = isinstance(source, torch.utils.data.DataLoader)
    kind = (
        "DataLoader"
        if loader
        else ("IterableDataset" if isinstance(source, torch.utils.data.IterableDataset) else "Dataset")
    )
    n = _length(source, split, kind)
    if n == 0:
        raise InvalidValue(f"data: the {split} {kind} is empty")
    indexed = not loader and n is not None and not isinstance(source, torch.utils.data.IterableDataset)
    wanted = n if indexed else None  # samples that will be read, when known before reading
    if indexed and limit is not None:
        wanted = min(n, limit)
    xs, ys, held, samples = [], [], 0, 0
    try:
        items = (source[i] for i in range(wanted)) if indexed else iter(source)
        with torch.no_grad():
            for k, item in enumerate(items):
                if not indexed and n is not None and k >= n:
                    raise InvalidValue(
                        f"data: the {split} {kind} yields more than its __len__ ({n}) items; fix its __len__ "
                        f"(with several DataLoader workers, an IterableDataset must split its items among them)"
                    )
                if not isinstance(item, (tuple, list)) or len(item) != 2:
                    raise InvalidValue(
                        f"data: the {split} {kind} must yield (x, y) pairs; item {k} is {type(item).__name__}"
                        + (f" of {len(item)}" if isinstance(item, (tuple, list)) else "")
                    )
                x = _as_array(item[0], f"x of {split} item {k}")
                y = _as_array(item[1], f"y of {split} item {k}")
                if not loader:
                    x, y = x[None], np.reshape(y, (1,))
                if limit is not None and x.ndim and samples + x.shape[0] > limit:  # the last batch, cut to it
                    x, y = x[: limit - samples], np.reshape(y, (-1,))[: limit - samples]
                xs.append(x)
                ys.append(np.reshape(y, (-1,)))
                samples += x.shape[0] if x.ndim else 1
                held += x.nbytes + 8 * y.size
                if k == 0 and wanted is not None:  # from the first item: the whole split's size, before it is read
                    per = x.nbytes + 8 * y.size
                    check_memory(
                        f"reading the {split} {kind} ({wanted} x {show(x.shape)})", 2 * per * wanted, memory_limit_gb
                    )
                elif k % MATERIALISE_CHECK == 0:
                    check_memory(f"reading the {split} {kind}", 2 * held, memory_limit_gb)
                if limit is not None and samples >= limit:
                    break
                if n is None and samples > MAX_STREAM_SAMPLES:
                    raise InvalidValue(
                        f"data: the {split} {kind} has no __len__ and yielded more than {MAX_STREAM_SAMPLES:,} "
                        f"samples without ending (an endless stream?); data given in Python is read into memory "
                        f"once: pass {split}_limit=N to accelc.train to read only its first N samples, or give a "
                        f"finite dataset (a __len__, or itertools.islice)"
                    )
    except AccelcError:
        raise
    except Exception as e:  # the user's dataset code failing: its reason, in one line
        raise AccelcError(
            f"data: reading the {split} {kind} failed: {type(e).__name__}: {exception_text(e, 160)}"
        ) from None
    if not xs or not samples:
        raise InvalidValue(f"data: the {split} {kind} is empty")
    shapes = {x.shape[1:] for x in xs}
    if len(shapes) > 1:
        raise InvalidValue(f"data: the {split} {kind} yields images of different shapes ({show(sorted(shapes)[:2])})")
    return np.concatenate(xs), np.concatenate(ys)


def _split(value, split: str, memory_limit_gb, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    if _is_torch_source(value):
        return _materialise(value, split, memory_limit_gb, limit)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return _as_array(value[0], f"x_{split}"), _as_array(value[1], f"y_{split}")
    raise InvalidType(
        f"data: the {split} split must be a torch Dataset, a DataLoader or an (x, y) pair, got {type(value).__name__}"
    )


def _check_images(x: np.ndarray, name: str, memory_limit_gb) -> np.ndarray:
    if x.dtype == np.bool_ or not np.issubdtype(x.dtype, np.floating):
        hint = (
            " (scale it to float32 first, e.g. x.astype(np.float32) / 255)"
            if np.issubdtype(x.dtype, np.integer)
            else ""
        )
        raise InvalidValue(f"data: {name} must hold floating-point images, got {x.dtype}{hint}")
    if x.ndim != 4:
        raise InvalidValue(f"data: {name} must be (N, C, H, W) images, got shape {show(x.shape)}")
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        check_memory(f"converting {name} to float32", _float_bytes(len(x), x.shape[1:]), memory_limit_gb)
        x = np.ascontiguousarray(x, dtype=np.float32)
    for i in range(0, len(x), RESIZE_CHUNK):  # chunked: no full-size temporary
        bad = ~np.isfinite(x[i : i + RESIZE_CHUNK]).reshape(min(RESIZE_CHUNK, len(x) - i), -1).all(axis=1)
        if bad.any():
            raise InvalidValue(f"data: {name} holds NaN or Inf (image {i + int(np.flatnonzero(bad)[0])})")
    return x


def _check_label_array(y: np.ndarray, name: str, n: int, xname: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise InvalidValue(f"data: {name} must be a 1-D array of class indices, got shape {show(y.shape)}")
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise InvalidValue(f"data: {name} must hold integer class indices, got {y.dtype}")
    if len(y) != n:
        raise InvalidValue(f"data: {xname} has {n} images but {name} has {len(y)} labels")
    if n == 0:
        raise InvalidValue(f"data: {xname} holds no images")
    if y.dtype.kind == "u" and y.size and int(y.max()) > np.iinfo(np.int64).max:
        raise InvalidValue(f"data: {name} has labels beyond the int64 range")
    return np.ascontiguousarray(y, dtype=np.int64)


def check_data_form(data) -> None:
    """``data`` given in Python has one of the forms :func:`in_memory_data` reads (its type only:
    nothing is read; InvalidType otherwise)."""
    if isinstance(data, (InMemoryData, tuple, list, dict)) or _is_torch_source(data):
        return
    raise InvalidType(
        f"--data must be synthetic[:N], fashion-mnist[:DIR] or imagefolder:DIR, or data given in Python: "
        f"{DATA_FORMS}; got {type(data).__name__}"
    )


def in_memory_data(
    data, memory_limit_gb: float | None = None, train_limit: int | None = None, test_limit: int | None = None
) -> InMemoryData:
    """``data`` given in Python, read and checked on its own (the model's checks come in
    :func:`load_data`): one of :data:`DATA_FORMS`. Images must be floating point, 4-D, finite;
    labels integer class indices, one per image; both splits non-empty. ``train_limit`` /
    ``test_limit``: of a torch dataset or DataLoader, read only the first that many samples (one
    without a ``__len__`` is otherwise read until it ends, at most :data:`MAX_STREAM_SAMPLES`).
    Returns an :class:`InMemoryData` (a string describing the data, carrying the arrays); already
    one: as is."""
    if isinstance(data, InMemoryData):
        return data
    if isinstance(data, dict):
        keys = ("x_train", "y_train", "x_test", "y_test")
        missing = [k for k in keys if k not in data]
        extra = sorted(str(k) for k in data if k not in keys)
        if missing or extra:
            what = f"lacks {missing[0]}" if missing else f"has an unknown key {show(extra[0])}"
            raise InvalidValue(f"data: a dict of arrays needs the keys {', '.join(keys)}; this one {what}")
        parts = [(_as_array(data[keys[0]], "x_train"), _as_array(data[keys[1]], "y_train")),
                 (_as_array(data[keys[2]], "x_test"), _as_array(data[keys[3]], "y_test"))]  # fmt: skip
    elif isinstance(data, (tuple, list)) and len(data) == 4:
        parts = [(_as_array(data[0], "x_train"), _as_array(data[1], "y_train")),
                 (_as_array(data[2], "x_test"), _as_array(data[3], "y_test"))]  # fmt: skip
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        parts = [
            _split(data[0], "train", memory_limit_gb, train_limit),
            _split(data[1], "test", memory_limit_gb, test_limit),
        ]
    elif _is_torch_source(data):
        raise InvalidValue(
            "data: give a test split too: (train, test), each a torch Dataset or DataLoader (accelc reports "
            "test accuracy every epoch)"
        )
    elif isinstance(data, (tuple, list)):
        raise InvalidValue(
            f"data: a tuple must be (x_train, y_train, x_test, y_test) or (train, test), got {len(data)} items"
        )
    else:
        raise InvalidType(
            f"--data must be a string (synthetic[:N], fashion-mnist[:DIR], imagefolder:DIR) or {DATA_FORMS}, "
            f"got {type(data).__name__}"
        )
    out = []
    for (x, y), split in zip(parts, ("train", "test")):
        x = _check_images(x, f"x_{split}", memory_limit_gb)
        out += [x, _check_label_array(y, f"y_{split}", len(x), f"x_{split}")]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise InvalidValue(
            f"data: x_train holds images of shape {show(out[0].shape[1:])}, x_test of shape {show(out[2].shape[1:])}"
        )
    return InMemoryData(*out)


def _load_in_memory(data: InMemoryData, shape: tuple, num_classes: int, train_limit, test_limit) -> Dataset:
    """The arrays checked against the model: image shape, labels against its classes."""
    got_shape = tuple(data.x_train.shape[1:])
    if got_shape != tuple(shape):
        raise InvalidValue(
            f"data: the images are {show(got_shape)} (C, H, W); the model's input is {show(tuple(shape))} "
            "(resize them, or export the model at that input shape)"
        )
    xtr, ytr = data.x_train[:train_limit], data.y_train[:train_limit]
    xte, yte = data.x_test[:test_limit], data.y_test[:test_limit]
    _check_labels(ytr, num_classes, "data: y_train")
    _check_labels(yte, num_classes, "data: y_test")
    return Dataset("arrays", xtr, ytr, xte, yte, num_classes)


# ----------------------------------------------------------------------------- validation split
# --val-split auto: the last min(5000, 10%) training images (Fashion-MNIST: images 55,000-59,999),
# none for a training split under 1,000 images (too small to hold any out)
AUTO_VAL, AUTO_VAL_MIN_TRAIN = 5000, 1000


def parse_val_split(value) -> int | float | None:
    """``--val-split``: None/0 (no validation split), a count N >= 1, a fraction in (0, 1) of the
    training split, or ``auto`` (see :data:`AUTO_VAL`); strings from the command line are read the
    same way."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip() == "auto":
        return "auto"
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if text.isdigit() else float(text)
        except ValueError:
            raise InvalidValue(f"--val-split must be a count N or a fraction in (0, 1), got '{show(value)}'") from None
        if isinstance(value, float) and not (0.0 < value < 1.0):  # "1.0", "1e-400": neither a count nor a fraction
            raise InvalidValue(f"--val-split must be a count N or a fraction in (0, 1), got '{show(text)}'")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidType(f"--val-split must be a count N or a fraction in (0, 1), got {type(value).__name__}")
    if isinstance(value, (float, np.floating)) and not float(value).is_integer():
        if not (0.0 < float(value) < 1.0):
            raise InvalidValue(f"--val-split must be a count N or a fraction in (0, 1), got {show(value)}")
        return float(value)
    n = int(value)
    if n < 0:
        raise InvalidValue(f"--val-split must be a count N >= 0 or a fraction in (0, 1), got {show(value)}")
    return n or None


def take_validation(ds: Dataset, split, train_limit: int | None, shuffled: bool = True) -> Dataset:
    """Hold out the *last* images of the training split as the validation split (never trained on),
    then apply ``train_limit`` to the images before them. ``shuffled=False`` (a source that may be
    ordered by class: an image folder, arrays given in Python): the held-out images are the last of
    a fixed permutation (seed 0) instead, so the validation split is not one or two whole classes;
    the training images keep their order."""
    n_all = len(ds.x_train)
    if split == "auto":
        if n_all < AUTO_VAL_MIN_TRAIN:
            return ds
        n_val = min(AUTO_VAL, n_all // 10)
    else:
        n_val = split if isinstance(split, int) else round(split * n_all)
    if n_val < 1 or n_val >= n_all:
        raise InvalidValue(
            f"--val-split {show(split)} holds out {n_val} of the {n_all} training images; "
            "it must leave at least one image on each side"
        )
    keep = n_all - n_val
    if train_limit:
        keep = min(keep, train_limit)
    if not shuffled:
        perm = np.random.default_rng(0).permutation(n_all)
        val, rest = np.sort(perm[n_all - n_val :]), np.sort(perm[: n_all - n_val])[:keep]
        ds.x_val, ds.y_val = ds.x_train[val], ds.y_train[val]
        ds.x_train, ds.y_train = ds.x_train[rest], ds.y_train[rest]
        return ds
    ds.x_val, ds.y_val = ds.x_train[n_all - n_val :], ds.y_train[n_all - n_val :]
    ds.x_train, ds.y_train = ds.x_train[:keep], ds.y_train[:keep]
    return ds


# ----------------------------------------------------------------------------- entry point
def check_data(
    spec: str,
    shape: tuple,
    num_classes: int,
    train_limit: int | None = None,
    test_limit: int | None = None,
    *,
    memory_limit_gb: float | None = None,
    val_split=None,
) -> None:
    """Every check ``load_data`` makes that needs no image decoded, in about a second and a few MB:
    arguments, file headers (IDX dimensions and types, image/label counts, every image's size),
    labels against ``num_classes`` and the memory the load will need. Call it before starting
    anything expensive; ``load_data`` makes the same checks again."""
    _load(spec, shape, num_classes, train_limit, test_limit, memory_limit_gb, decode=False, val_split=val_split)


def load_data(
    spec: str,
    shape: tuple,
    num_classes: int,
    train_limit: int | None = None,
    test_limit: int | None = None,
    *,
    memory_limit_gb: float | None = None,
    val_split=None,
) -> Dataset:
    """Build the dataset ``spec`` fitted to a model input ``shape`` (C, H, W) and class count.

    Labels are checked against ``num_classes``; the memory the dataset needs is checked against
    ``memory_limit_gb`` (default: a fraction of the memory available) before it is loaded.
    ``val_split`` (a count or a fraction, see :func:`parse_val_split`) holds out the last images of
    the training split as a validation split; ``train_limit`` then applies to the images before
    them, so the validation images are the same whatever the limit."""
    return _load(spec, shape, num_classes, train_limit, test_limit, memory_limit_gb, decode=True, val_split=val_split)


def _load(
    spec, shape, num_classes, train_limit, test_limit, memory_limit_gb, decode: bool, val_split=None
) -> Dataset | None:
    try:
        return _load_unguarded(
            spec, shape, num_classes, train_limit, test_limit, memory_limit_gb, decode, parse_val_split(val_split)
        )
    except OSError as e:  # a folder that cannot be listed, a file that vanished: which one, never a traceback
        where = f" '{show(e.filename)}'" if e.filename else ""
        raise AccelcError(f"cannot read the data{where}: {show(e.strerror or e)}") from None
    except MemoryError:  # the estimate passed but the memory went elsewhere meanwhile
        raise AccelcError(
            f"ran out of memory loading --data '{show(spec)}' (free memory, or use --train-limit/--test-limit)"
        ) from None


def _load_unguarded(spec, shape, num_classes, train_limit, test_limit, memory_limit_gb, decode, val_split=None):
    train_limit = checks.optional_positive_int("--train-limit", train_limit)  # the API's and CLI's own check
    test_limit = checks.optional_positive_int("--test-limit", test_limit)
    if not isinstance(spec, str):  # arrays or a torch Dataset given in Python (a validation split comes first)
        spec = in_memory_data(spec, memory_limit_gb, None if val_split else train_limit, test_limit)
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise InvalidValue(f"the model's class count must be a positive integer, got {show(num_classes)}")
    num_classes = int(num_classes)
    if (
        not isinstance(shape, (tuple, list))
        or len(shape) != 3
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise AccelcError(
            f"training data is built for image models with a (C, H, W) input; this model's input is {show(shape)}"
        )
    shape = tuple(int(s) for s in shape)
    if isinstance(spec, InMemoryData):
        ds = _load_in_memory(spec, shape, num_classes, None if val_split else train_limit, test_limit)
        if val_split:
            ds = take_validation(ds, val_split, train_limit, shuffled=False)
        return ds if decode else None
    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        try:
            n = int(arg) if arg else (train_limit or 6000)
        except ValueError:
            raise InvalidValue(f"--data synthetic:N needs an integer N, got '{show(arg)}'") from None
        if n <= 0:
            raise InvalidValue(f"--data synthetic:N needs N > 0, got {n}")
        n_test = test_limit or max(500, n // 6)
        if not decode:
            _check_synthetic_memory(shape, n, n_test, memory_limit_gb)
            return None
        ds = synthetic(shape, num_classes, n, n_test, memory_limit_gb=memory_limit_gb)
        # the last of the N generated images (i.i.d., normalised with all N); without ":N", N is
        # --train-limit, so the split comes out of it
        if val_split:
            ds = take_validation(ds, val_split, train_limit if arg else None)
    elif kind == "fashion-mnist":
        if num_classes < FASHION_CLASSES:
            raise AccelcError(f"Fashion-MNIST has {FASHION_CLASSES} classes; the model outputs {num_classes}")
        xtr, ytr, xte, yte = fashion_mnist(
            arg or None,
            shape=shape,
            num_classes=num_classes,
            train_limit=None if val_split else train_limit,  # validation: the last images of all 60,000
            test_limit=test_limit,
            memory_limit_gb=memory_limit_gb,
            read_images=decode,
        )
        if not decode:
            return None
        k = max(FASHION_CLASSES, int(max(ytr.max(), yte.max())) + 1)
        ds = Dataset("fashion-mnist", xtr, ytr, xte, yte, k)
        del xtr, xte
    elif kind == "imagefolder":
        if not arg:
            raise InvalidValue("--data imagefolder:DIR needs a folder")
        xtr, ytr, xte, yte, k = image_folder(arg, shape, memory_limit_gb, decode, num_classes)
        if not decode:
            return None
        ds = Dataset(f"imagefolder:{show(os.path.basename(arg.rstrip('/')))}", xtr, ytr, xte, yte, k)
        del xtr, xte
    else:
        raise InvalidValue(f"unknown --data '{show(spec)}'; use synthetic[:N], fashion-mnist[:DIR] or imagefolder:DIR")
    if kind != "synthetic":
        if val_split:  # Fashion-MNIST's files are shuffled at the source; a folder is read class by class
            ds = take_validation(ds, val_split, train_limit, shuffled=kind == "fashion-mnist")
            ds.x_val = adapt(ds.x_val, shape)
            if not ds.x_val.flags.writeable or np.may_share_memory(ds.x_train, ds.x_val):
                ds.x_val = ds.x_val.copy()
        elif train_limit:
            ds.x_train, ds.y_train = ds.x_train[:train_limit], ds.y_train[:train_limit]
        if test_limit:
            ds.x_test, ds.y_test = ds.x_test[:test_limit], ds.y_test[:test_limit]
        ds.x_train = adapt(ds.x_train, shape)
        ds.x_test = adapt(ds.x_test, shape)
        # normalised in place below: each split must be its own writeable memory
        if not ds.x_train.flags.writeable:
            ds.x_train = ds.x_train.copy()
        if not ds.x_test.flags.writeable or np.may_share_memory(ds.x_train, ds.x_test):
            ds.x_test = ds.x_test.copy()
        ds = _normalise(ds)
    splits = [(ds.x_train, ds.y_train, "training"), (ds.x_test, ds.y_test, "test")]
    if ds.x_val is not None:
        splits.append((ds.x_val, ds.y_val, "validation"))
    for x, y, split in splits:
        if len(x) != len(y):
            raise AccelcError(f"the {split} data has {len(x)} images but {len(y)} labels")
        if len(x) == 0:
            raise AccelcError(f"the {split} data of '{show(spec)}' is empty")
        _check_labels(y, num_classes, f"the {split} data of '{show(spec)}'")
    return ds
