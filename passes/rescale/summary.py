"""What ``accelc train`` says of a rescale run (``Method.run_summary``)."""

from __future__ import annotations


def _epochs(es: list[int]) -> str:
    es = sorted(es)
    if not es:
        return "no epoch"
    if es == list(range(es[0], es[-1] + 1)):
        return f"epoch {es[0]}" if len(es) == 1 else f"epochs {es[0]}-{es[-1]}"
    return "epochs " + ",".join(map(str, es))


def _progressive(rep: dict) -> list[str]:
    """The sizes epoch by epoch, the full-size epochs and what the FixRes recalibration cost."""
    eps = [e for e in rep.get("epochs", []) if isinstance(e, dict) and e.get("hw")]
    full = rep.get("full_hw") or []
    runs: list[list] = []  # [first epoch, last epoch, size] of each stretch at one size
    for e in eps:
        if runs and runs[-1][2] == e["hw"] and runs[-1][1] + 1 == e["epoch"]:
            runs[-1][1] = e["epoch"]
        else:
            runs.append([e["epoch"], e["epoch"], e["hw"]])
    sizes = ", ".join(
        f"{_epochs(list(range(a, b + 1)))} at {'x'.join(map(str, hw))}" + (" (full)" if hw == full else "")
        for a, b, hw in runs
    )
    text = f"rescale: progressive resizing: {sizes or 'no epoch'}"
    recal = [e["recalibrate"] for e in eps if e.get("recalibrate")]
    if recal:
        text += (
            f"; BatchNorm recalibrated at full size before {len(recal)} evaluation(s), "
            f"{sum(r['images'] for r in recal)} images in {sum(r['seconds'] for r in recal):.2f} s"
        )
    if rep.get("low_over_full_time_per_pixel"):
        text += f"; per pixel, a smaller epoch took {rep['low_over_full_time_per_pixel']:.2f}x a full one (measured)"
    return [text]


def run_summary(rep: dict, decisions: list, options, history: list) -> list[str]:
    """The low-resolution epochs, the switch and why, from the controller's report (progressive
    mode: the size of every epoch)."""
    if rep.get("mode") == "progressive":
        return _progressive(rep)
    low = [e["epoch"] for e in rep.get("epochs", []) if e.get("stage") == "low"]
    hw = next((m.get("input_hw") for m in history if m.get("epoch") in low and m.get("input_hw")), None)
    at = f" ({'x'.join(map(str, hw))})" if hw else ""
    if rep.get("switch_epoch"):
        why = decisions[0]["why"].split(";")[0] if decisions else ""
        text = f"rescale: {_epochs(low)} at low resolution{at}, full resolution from epoch {rep['switch_epoch'] + 1}"
        text += f" ({why})" if why else ""
    else:
        text = f"rescale: {_epochs(low)} at low resolution{at}; the switch to full resolution never came"
    if rep.get("low_over_full_epoch_time"):
        text += f"; a low-resolution epoch took {rep['low_over_full_epoch_time']:.2f}x a full one (measured)"
    return [text]


def panel_shows(history: list) -> bool:
    return len({tuple(m["input_hw"]) for m in history if m.get("input_hw")}) > 1


def panel_draw(ax, runs: list, colour: dict) -> None:
    """The input height each epoch trained at."""
    for c, h in runs:
        ax.step(
            [m["epoch"] for m in h], [m["input_hw"][0] for m in h], where="mid", marker="o", color=colour[c], label=c
        )
    ax.set_yticks(sorted({m["input_hw"][0] for _, h in runs for m in h if m.get("input_hw")}))
