"""The entry points: :func:`load_data` and :func:`check_data` build (or check) the dataset of a
``--data`` spec or of data given in Python, fitted to the model's input; :func:`as_source` is the
:class:`DataSource` of either."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from ...compiler import checks
from ...compiler.errors import AccelcError, InvalidValue, show
from .arrays import _load_in_memory, in_memory_data
from .dataset import Dataset, _check_labels, _normalise, adapt
from .folder import image_folder
from .idx import FASHION_CLASSES, fashion_mnist
from .multiscale import load_multiscale
from .source import DataSource
from .split import parse_val_split, take_validation
from .synth import _check_synthetic_memory, synthetic


def as_source(data) -> DataSource:
    """``data`` as a :class:`DataSource`: a ``--data`` spec (not checked here: :func:`load_data`
    does), a DataSource as is, anything else data given in Python (:func:`in_memory_data`)."""
    if isinstance(data, DataSource):
        return data
    if isinstance(data, str):
        return DataSource(spec=data)
    return in_memory_data(data)


def check_data(
    spec: str | DataSource,
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
    _load(spec, _Request(shape, num_classes, train_limit, test_limit, memory_limit_gb, False, val_split))


def load_data(
    spec: str | DataSource,
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
    return _load(spec, _Request(shape, num_classes, train_limit, test_limit, memory_limit_gb, True, val_split))


@dataclass(frozen=True)
class _Request:
    """What a load is asked for: the model's input and classes, the limits, the memory limit,
    whether images are decoded (False: only checked) and the validation split."""

    shape: tuple
    num_classes: int
    train_limit: int | None
    test_limit: int | None
    memory_limit_gb: float | None
    decode: bool
    val_split: object = None


def _load(spec, req: _Request) -> Dataset | None:
    try:
        return _load_unguarded(spec, dataclasses.replace(req, val_split=parse_val_split(req.val_split)))
    except OSError as e:  # a folder that cannot be listed, a file that vanished: which one, never a traceback
        where = f" '{show(e.filename)}'" if e.filename else ""
        raise AccelcError(f"cannot read the data{where}: {show(e.strerror or e)}") from None
    except MemoryError:  # the estimate passed but the memory went elsewhere meanwhile
        raise AccelcError(
            f"ran out of memory loading --data '{show(spec)}' (free memory, or use --train-limit/--test-limit)"
        ) from None


def _load_unguarded(spec, req: _Request):
    train_limit = checks.optional_positive_int("--train-limit", req.train_limit)  # the API's and CLI's own check
    test_limit = checks.optional_positive_int("--test-limit", req.test_limit)
    memory_limit_gb, decode, val_split = req.memory_limit_gb, req.decode, req.val_split
    if not isinstance(spec, (str, DataSource)):  # arrays or a torch Dataset given in Python (validation split first)
        spec = in_memory_data(spec, memory_limit_gb, None if val_split else train_limit, test_limit)
    num_classes, shape = _model_input(req.num_classes, req.shape)
    req = dataclasses.replace(req, shape=shape, num_classes=num_classes, train_limit=train_limit, test_limit=test_limit)
    if isinstance(spec, DataSource):
        if spec.in_memory:
            ds = _load_in_memory(spec, shape, num_classes, None if val_split else train_limit, test_limit)
            if val_split:
                ds = take_validation(ds, val_split, train_limit, shuffled=False)
            return ds if decode else None
        spec = spec.spec
    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        ds = _load_synthetic(arg, req)
    elif kind == "fashion-mnist":
        ds = _load_fashion_mnist(arg, req)
    elif kind == "fashion-mnist-multiscale":
        ds = _load_multiscale(spec, arg, req)
    elif kind == "imagefolder":
        ds = _load_image_folder(arg, shape, num_classes, memory_limit_gb, decode)
    else:
        raise InvalidValue(f"unknown --data '{show(spec)}'; use {checks.DATA_SPECS}")
    if ds is None:  # checked, nothing decoded
        return None
    if kind == "fashion-mnist-multiscale":  # only the canvases asked for were built: split and limited
        ds = _fit(ds, shape, None, None, None, shuffled=True)
    elif kind != "synthetic":
        # Fashion-MNIST's files are shuffled at the source; a folder is read class by class
        ds = _fit(ds, shape, train_limit, test_limit, val_split, shuffled=kind == "fashion-mnist")
    _check_splits(ds, spec, num_classes)
    return ds


def _model_input(num_classes, shape) -> tuple[int, tuple]:
    """The model's class count and (C, H, W) input shape, checked."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise InvalidValue(f"the model's class count must be a positive integer, got {show(num_classes)}")
    if (
        not isinstance(shape, (tuple, list))
        or len(shape) != 3
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise AccelcError(
            f"training data is built for image models with a (C, H, W) input; this model's input is {show(shape)}"
        )
    return int(num_classes), tuple(int(s) for s in shape)


def _load_synthetic(arg, req: _Request):
    shape, num_classes, train_limit, test_limit = req.shape, req.num_classes, req.train_limit, req.test_limit
    memory_limit_gb, decode, val_split = req.memory_limit_gb, req.decode, req.val_split
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
    return ds


def _load_fashion_mnist(arg, req: _Request):
    shape, num_classes, train_limit, test_limit = req.shape, req.num_classes, req.train_limit, req.test_limit
    memory_limit_gb, decode, val_split = req.memory_limit_gb, req.decode, req.val_split
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
    return Dataset("fashion-mnist", xtr, ytr, xte, yte, k)


def _load_multiscale(spec: str, arg: str, req: _Request):
    if spec.startswith("fashion-mnist-multiscale:") and not arg.strip():
        raise InvalidValue("--data fashion-mnist-multiscale:DIR needs a folder (or no ':' for the default one)")
    if req.num_classes < FASHION_CLASSES:
        raise AccelcError(f"Fashion-MNIST has {FASHION_CLASSES} classes; the model outputs {req.num_classes}")
    return load_multiscale(arg or None, req)


def _load_image_folder(arg, shape, num_classes, memory_limit_gb, decode):
    if not arg:
        raise InvalidValue("--data imagefolder:DIR needs a folder")
    xtr, ytr, xte, yte, k = image_folder(arg, shape, memory_limit_gb, decode, num_classes)
    if not decode:
        return None
    return Dataset(f"imagefolder:{show(os.path.basename(arg.rstrip('/')))}", xtr, ytr, xte, yte, k)


def _fit(ds: Dataset, shape: tuple, train_limit, test_limit, val_split, shuffled: bool) -> Dataset:
    """The data read from files fitted to the model: the validation split held out, the limits
    applied, the images adapted to ``shape`` and normalised (each split its own writeable memory)."""
    if val_split:
        ds = take_validation(ds, val_split, train_limit, shuffled=shuffled)
    elif train_limit:
        ds.x_train, ds.y_train = ds.x_train[:train_limit], ds.y_train[:train_limit]
    if ds.x_val is not None:  # held out here, or by the source (fashion-mnist-multiscale)
        ds.x_val = adapt(ds.x_val, shape)
        if not ds.x_val.flags.writeable or np.may_share_memory(ds.x_train, ds.x_val):
            ds.x_val = ds.x_val.copy()
    if test_limit:
        ds.x_test, ds.y_test = ds.x_test[:test_limit], ds.y_test[:test_limit]
    ds.x_train = adapt(ds.x_train, shape)
    ds.x_test = adapt(ds.x_test, shape)
    # normalised in place below: each split must be its own writeable memory
    if not ds.x_train.flags.writeable:
        ds.x_train = ds.x_train.copy()
    if not ds.x_test.flags.writeable or np.may_share_memory(ds.x_train, ds.x_test):
        ds.x_test = ds.x_test.copy()
    return _normalise(ds)


def _check_splits(ds: Dataset, spec: str, num_classes: int) -> None:
    """Every split's images and labels agree in number, none is empty, every label is a class."""
    splits = [(ds.x_train, ds.y_train, "training"), (ds.x_test, ds.y_test, "test")]
    if ds.x_val is not None:
        splits.append((ds.x_val, ds.y_val, "validation"))
    for x, y, split in splits:
        if len(x) != len(y):
            raise AccelcError(f"the {split} data has {len(x)} images but {len(y)} labels")
        if len(x) == 0:
            raise AccelcError(f"the {split} data of '{show(spec)}' is empty")
        _check_labels(y, num_classes, f"the {split} data of '{show(spec)}'")
