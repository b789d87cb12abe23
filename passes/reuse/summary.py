"""What ``accelc train`` says of a reuse run (``Method.run_summary``)."""

from __future__ import annotations

from ...compiler.errors import show


def run_summary(rep: dict, decisions: list, options, history: list) -> list[str]:
    """The setting, the remain ratio per layer, the measured layer choice and the switches."""
    eps = rep.get("epochs") or []
    setting = "x".join(map(str, eps[0].get("setting") or [])) if eps else ""
    per = []
    for layer in (eps[0].get("layers") or {}) if eps else {}:
        rs = [e["layers"][layer].get("remain_ratio") for e in eps if layer in e.get("layers", {})]
        rs = [r for r in rs if r is not None]
        if rs:
            per.append(f"{layer} {rs[0]:.2f}" + (f"->{rs[-1]:.2f}" if len(rs) > 1 else ""))
    choice = rep.get("choice") if isinstance(rep.get("choice"), dict) else {}
    if rep.get("choose") == "measured" and choice and not rep.get("chosen"):
        text = f"reuse ({rep.get('strategy')}, L x H {setting}): no layer was faster reused, so every layer "
        text += "stayed exact: " + "; ".join(
            show(str((v or {}).get("why") or k), 160) for k, v in list(choice.items())[:6]
        )
    else:
        text = f"reuse ({rep.get('strategy')}, L x H {setting}): remain ratio per layer (measured) "
        text += ", ".join(per) if per else "not measured"
        if choice and rep.get("choose") == "measured":
            text += f"; reused (measured faster): {', '.join(rep.get('chosen') or []) or 'none'}"
    if "reused_layer_macs_saved" in rep:
        text += f"; the reused layers' multiply-adds {-rep['reused_layer_macs_saved']:+.0%} over the run"
    for d in rep.get("switches") or []:
        text += f"; after epoch {d.get('epoch')}: {d.get('why')}"
    return [text]


STYLES = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", "-"), ("P", "--")]


def panel_shows(history: list) -> bool:
    return any(m.get("reuse") for m in history)


def panel_draw(ax, runs: list, colour: dict) -> None:
    """The remain ratio of every reused layer over epochs (layers told apart by marker and line)."""
    for c, h in runs:
        ep = [m["epoch"] for m in h]
        names = sorted({k for m in h for k in m.get("reuse") or {}})
        for i, k in enumerate(names):
            marker, ls = STYLES[i % len(STYLES)]
            ratio = [(m.get("reuse") or {}).get(k, {}).get("remain_ratio") for m in h]
            ax.plot(ep, ratio, marker=marker, ls=ls, color=colour[c], label=f"{c}: {k}")
    ax.set_ylim(0, 1.05)
