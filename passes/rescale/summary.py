"""What ``accelc train`` says of a rescale run (``Method.run_summary``)."""

from __future__ import annotations


def _epochs(es: list[int]) -> str:
    es = sorted(es)
    if not es:
        return "no epoch"
    if es == list(range(es[0], es[-1] + 1)):
        return f"epoch {es[0]}" if len(es) == 1 else f"epochs {es[0]}-{es[-1]}"
    return "epochs " + ",".join(map(str, es))


def run_summary(rep: dict, decisions: list, options, history: list) -> list[str]:
    """The low-resolution epochs, the switch and why, from the controller's report."""
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
