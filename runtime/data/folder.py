"""``--data imagefolder:DIR``: DIR/<class>/*.png|jpg (or DIR/train/<class>, DIR/test/<class>), every
image an untrusted file: confined to the folder, its size checked from its header before any is
decoded, a failure to decode one clear error naming it."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np

from ...compiler.errors import AccelcError, show
from ...compiler.resources import check_memory
from .dataset import _float_bytes, adapt

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
