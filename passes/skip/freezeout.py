"""The FreezeOut schedule: the skip rule tied to a training budget.

FreezeOut (Brock et al., "FreezeOut: Accelerate Training by Progressively Freezing Layers", 2017)
freezes layers input side first at fixed fractions of the run. Layer i of n (input side first)
freezes at

    t_i = t0 + (1 - t0) × (i / (n - 1)) ** p        (p = 1 "linear", p = 3 "cubic")

of the budget, and its learning rate is annealed to zero on the way there, a cosine per layer:
the layer's rate is the run's rate times ``0.5 × (1 + cos(π t / t_i))`` (times ``1 / t_i`` with
``scale_lr``, FreezeOut's compensation for the shorter training of early layers) while t < t_i. At
t_i its rate has reached zero, so the layer leaves the backward without a jump in its weights. The
output-side layers the option ``keep_last`` names never freeze (t_i = 1). Because t_i grows with i,
the frozen set is always an input-side prefix, which lets the backward stop early.

Every value here depends only on the step's place in the budget (``TrainState.progress``), so a
resumed run and every data-parallel rank freeze at the same step.
"""

from __future__ import annotations

import math

SPACINGS = {"linear": 1, "cubic": 3}


def freeze_times(n: int, t0: float, spacing: str, keep_last: int) -> list[float]:
    """The fraction of the budget at which each of ``n`` layers (input side first) freezes; 1.0
    for the layers that never do (the last ``keep_last``, and the last layer)."""
    p = SPACINGS[spacing]
    out = []
    for i in range(n):
        if i >= n - max(keep_last, 1):
            out.append(1.0)
        else:
            out.append(t0 + (1.0 - t0) * (i / (n - 1)) ** p)
    return out


def lr_multiplier(progress: float, t: float, scale_lr: bool, start: float = 0.0) -> float:
    """A layer's multiple of the run's learning rate at ``progress`` when it freezes at ``t``
    (0 from ``t`` on; 1 for a layer that never freezes). The cosine runs from ``start`` (1 before
    it) to ``t``: FreezeOut's schedule within the part of the run from ``start`` on; with
    ``scale_lr`` it is divided by the fraction of that part the layer trains in."""
    if t >= 1.0:
        return 1.0
    if progress >= t:
        return 0.0
    m = 0.5 * (1.0 + math.cos(math.pi * max(0.0, progress - start) / (t - start)))
    return m * (1.0 - start) / (t - start) if scale_lr else m


def drift(w0, w1, lr_sum: float) -> float | None:
    """How far a layer's weights went over a window against how far its steps could have taken
    them: ``‖w1 − w0‖ / (√n × Σ lr)``, where Σ lr is the learning rate the layer's steps applied
    over the window (the run's rate times the layer's multiple, summed). An Adam(W) step moves each
    element by about the rate at most, so the drift is about 1 while every step goes the same way
    (the layer still learns) and falls towards 1/√steps while its steps cancel (it jitters around
    what it has learned). None when the layer took no step (Σ lr = 0)."""
    if lr_sum <= 0.0:
        return None
    d = (w1.astype("float64") - w0.astype("float64")).ravel()
    return float((d @ d) ** 0.5 / (d.size**0.5 * lr_sum))


def angle(w0, w1) -> float:
    """The angle (degrees) between two values of a weight: its change of direction, which is what
    changes a convolution's output through the BatchNorm after it (the scale does not)."""
    a, b = w0.astype("float64").ravel(), w1.astype("float64").ravel()
    n = (a @ a) ** 0.5 * (b @ b) ** 0.5
    if n == 0.0:
        return 0.0
    return math.degrees(math.acos(max(-1.0, min(1.0, float(a @ b) / n))))


def postponed(times: list[float], i: int, by: float) -> list[float]:
    """The freeze times with layer ``i`` and every layer after it ``by`` later (the frozen set stays
    an input-side prefix); a time that reaches the end of the run becomes 1.0 (never frozen)."""
    out = list(times)
    for j in range(i, len(out)):
        if out[j] < 1.0:
            t = out[j] + by
            out[j] = t if t < 1.0 - 1e-12 else 1.0
    return out
