"""Data given in Python (``accelc.train(..., data=...)``; :func:`in_memory_data`): numpy arrays,
torch tensors, torch ``Dataset``/``DataLoader`` objects, read once into memory and checked on their
own; :func:`_load_in_memory` checks them against the model."""

from __future__ import annotations

import operator
import sys

import numpy as np

from ...compiler import checks
from ...compiler.errors import AccelcError, InvalidType, InvalidValue, exception_text, show
from ...compiler.resources import check_memory
from .dataset import RESIZE_CHUNK, Dataset, _check_labels, _float_bytes
from .source import DataSource

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
    if isinstance(data, (DataSource, tuple, list, dict)) or _is_torch_source(data):
        return
    raise InvalidType(
        f"--data must be {checks.DATA_SPECS}, or data given in Python: {DATA_FORMS}; got {type(data).__name__}"
    )


def in_memory_data(
    data, memory_limit_gb: float | None = None, train_limit: int | None = None, test_limit: int | None = None
) -> DataSource:
    """``data`` given in Python, read and checked on its own (the model's checks come in
    :func:`load_data`): one of :data:`DATA_FORMS`. Images must be floating point, 4-D, finite;
    labels integer class indices, one per image; both splits non-empty. ``train_limit`` /
    ``test_limit``: of a torch dataset or DataLoader, read only the first that many samples (one
    without a ``__len__`` is otherwise read until it ends, at most :data:`MAX_STREAM_SAMPLES`).
    Returns a :class:`~accelc.runtime.data.source.DataSource` carrying the arrays (and their
    SHA-256, which describes the data); already a DataSource: as is."""
    if isinstance(data, DataSource):
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
        raise InvalidType(f"--data must be a string ({checks.DATA_SPECS}) or {DATA_FORMS}, got {type(data).__name__}")
    out = []
    for (x, y), split in zip(parts, ("train", "test")):
        x = _check_images(x, f"x_{split}", memory_limit_gb)
        out += [x, _check_label_array(y, f"y_{split}", len(x), f"x_{split}")]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise InvalidValue(
            f"data: x_train holds images of shape {show(out[0].shape[1:])}, x_test of shape {show(out[2].shape[1:])}"
        )
    return DataSource(arrays=out)


def _load_in_memory(data: DataSource, shape: tuple, num_classes: int, train_limit, test_limit) -> Dataset:
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
