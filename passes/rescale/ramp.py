"""The resolution ramp of progressive resizing (``--rescale-mode progressive``): which input size
each epoch of a budget trains at, and which sizes any budget can ask for (the stages compiled).

The shape is Composer's ProgressiveResizing (and FFCV's resolution schedule), at epoch
granularity: the first ``start_fraction`` of the budget at ``start_scale`` of the full height and
width, then a linear ramp, the last ``full_fraction`` at full size. An epoch stands at its middle
in the budget, ``m = (e + 0.5) / E`` for 0-based epoch e of E; a size is the scaled size rounded
down to a multiple of ``step`` pixels (at least ``step``), per axis; the last epoch always trains at
full size, so a run ends (is evaluated, checkpointed and exported) at the resolution the model was
exported at. Pure arithmetic: no ONNX, no torch.
"""

from __future__ import annotations

EPS = 1e-9  # scaled sizes within this (relative to the step) of a multiple round to it, not below


def snap(length: int, scale: float, step: int) -> int:
    """``scale * length`` rounded down to a multiple of ``step`` (0 when below one step)."""
    return int(scale * length / step + EPS) * step


def scaled(full_hw, scale: float, step: int) -> tuple[int, int]:
    """The input size at ``scale`` of ``full_hw`` (each axis snapped to the step grid)."""
    h, w = full_hw
    return snap(h, scale, step), snap(w, scale, step)


def epoch_scale(epoch: int, epochs: int, start_scale: float, start_fraction: float, full_fraction: float) -> float:
    """The scale of 0-based ``epoch`` in a budget of ``epochs``: 1.0 at full size."""
    if epoch >= epochs - 1:
        return 1.0
    mid = (epoch + 0.5) / epochs
    if mid >= 1.0 - full_fraction:
        return 1.0
    if mid < start_fraction:
        return start_scale
    span = 1.0 - full_fraction - start_fraction  # > 0 here: start_fraction <= mid < 1 - full_fraction
    return start_scale + (1.0 - start_scale) * (mid - start_fraction) / span


def epoch_size(epoch: int, epochs: int, full_hw, options) -> tuple[int, int]:
    """The input size (H, W) 0-based ``epoch`` of a budget of ``epochs`` trains at (``options``:
    the method's start_scale, start_fraction, full_fraction, step and max_stages)."""
    full_hw = tuple(full_hw)
    s = epoch_scale(epoch, epochs, options.start_scale, options.start_fraction, options.full_fraction)
    if s >= 1.0:
        return full_hw
    hw = scaled(full_hw, s, ramp_step(full_hw, options))
    # never above the full size, never below the start (a size the compiled stages hold)
    return tuple(min(x, f) for x, f in zip(hw, full_hw))


def ramp(epochs: int, full_hw, options) -> list[tuple[int, int]]:
    """The input size of every epoch of a budget of ``epochs``."""
    return [epoch_size(e, epochs, full_hw, options) for e in range(epochs)]


def stage_sizes(full_hw, start_scale: float, step: int) -> list[tuple[int, int]]:
    """Every size below full that a ramp from ``start_scale`` can ask for, whatever the budget,
    smallest first: the sizes at the start and at every scale where an axis reaches the next
    multiple of ``step``."""
    h, w = full_hw
    cuts = {start_scale}
    for length in (h, w):
        k = int(start_scale * length / step + EPS) + 1
        while k * step < length:
            cuts.add(k * step / length)
            k += 1
    sizes = {scaled(full_hw, s, step) for s in cuts if start_scale <= s < 1.0}
    return sorted(hw for hw in sizes if hw != (h, w))


def ramp_step(full_hw, options) -> int:
    """The ramp's step in pixels: ``options.step``, or the smallest multiple of it whose ramp has
    at most ``options.max_stages`` sizes below full (each size is a stage to compile: a 224-px
    model from 112 in steps of 4 would have 28; in steps of 16, 7)."""
    step, most = int(options.step), int(getattr(options, "max_stages", 0) or 0)
    k = 1
    while most and len(stage_sizes(full_hw, options.start_scale, k * step)) > most and k * step < max(full_hw):
        k += 1
    return k * step


def stage_dir(hw) -> str:
    """The subdirectory of the artifact directory holding the stage at input size ``hw``."""
    return f"stage-{hw[0]}x{hw[1]}"
