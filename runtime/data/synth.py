"""``--data synthetic[:N]``: deterministic images generated in memory (no download), with the
memory they need checked before any is generated."""

from __future__ import annotations

import numpy as np

from ...compiler.resources import check_memory
from .dataset import Dataset, _float_bytes, _normalise

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
