"""``curves.png``: loss and accuracy against training time, with the variant switches marked."""

from __future__ import annotations

import os
from pathlib import Path

from .logs import _hw


def _switches(history: list[dict]) -> list[tuple[float, str]]:
    """(training time at the start of the epoch, its variant and input size) wherever the variant
    or the input size differs from the previous epoch's, the first epoch included when it is not
    the plain graph at full size."""
    out, prev = [], ("base", None)
    full = max((tuple(m.get("input_hw") or ()) for m in history), default=())
    for i, m in enumerate(history):
        cur = (m.get("variant", "base"), tuple(m.get("input_hw") or ()))
        if cur != prev and (i or cur[0] != "base" or cur[1] != full):
            start = history[i - 1]["train_time"] if i else 0.0
            hw = f" {_hw(cur[1])}" if cur[1] and cur[1] != full else ""
            out.append((start, f"{cur[0]}{hw}"))
        prev = cur
    return out


def plot_run(history: list[dict], path: Path, title: str = "") -> None:
    """Loss and accuracy against training time, each variant switch a dotted vertical line with
    the variant's name (a controller's decision, a resolution stage)."""
    import matplotlib  # heavy: loaded when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [m["train_time"] for m in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(t, [m["train_loss"] for m in history], "o-", color="C0", label="train loss")
    ax[0].plot(t, [m["test_loss"] for m in history], "s--", color="C1", label="test loss")
    ax[0].set_xlabel("training time (s)")
    ax[0].set_ylabel("loss")
    ax[1].plot(t, [m["train_acc"] for m in history], "o-", color="C0", label="train acc")
    ax[1].plot(t, [m["test_acc"] for m in history], "s--", color="C1", label="test acc")
    ax[1].set_xlabel("training time (s)")
    ax[1].set_ylabel("accuracy")
    for a in ax:
        a.set_xlim(left=0)
        for x, name in _switches(history):
            a.axvline(x, color="0.5", linestyle=":", linewidth=1)
            a.annotate(
                name,
                (x, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -2),
                textcoords="offset points",
                rotation=90,
                va="top",
                ha="left",
                fontsize=7,
                color="0.35",
            )
        a.legend(loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
