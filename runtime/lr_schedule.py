"""The learning rate over a training budget (``--lr-schedule``).

``constant`` keeps the learning rate the artifacts (or ``--lr``) give for every step. ``linear``
treats the run's epochs as a budget, as budgeted training does ("Budgeted Training", ICLR 2020;
FFCV's and Composer's recipes): the rate rises linearly from ~0 to its value over the first
``W`` of the budget's steps (``linear:W``, default 0.05), then falls linearly to ~0 at the last
step. The rate of a step depends only on its position in the budget (epoch and step), so a resumed
run, every data-parallel rank and a method's variant switch see the same rate; changing the
epochs of a resumed run (``--allow-change epochs``) changes the budget, and with it the rates
from there on.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..compiler.errors import InvalidType, InvalidValue, show

KINDS = ("constant", "linear")
DEFAULT_WARMUP = 0.05


@dataclass(frozen=True)
class LRSchedule:
    kind: str = "constant"
    warmup: float = 0.0  # fraction of the budget's steps the rate rises over (linear)

    @classmethod
    def parse(cls, text) -> "LRSchedule":
        """``constant``, ``linear`` or ``linear:W`` (0 <= W < 1), as ``--lr-schedule`` takes it."""
        what = "--lr-schedule takes constant, linear or linear:W (W, the warm-up fraction, in [0, 1))"
        if not isinstance(text, str):
            raise InvalidType(f"{what}, got {type(text).__name__}")
        kind, sep, arg = text.strip().partition(":")
        if kind == "constant" and not sep:
            return cls()
        if kind != "linear":
            raise InvalidValue(f"{what}, got '{show(text)}'")
        if not sep:
            return cls("linear", DEFAULT_WARMUP)
        try:
            w = float(arg)
        except ValueError:
            raise InvalidValue(f"{what}, got '{show(text)}'") from None
        if not 0.0 <= w < 1.0:  # also refuses nan
            raise InvalidValue(f"{what}, got '{show(text)}'")
        return cls("linear", w)

    def text(self) -> str:
        """The form :meth:`parse` reads (recorded in the run and its checkpoints)."""
        return "constant" if self.kind == "constant" else f"linear:{self.warmup:g}"

    @property
    def constant(self) -> bool:
        return self.kind == "constant"

    def factor(self, step: int, total: int) -> float:
        """The multiple of the base rate at 0-based ``step`` of a budget of ``total`` steps."""
        if self.constant or total <= 0:
            return 1.0
        step = min(max(step, 0), total - 1)
        w = min(int(round(self.warmup * total)), total - 1)
        if step < w:
            return (step + 1) / (w + 1)
        return (total - step) / (total - w)
