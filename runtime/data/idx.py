"""``--data fashion-mnist[:DIR]``: IDX image and label files (plain or gzip), read as untrusted: every
header checked, the memory the load needs checked before any data is inflated, and a damaged file
one clear error naming it."""

from __future__ import annotations

import gzip
import math
import os
import stat
import zlib
from pathlib import Path

import numpy as np

from ...compiler.errors import AccelcError, show
from ...compiler.resources import check_memory, fmt_bytes
from .dataset import RESIZE_CHUNK, _check_labels, _float_bytes

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = 10
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


def _find(d: Path, stem: str, kind: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (d / name).exists():
            return d / name
    raise AccelcError(
        f"Fashion-MNIST file '{stem}[.gz]' not found in '{show(d)}'. Install Debian's package "
        f"(apt-get install dataset-fashion-mnist) or pass --data {kind}:DIR"
    )


def open_splits(directory: str | None, kind: str = "fashion-mnist") -> tuple[Path, list[_IdxFile]]:
    """The folder (default :data:`FASHION_DIR`) and its four IDX files, opened with their headers
    read and checked, their data not yet read: train images, train labels, test (t10k) images,
    test labels; each split's image and label counts agree. ``kind`` is the ``--data`` kind the
    errors name. The caller closes the files (reading one closes it)."""
    d = Path(directory or FASHION_DIR)
    if not d.is_dir():
        raise AccelcError(
            f"Fashion-MNIST folder '{show(d)}' not found. Install Debian's package "
            f"(apt-get install dataset-fashion-mnist) or pass --data {kind}:DIR"
        )
    files = []
    try:
        for split in ("train", "t10k"):
            images = _IdxFile(_find(d, f"{split}-images-idx3-ubyte", kind), "images", 3)
            files.append(images)
            labels = _IdxFile(_find(d, f"{split}-labels-idx1-ubyte", kind), "labels", 1)
            files.append(labels)
            if images.count != labels.count:
                raise AccelcError(
                    f"'{show(images.path)}' holds {images.count} images but '{show(labels.path)}' "
                    f"holds {labels.count} labels"
                )
    except BaseException:
        for f in files:
            f.close()
        raise
    return d, files


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
    d, files = open_splits(directory)
    try:
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
