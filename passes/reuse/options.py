"""reuse's options: one definition (:class:`ReuseOptions`) and the parsers behind it, shared by the
pass (:mod:`.rewrite`), the run-time algorithm and the layer choice (:mod:`.choice`)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ...compiler.options import Options, choice, fraction, int_at_least, integer, name_list, option, with_schema

MODES = ("measured", "all")
DEFAULT_MARGIN = 0.9
MAX_MARGIN = 10.0


DEFAULT_PREFILTER = 1.5  # the time model's error on the protocol's layers: docs/reuse-cost-model.md
MAX_PREFILTER = 100.0


@with_schema({"type": "number", "minimum": 0, "maximum": 100})
def check_prefilter(value) -> float:
    """A ``prefilter``: 0 (off) or a number in [1, MAX_PREFILTER] (CLI text or a Python number)."""
    reason = f"must be 0 (off) or a number in [1, {MAX_PREFILTER:g}]"
    v = parse_number(value, reason)
    if not (math.isfinite(v) and (v == 0 or 1 <= v <= MAX_PREFILTER)):
        raise ValueError(reason)
    return v


# --------------------------------------------------------------------------- validation
def check_mode(value) -> str:
    """A ``choose`` value (plan.json; the pass option parses with ``choice(*MODES)``)."""
    if not isinstance(value, str) or value not in MODES:
        raise ValueError(f"must be one of {', '.join(MODES)}")
    return value


def parse_number(value, reason: str, integer: bool = False):
    """A number from CLI text or a Python number (what the options and plan.json fields share):
    a bool or another type raises TypeError(reason), text that is no number or (``integer``) a
    number with a fraction ValueError(reason). The range is the caller's."""
    if isinstance(value, bool):
        raise TypeError(reason)
    if isinstance(value, str):
        try:
            value = (int if integer else float)(value.strip())
        except ValueError:
            raise ValueError(reason) from None
    if not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(reason)
    if not integer:
        return float(value)
    if isinstance(value, (float, np.floating)) and not (math.isfinite(value) and float(value).is_integer()):
        raise ValueError(reason)
    return int(value)


@with_schema({"type": "number", "exclusiveMinimum": 0, "maximum": 10})
def check_margin(value) -> float:
    """A ``margin``: a number in (0, MAX_MARGIN] (CLI text or a Python number)."""
    reason = f"must be a number in (0, {MAX_MARGIN:g}]"
    v = parse_number(value, reason)
    if not (math.isfinite(v) and 0 < v <= MAX_MARGIN):
        raise ValueError(reason)
    return v


STRATEGIES = ("fixed", "lh", "off")


@with_schema({"type": "integer", "minimum": 1, "maximum": 20})
def _hbits(value):
    v = integer(value)
    if not 1 <= v <= 20:
        raise ValueError("must be in 1..20")
    return v


@with_schema({"type": "array", "items": {"type": "string"}})
def _layers(value):
    return None if value in (None, "", "auto") else name_list(value)


@with_schema({"type": "array", "items": {"type": "array", "minItems": 2, "maxItems": 2}})
def _schedule(value):
    if isinstance(value, (list, tuple)):
        if not all(isinstance(s, (list, tuple)) and len(s) == 2 for s in value):
            raise ValueError("write L:H pairs, e.g. [(288, 6), (144, 8)]")
        return [(int_at_least(1)(a), _hbits(b)) for a, b in value]
    if not isinstance(value, str):
        raise TypeError(f"expected L:H pairs, got {value!r}")
    out = []
    for part in value.split(","):
        a, _, b = part.strip().partition(":")
        if not b:
            raise ValueError("write L:H pairs, e.g. 288:6,144:8,72:10")
        out.append((int_at_least(1)(a), _hbits(b)))
    return out


DEFAULT_RECALIBRATE = 32  # batches; the measurement behind it: docs/reuse-choice.md, "BatchNorm after reuse"
MAX_RECALIBRATE = 100_000


@with_schema({"type": "integer", "minimum": 0, "maximum": 100_000})
def check_recalibrate(value) -> int:
    """A ``recalibrate`` value: batches, an integer in 0..MAX_RECALIBRATE (0: off)."""
    reason = f"must be an integer in 0..{MAX_RECALIBRATE} (batches; 0 turns it off)"
    v = parse_number(value, reason, integer=True)
    if not 0 <= v <= MAX_RECALIBRATE:
        raise ValueError(reason)
    return v


MAX_CR_H = 12  # cross.MAX_H, without importing torch at compile time
MAX_CROSS_BATCH = 1_000_000


@with_schema({"type": "integer", "minimum": 0, "maximum": 1_000_000})
def check_cross_batch(value) -> int:
    """A ``cross_batch`` value: 0 (off) or the batches K a cluster table serves, 2..MAX_CROSS_BATCH."""
    reason = f"must be 0 (off) or an integer in 2..{MAX_CROSS_BATCH}"
    v = parse_number(value, reason, integer=True)
    if not (v == 0 or 2 <= v <= MAX_CROSS_BATCH):
        raise ValueError(reason)
    return v


