"""What ``accelc train`` says of a skip run (``Method.run_summary``)."""

from __future__ import annotations


def run_summary(rep: dict, decisions: list, options, history: list) -> list[str]:
    """The skip decisions with the λ values behind them, or why nothing was skipped."""
    if getattr(options, "rule", "lars") == "freezeout":
        return [freezeout_summary(rep, decisions, options)]
    lam = [e for e in rep.get("lambdas") or [] if isinstance(e, dict)]
    tau, mode = options.tau, options.tau_mode
    skips = [d for d in decisions if d.get("action") == "skip"]
    if skips:
        parts = []
        for d in skips:
            vals = ", ".join(
                f"{k} λ {v:.3g}"
                + (
                    f" > {tau} x {d['first'][k]:.3g}"
                    if mode == "relative" and (d.get("first") or {}).get(k)
                    else (f" > {tau}" if mode == "absolute" else "")
                )
                for k, v in (d.get("lam") or {}).items()
                if v is not None
            )
            parts.append(f"after epoch {d.get('epoch')}: skip {', '.join(d.get('skipped') or [])} ({vals})")
        text = "skip: " + "; ".join(parts)
    else:
        text = f"skip: skipped nothing in {len(lam)} epoch(s)"
        first = {k: v for k, v in (lam[0] if lam else {}).items() if k != "epoch"}
        if len(lam) <= options.min_epochs:
            text += f": the first decision comes after epoch {options.min_epochs + 1}"
        elif mode == "growth":
            text += f": no layer's λ growth per epoch fell under {tau}"
        elif mode == "absolute":
            top = max(((k, v, e["epoch"]) for e in lam for k, v in e.items() if k != "epoch"), key=lambda t: t[1])
            text += f": no layer's λ passed {tau} (largest: {top[0]} {top[1]:.3g} at epoch {top[2]})"
        else:
            ratios = [
                (k, v / first[k], e["epoch"]) for e in lam[1:] for k, v in e.items() if k != "epoch" and first.get(k)
            ]
            done = [d for d in decisions if d.get("action") == "keep"]
            if done:
                text += f": {done[-1].get('why')}"
            elif ratios:
                top = max(ratios, key=lambda t: t[1])
                text += (
                    f": no layer's λ passed {tau} x its first-epoch λ (largest: {top[0]} at "
                    f"{top[1]:.2f}x in epoch {top[2]})"
                )
    return [text]


def freezeout_summary(rep: dict, decisions: list, options) -> str:
    """Which layers froze at which step, and the measured time per step of each frozen prefix."""
    froze = [d for d in decisions if d.get("action") == "freeze"]
    if not froze:
        return (
            f"skip (freezeout): nothing froze; the first layer freezes at {options.t0:.0%} of the run's "
            "epochs (a run that stopped before it, or a network with one trainable layer)"
        )
    parts = []
    for d in froze:
        added = [k for k in d.get("skipped") or [] if k not in (parts[-1][1] if parts else [])]
        parts.append(
            (f"{', '.join(added)} at step {d.get('step')} ({float(d.get('progress', 0)):.0%})", d.get("skipped") or [])
        )
    text = "skip (freezeout): froze " + "; ".join(p for p, _ in parts)
    ms = rep.get("ms_per_step_by_skip_set") or {}
    if isinstance(ms, dict) and ms.get("(none)") and len(ms) > 1:
        last = list(ms)[-1]
        text += f"; measured {ms['(none)']:.0f} ms/step with nothing frozen, {ms[last]:.0f} with the most"
    return text


def _skipped(m: dict) -> list:
    return (m.get("skip") or {}).get("skipped") or []


def panel_shows(history: list) -> bool:
    return any(_skipped(m) for m in history)


def panel_draw(ax, runs: list, colour: dict) -> None:
    """Which layers were skipped in which epoch, one colour per configuration."""
    layers: list = []
    for _, h in runs:
        for m in h:
            layers += [layer for layer in _skipped(m) if layer not in layers]
    for c, h in runs:
        pts = [(m["epoch"], layers.index(layer)) for m in h for layer in _skipped(m)]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="s", s=60, color=colour[c], label=c)
    ax.set_yticks(range(len(layers)), layers)
