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


def lr_multiplier(progress: float, t: float, scale_lr: bool) -> float:
    """A layer's multiple of the run's learning rate at ``progress`` when it freezes at ``t``
    (0 from ``t`` on; 1 for a layer that never freezes)."""
    if t >= 1.0:
        return 1.0
    if progress >= t:
        return 0.0
    m = 0.5 * (1.0 + math.cos(math.pi * progress / t))
    return m / t if scale_lr else m