def cross_batch_conflict(cross_batch, strategy: str, H, schedule) -> str | None:
    """Why a setting cannot keep clusters across batches (None when it can): the table holds
    2^H centroids per chunk, so every H the strategy uses must be <= MAX_CR_H."""
    if int(cross_batch or 0) < 2:
        return None
    used = [int(h) for _, h in schedule] if strategy == "lh" and schedule else [int(H)]
    bad = [h for h in used if h > MAX_CR_H]
    if not bad:
        return None
    where = " in the --reuse-schedule" if strategy == "lh" and schedule else ""
    return f"needs H <= {MAX_CR_H} (a table of 2^H centroids per chunk), got H={max(bad)}{where}"


@dataclasses.dataclass(frozen=True)
class ReuseOptions(Options):
    layers: list | None = option(
        None,
        "convs to reuse (names as `accelc inspect` prints); default: every group-1 conv with >= 8 input channels",
        _layers,
        flag="--reuse-layers",
    )
    L: int = option(
        144,
        "sub-vector length L (clipped to the layer's K = C·kh·kw; a multiple of kh·kw lets the "
        "hash run as one grouped conv)",
        int_at_least(1),
        flag="--reuse-L",
    )
    H: int = option(8, "hyperplanes per sub-vector (cluster IDs have H bits; 1..20)", _hbits, flag="--reuse-H")
    scope: str = option(
        "image",
        "clustering scope: image (rows of one image) or batch",
        choice("image", "batch"),
        flag="--reuse-scope",
    )
    input_grad: str = option(
        "exact",
        "input gradient: exact (the conv's own) or cluster ((Gs/count)·Wᵀ to the members)",
        choice("exact", "cluster"),
        flag="--reuse-input-grad",
    )
    seed: int = option(0, "seed of the hyperplanes", integer, flag="--reuse-seed")
    strategy: str = option(
        "fixed",
        "runtime strategy: fixed (L, H throughout), lh (L, H stepped coarse to fine "
        "along --reuse-schedule at each loss plateau), off (reuse on, then off at a "
        "plateau)",
        choice(*STRATEGIES),
        flag="--reuse-strategy",
    )
    schedule: object = option(
        "288:6,144:8,72:10", "lh strategy: the L:H settings, coarse to fine", _schedule, flag="--reuse-schedule"
    )
    plateau: float = option(
        0.05,
        "a plateau: the epoch's training loss fell by less than this fraction",
        fraction,
        flag="--reuse-plateau",
    )
    min_epochs: int = option(1, "epochs at least between two switches", int_at_least(1), flag="--reuse-min-epochs")
    choose: str = option(
        "measured",
        "which layers reuse at run time: measured (time each layer reused and exact on the first "
        "training batch; reuse only where it is faster by --reuse-margin, the rest stay exact) or "
        "all (every layer, nothing measured)",
        choice(*MODES),
        flag="--reuse-choose",
    )
    margin: float = option(
        0.9,
        "measured choice: a layer reuses only if its forward+backward takes less than margin x the "
        "exact conv's (0 < margin <= 10)",
        check_margin,
        flag="--reuse-margin",
    )
    cross_batch: int = option(
        0,
        "cluster reuse across batches (CR): the native kernels keep each layer's clusters (one "
        "centroid per chunk and H-bit code, shared by the whole batch whatever --reuse-scope) "
        "from a refresh batch and reuse them for the next "
        "K-1 batches, summing only rows whose code is new (rebuilt sooner when over a quarter of "
        "a batch's rows are new; needs H <= 12); e.g. --reuse-cross-batch 8; 0: off",
        check_cross_batch,
        flag="--reuse-cross-batch",
    )
    prefilter: object = option(
        DEFAULT_PREFILTER,
        "measured choice: a layer is not measured (stays exact) when this machine's time model "
        "predicts that, even with no clusters at all, its reused forward+backward takes at least "
        "prefilter x margin x the exact conv's (hashing, sums, gathers and the exact input "
        "gradient alone lose), or a speed-up under 1/(prefilter x margin) at the expected remain "
        "ratio; e.g. --reuse-prefilter 2; 0: measure every layer",
        check_prefilter,
        flag="--reuse-prefilter",
    )
    recalibrate: object = option(
        DEFAULT_RECALIBRATE,
        "BatchNorm after reuse: before evaluating an epoch that trained with reused convs, gather "
        "the BatchNorm running statistics again on this many training batches through the exact "
        "convs that evaluation and the exported model use (forward only, no parameter update; "
        "its seconds count as training time); e.g. --reuse-recalibrate 64; 0: off",
        check_recalibrate,
        flag="--reuse-recalibrate",
    )
