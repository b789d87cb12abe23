"""``--val-split``: a validation split held out of the training split (it decides early stopping,
targets and controllers; the test split only reports)."""

from __future__ import annotations

import numpy as np

from ...compiler.errors import InvalidType, InvalidValue, show
from .dataset import Dataset

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
