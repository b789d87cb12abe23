"""The options of the ``rescale`` pass (both modes) and the fields of its plan.json entry."""

from __future__ import annotations

import dataclasses

from ...compiler.errors import InvalidValue
from ...compiler.options import Options, choice, fraction, int_at_least, option, positive_float, with_schema
from ...compiler.schemas import DIMS, STAGE_NAME


@with_schema({"type": "string", "pattern": r"^(epoch:[0-9]+|fraction:[0-9.eE+-]+|plateau(:[0-9]+)?)$"})
def _switch(value):
    if not isinstance(value, str):
        raise TypeError(f"expected epoch:E, fraction:F or plateau[:PATIENCE], got {value!r}")
    text = value
    kind, _, val = text.partition(":")
    if kind == "epoch" and val.isdigit() and int(val) >= 1:
        return text
    if kind == "fraction":
        f = float(val)
        if 0 < f < 1:
            return text
    if kind == "plateau":
        if not val or val.isdigit():
            return text
    raise ValueError("use epoch:E, fraction:F (0<F<1) or plateau[:PATIENCE]")


def _in_range(parse, value, reason: str, ok):
    """``parse(value)`` (a shared parser), its range errors reworded as ``reason``."""
    try:
        v = parse(value)
    except ValueError as e:
        if str(e).startswith("expected"):  # not a number at all: the parser's own words
            raise
        raise ValueError(reason) from None
    if not ok(v):
        raise ValueError(reason)
    return v


@with_schema({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1})
def _open_unit(value):
    return _in_range(positive_float, value, "must be a number in (0, 1)", lambda v: v < 1)


MAX_RECALIBRATE = 100_000


@with_schema({"type": "integer", "minimum": 0, "maximum": MAX_RECALIBRATE})
def _batches(value):
    reason = f"must be an integer in 0..{MAX_RECALIBRATE} (batches; 0 turns it off)"
    return _in_range(int_at_least(0), value, reason, lambda v: v <= MAX_RECALIBRATE)


@dataclasses.dataclass(frozen=True)
class RescaleOptions(Options):
    factor: int = option(2, "resolution factor s of the low-resolution stage", int_at_least(1), flag="--rescale-factor")
    min_kernel: int = option(
        5,
        "kernels at least this large are resampled; smaller ones keep their size",
        int_at_least(1),
        flag="--rescale-min-kernel",
    )
    switch: str = option(
        "fraction:0.5",
        "when to go to full resolution: epoch:E, fraction:F of the epochs, or "
        "plateau[:PATIENCE] (low-res validation loss stops improving)",
        _switch,
        flag="--rescale-switch",
    )
    method: str = option(
        "bilinear",
        "interpolation of the up-rescale: bilinear or bicubic",
        choice("bilinear", "bicubic"),
        flag="--rescale-method",
    )
    reset_moments: str = option(
        "changed",
        "optimizer moments reset at the switch: changed (resampled "
        "parameters only; moments never carry across a shape change) or all",
        choice("changed", "all"),
        flag="--rescale-reset-moments",
    )
    mode: str = option(
        "progressive",
        "progressive: progressive resizing (the input size ramps up over the run's epochs, every "
        "parameter shared at every size; the default, measured best on validation: docs/methods/rescale.md); "
        "kernel: the seed's kernel rescaling (one low-resolution stage with resampled kernels and head, "
        "then full resolution). The options whose help starts with "
        "'progressive:' apply to progressive mode, the others to kernel mode (--rescale-min-kernel to both)",
        choice("kernel", "progressive"),
        flag="--rescale-mode",
    )
    start_scale: float = option(
        0.5,
        "progressive: the ramp's first input size as a part of the full height and width, in (0, 1)",
        _open_unit,
        flag="--rescale-start-scale",
    )
    start_fraction: float = option(
        0.4,
        "progressive: the part of the run's epochs at the starting size, in [0, 1)",
        fraction,
        flag="--rescale-start-fraction",
    )
    full_fraction: float = option(
        0.2,
        "progressive: the part of the run's epochs at full size at its end, in [0, 1) (the last epoch "
        "always trains at full size)",
        fraction,
        flag="--rescale-full-fraction",
    )
    step: int = option(
        4,
        "progressive: input sizes are multiples of this many pixels (the ramp rounds down); one "
        "stage is compiled per size, so a larger step compiles fewer",
        int_at_least(1),
        flag="--rescale-step",
    )
    max_stages: int = option(
        8,
        "progressive: at most this many sizes below full (each a compiled training graph with its own "
        "copy of the weights): where steps of --rescale-step would give more, the step grows to the "
        "smallest multiple of it that fits (a 224-px model from 112: steps of 16, 7 stages)",
        int_at_least(1),
        flag="--rescale-max-stages",
    )
    large_kernels: str = option(
        "keep",
        "progressive: the kernels of at least --rescale-min-kernel at a size below full: keep (the same "
        "kernel at every size), shrink (resampled to the input's scale with the kernel mode's tent "
        "weights, their sum kept) or pi (FlexiViT's pseudo-inverse resize: the least-squares kernel "
        "whose response to the resized input matches the full kernel's on the full input). shrink and pi "
        "resize in the graph, from the full-size parameter, which learns through the resize",
        choice("keep", "shrink", "pi"),
        flag="--rescale-large-kernels",
    )
    recalibrate: int = option(
        0,
        "progressive: before each evaluation of an epoch below full size, gather the BatchNorm "
        "running statistics again at full size (FixRes) on this many training batches (forward "
        "only; its seconds count as training time); 0 (off): an epoch is evaluated at the size it "
        "trained at, so full-size statistics serve only a checkpoint or export read at full size "
        "in the middle of the ramp",
        _batches,
        flag="--rescale-recalibrate",
    )

    def __post_init__(self):
        total = self.start_fraction + self.full_fraction
        if total > 1 + 1e-12:
            raise InvalidValue(
                f"{self.flag('start_fraction')} {self.start_fraction:g} and {self.flag('full_fraction')} "
                f"{self.full_fraction:g} add up to {total:g}: the run's part at the starting size and its part "
                "at full size must add up to at most 1"
            )


# the fields of its plan.json entry besides the options: the stage, the resampled parameters
PLAN_FIELDS = {
    "required": ["stage", "params"],
    "properties": {
        "params": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["kind", "full"],
                "properties": {
                    "kind": {"enum": ["conv", "gemm"]},
                    "full": DIMS,
                    "small": DIMS,
                    "chw": DIMS,
                    "transB": {"type": "boolean"},
                },
            },
        },
        "input_hw": {**DIMS, "minItems": 2, "maxItems": 2},
        # progressive mode: the full input size and one stage per size of the ramp, smallest first
        "full_hw": {**DIMS, "minItems": 2, "maxItems": 2},
        "stages": {
            "type": "array",
            "minItems": 1,
            "maxItems": 64,
            "items": {
                "type": "object",
                "required": ["hw", "dir"],
                "properties": {
                    "hw": {**DIMS, "minItems": 2, "maxItems": 2},
                    "dir": {"type": "string", "pattern": STAGE_NAME},
                    "heads": {"type": "object"},
                    "kernels": {"type": "object"},
                },
            },
        },
    },
}
