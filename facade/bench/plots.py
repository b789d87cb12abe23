"""The figures of ``accelc bench``: accuracy against training time, time to target per
configuration, and what the controllers did (one panel per installed method that has something to
show)."""

from __future__ import annotations

from pathlib import Path

from ..compiler.method import installed
from .summary import _acc_key


def plot_bench(results: dict, path: Path, rep: dict) -> None:
    import matplotlib  # heavy: loaded when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    key = "test_acc"
    for c, runs in results.items():
        h = runs[0]["history"]
        key = _acc_key(h)
        ax.plot([0] + [m["train_time"] for m in h], [None] + [m[key] for m in h], "o-", label=c)
    if rep.get("target_acc"):
        rule = rep.get("target_rule")
        ax.axhline(
            rep["target_acc"],
            color="grey",
            ls=":",
            label=f"target {rep['target_acc']:.4f}" + (f" ({rule})" if rule else ""),
        )
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation accuracy (first seed)" if key == "val_acc" else "test accuracy")
    ax.set_title(f"{rep['model']} on {rep['data']}")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def plot_time_to_target(path: Path, rep: dict) -> None:
    """Median time to the target per configuration with min–max error bars, runs reaching it
    written beside each bar; configurations that never reached it are listed as such."""
    import matplotlib  # heavy: loaded when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rep["configs"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.6))
    for i, c in enumerate(names):
        r = rows[c]
        t = r.get("time_to_target")
        if t is None:
            ax.text(0, i, "  did not reach the target", va="center", fontsize=8, color="C3")
            continue
        lo, hi = r["time_to_target_range"]
        ax.barh(i, t, xerr=[[t - lo], [hi - t]], color=f"C{i % 10}", capsize=4)
        ax.text(hi, i, f"  {t:.3g} s ({r['reached']}/{r['runs']})", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("training time to target (s): median, min–max over seeds")
    target = rep.get("target_acc")
    ax.set_title(
        f"{rep['model']} on {rep['data']}: time to "
        + (f"{target:.4f} " if target else "target ")
        + f"({rep.get('decided_on', 'test').split(' ')[0]})",
        fontsize=10,
    )
    ax.margins(x=0.25)
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def plot_controllers(results: dict, path: Path, rep: dict) -> None:
    """Over epochs, one panel per method that has something to show in these runs (its
    ``Method.bench_panel``: e.g. skipped layers, remain ratio per reused layer, the resolution
    stage), in composition order. One colour per configuration in every panel; integer epoch ticks."""
    import matplotlib  # heavy: loaded when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colour = {c: f"C{i % 10}" for i, c in enumerate(results)}
    panels = []  # (panel, [(config, history)]) with content
    for m in installed():
        if m.bench_panel is None:
            continue
        runs = [(c, r[0]["history"]) for c, r in results.items() if m.bench_panel.shows(r[0]["history"])]
        if runs:
            panels.append((m.bench_panel, runs))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 4.2), squeeze=False)
    if not panels:
        a = axes[0][0]
        a.text(0.5, 0.5, "no controller acted in these configurations", ha="center", va="center")
        a.set_axis_off()
    ax = {}
    for i, (panel, runs) in enumerate(panels):
        ax[i] = axes[0][i]
        panel.draw(ax[i], runs, colour)
        ax[i].set_title(panel.title)
    for a in ax.values():
        a.set_xlabel("epoch")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.suptitle(f"{rep['model']} on {rep['data']}: what the controllers did")
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
