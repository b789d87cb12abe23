"""Time-versus-accuracy fronts of budgeted runs (protocol v2, ``protocol.py --budgets``).

A budgeted workload writes one ``accelc bench`` folder per budget of E epochs,
``OUT/<workload>/budget-<E>/bench.json``: every configuration and seed trained all E epochs with
the learning rate warmed up and decayed linearly to zero over them. From those files this module
computes, per configuration and budget, the median training time over the seeds (the bench's
training time, the one its time to target uses: the final epoch's cumulative ``train_time``) and
the mean and min–max over the seeds of the final epoch's validation and test accuracy; each
configuration's points sorted by time form its front.

Per budget E and reference configuration R (``ort``; ``torch`` and ``torch-cl`` too when they ran): for each
configuration C, the training time at which C's front reaches R's mean validation accuracy at E,
by linear interpolation between consecutive points of C's front, and its ratio to R's time at E.
Validation decides; test accuracy only reports (C's, interpolated the same way, beside R's at E).
C's front never reaching it gives None ("not reached"); the front is not extrapolated below its
first point: when that point already reaches it, its time is reported as an upper bound ("≤").

``write_fronts(workload_dir)`` writes ``fronts.json``, ``fronts.md`` and ``fronts.png`` there.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path

# the configurations each one is compared with, where they ran (torch-cl: torch eager fp32 in
# channels_last, the tuned torch anchor of a CPU without native bf16)
REFERENCES = ("ort", "torch", "torch-cl")
BUDGET_DIR = re.compile(r"^budget-([1-9][0-9]*)$")
EPS = 1e-9  # the tolerance the bench's own target test uses


def budget_dirs(workload_dir: Path) -> dict[int, Path]:
    """``{E: folder}`` of the ``budget-<E>`` folders of ``workload_dir`` that hold a bench.json."""
    found = {}
    if not Path(workload_dir).is_dir():
        return found
    for d in Path(workload_dir).iterdir():
        m = BUDGET_DIR.match(d.name)
        if m and (d / "bench.json").is_file():
            found[int(m.group(1))] = d
    return dict(sorted(found.items()))


def load_budgets(workload_dir: Path) -> dict[int, dict]:
    """``{E: bench.json}`` of every budget of ``workload_dir``, smallest budget first."""
    return {e: json.loads((d / "bench.json").read_text()) for e, d in budget_dirs(workload_dir).items()}


def _key(rep: dict) -> str:
    """The accuracy that decides: validation when the bench held a split out, else test (as the bench)."""
    return "val_acc" if rep.get("val_images") else "test_acc"


def _spread(values: list[float]) -> tuple[float, list[float]]:
    return statistics.fmean(values), [min(values), max(values)]


def point(budget: int, histories: list[list[dict]], seeds: list, key: str) -> dict | None:
    """One configuration at one budget: median training time over the seeds, mean and min–max of
    the final epoch's validation (``key``) and test accuracy, and whether every seed trained all
    ``budget`` epochs (None without any epoch)."""
    finals = [h[-1] for h in histories if h]
    if not finals:
        return None
    times = [m["train_time"] for m in finals]
    vals = [m[key] for m in finals]
    tests = [m["test_acc"] for m in finals]
    val, val_range = _spread(vals)
    test, test_range = _spread(tests)
    return {
        "budget": budget,
        "seeds": list(seeds),
        "time": statistics.median(times),
        "time_range": [min(times), max(times)],
        "val_acc": val,
        "val_acc_range": val_range,
        "test_acc": test,
        "test_acc_range": test_range,
        "times": times,
        "val_accs": vals,
        "test_accs": tests,
        "complete": len(finals) == len(histories) and all(len(h) == budget for h in histories),
    }


def fronts_of(reps: dict[int, dict]) -> dict[str, list[dict]]:
    """``{config: [point, ...]}`` over every budget of ``reps`` (``{E: bench.json}``), each
    configuration's points sorted by training time (then budget): its front."""
    out: dict[str, list[dict]] = {}
    for e, rep in sorted(reps.items()):
        key = _key(rep)
        for c, r in rep["configs"].items():
            p = point(e, r.get("histories") or [], r.get("seeds") or rep.get("seeds") or [], key)
            if p is not None:
                out.setdefault(c, []).append(p)
    for pts in out.values():
        pts.sort(key=lambda p: (p["time"], p["budget"]))
    return out


def reach(front: list[dict], acc: float) -> dict:
    """Where ``front`` (points sorted by time) first reaches validation accuracy ``acc``: the time,
    linearly interpolated between the two points around the crossing, the test accuracy there
    (interpolated the same way) and the budgets it lies between. Not reached: ``time`` None (and
    the front's best validation accuracy). Reached by the first point already: that point's time
    as an upper bound (``upper_bound``), since the front is not extrapolated below it."""
    if not front:
        return {"reached": False, "time": None, "upper_bound": False, "test_acc": None, "between": None, "best": None}
    best = max(p["val_acc"] for p in front)
    first = front[0]
    if first["val_acc"] >= acc - EPS:
        return {
            "reached": True, "time": first["time"], "upper_bound": True, "test_acc": first["test_acc"],
            "between": [first["budget"]], "best": best,
        }  # fmt: skip
    for lo, hi in zip(front, front[1:]):
        if lo["val_acc"] < acc - EPS and hi["val_acc"] >= acc - EPS:
            f = min(max((acc - lo["val_acc"]) / (hi["val_acc"] - lo["val_acc"]), 0.0), 1.0)
            return {
                "reached": True,
                "time": lo["time"] + f * (hi["time"] - lo["time"]),
                "upper_bound": False,
                "test_acc": lo["test_acc"] + f * (hi["test_acc"] - lo["test_acc"]),
                "between": [lo["budget"], hi["budget"]],
                "best": best,
            }
    return {"reached": False, "time": None, "upper_bound": False, "test_acc": None, "between": None, "best": best}


def time_to_reference(fronts: dict[str, list[dict]], ref: str) -> list[dict]:
    """Per budget of ``ref``: its mean validation and test accuracy and median time there, and for
    every configuration the time its front takes to reach that validation accuracy (:func:`reach`)
    and the ratio to ``ref``'s time (an upper bound where the time is one)."""
    rows = []
    for rp in sorted(fronts.get(ref, []), key=lambda p: p["budget"]):
        configs = {}
        for c, front in fronts.items():
            r = reach(front, rp["val_acc"])
            r["ratio"] = r["time"] / rp["time"] if r["time"] is not None and rp["time"] > 0 else None
            configs[c] = r
        rows.append(
            {
                "budget": rp["budget"],
                "ref_val_acc": rp["val_acc"],
                "ref_test_acc": rp["test_acc"],
                "ref_time": rp["time"],
                "configs": configs,
            }
        )
    return rows


def build(reps: dict[int, dict], workload: str = "") -> dict:
    """What fronts.json holds, from ``{E: bench.json}`` of one workload."""
    first = reps[min(reps)] if reps else {}
    fronts = fronts_of(reps)
    machine = first.get("machine") or {}
    return {
        "workload": workload,
        "model": first.get("model"),
        "data": first.get("data"),
        "input_shape": first.get("input_shape"),
        "budgets": sorted(reps),
        "seeds": first.get("seeds"),
        "lr": first.get("lr"),
        "lr_schedule": {str(e): r.get("lr_schedule") for e, r in sorted(reps.items())},
        "stop_at_target": {str(e): bool(r.get("stop_at_target")) for e, r in sorted(reps.items())},
        "batch_size": first.get("batch_size"),
        "train_images": first.get("train_images"),
        "val_images": first.get("val_images"),
        "test_images": first.get("test_images"),
        "decided_on": first.get("decided_on"),
        "dates": sorted({r.get("date") for r in reps.values() if r.get("date")}),
        "machine": machine,
        "cpu": machine.get("cpu"),
        "not_run": {c: why for r in reps.values() for c, why in (r.get("not_run") or {}).items()},
        "fronts": fronts,
        # False where a larger budget took less time than a smaller one (noise, a one-off cost):
        # the front then follows the time order, not the budgets'
        "time_follows_budget": {
            c: [p["budget"] for p in pts] == sorted(p["budget"] for p in pts) for c, pts in fronts.items()
        },
        "time_to": {ref: time_to_reference(fronts, ref) for ref in REFERENCES if ref in fronts},
    }


def _n(x, fmt: str = "{:.1f}") -> str:
    return "—" if x is None else fmt.format(x)


def _acc(p: dict, k: str) -> str:
    lo, hi = p[f"{k}_range"]
    return f"{p[k]:.4f} ({lo:.4f}–{hi:.4f})"


def reach_cells(r: dict) -> tuple[str, str, str, str]:
    """The time, ratio, test accuracy and budgets cells of one :func:`reach` result."""
    if not r["reached"]:
        best = "" if r.get("best") is None else f" (best {r['best']:.4f})"
        return f"not reached{best}", "—", "—", "—"
    le = "≤ " if r["upper_bound"] else ""
    between = "–".join(f"E={e}" for e in r["between"])
    ratio = "—" if r["ratio"] is None else f"{le}{r['ratio']:.2f}"
    return f"{le}{r['time']:.1f}", ratio, f"{r['test_acc']:.4f}", between


def markdown(fr: dict, heading: str = "####") -> str:
    """The fronts of one workload as markdown: the points (config × budget), then per reference
    and budget every configuration's time to the reference's validation accuracy."""
    shape = "×".join(str(v) for v in (fr.get("input_shape") or [])[1:])
    m = fr.get("machine") or {}
    where = ", ".join(
        x for x in (fr.get("cpu"), m.get("platform"), m.get("cpus") and f"{m['cpus']} CPUs") if x
    )  # fmt: skip
    lines = [
        f"{heading} {fr['workload']}: budgeted fronts, {fr.get('model')} at {shape}",
        "",
        f"Budgets of {', '.join(map(str, fr['budgets']))} epochs, each trained in full with the learning "
        "rate warmed up and decayed linearly to zero over the budget; "
        f"{fr.get('train_images')} training / {fr.get('val_images')} validation / {fr.get('test_images')} test "
        f"images, seeds {', '.join(map(str, fr.get('seeds') or []))}, batch {fr.get('batch_size')}, lr "
        f"{fr.get('lr')}, {', '.join(fr.get('dates') or [])}{f'; {where}' if where else ''} "
        f"(`{fr['workload']}/budget-<E>/bench.md`, `{fr['workload']}/fronts.png`). Time: training seconds "
        "to the end of the budget, median (min–max) over the seeds; accuracies: final epoch, mean "
        "(min–max) over the seeds.",
        "",
    ]
    unordered = [c for c, ok in fr.get("time_follows_budget", {}).items() if not ok]
    if unordered:
        lines += [
            f"Training time does not grow with the budget for {', '.join(unordered)} (noise or a one-off "
            "cost): those fronts follow the time order, not the budgets'.",
            "",
        ]
    odd = [e for e, s in fr.get("lr_schedule", {}).items() if not str(s).startswith("linear")]
    odd += [e for e, s in fr.get("stop_at_target", {}).items() if s]
    if odd:
        lines += [f"Not a budgeted run (schedule not linear or stopped at a target): budget(s) {', '.join(odd)}.", ""]
    lines += [
        "| config | budget | training time (s) | validation acc | test acc |",
        "|---|---|---|---|---|",
    ]
    for c, pts in fr["fronts"].items():
        for p in sorted(pts, key=lambda p: p["budget"]):
            lo, hi = p["time_range"]
            partial = "" if p["complete"] else " (not every epoch ran)"
            lines.append(
                f"| {c} | E={p['budget']}{partial} | {p['time']:.1f} ({lo:.1f}–{hi:.1f}) "
                f"| {_acc(p, 'val_acc')} | {_acc(p, 'test_acc')} |"
            )
    for c, why in (fr.get("not_run") or {}).items():
        lines.append(f"| {c} | not run: {why} | | | |")
    for ref, rows in fr.get("time_to", {}).items():
        lines += [
            "",
            f"Time to {ref}'s accuracy: per budget E, the training time at which each configuration's front "
            f"(its budgets sorted by time, linearly interpolated) reaches {ref}'s mean validation accuracy at E, "
            f"and its ratio to {ref}'s time at E; ≤: the configuration's fastest budget already reaches it "
            "(no extrapolation below it). Test accuracy there is interpolated the same way.",
            "",
            f"| budget | {ref} val acc | {ref} test acc | {ref} time (s) | config | time (s) | ×{ref} "
            "| test acc there | between |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            for c, r in row["configs"].items():
                t, ratio, test, between = reach_cells(r)
                lines.append(
                    f"| E={row['budget']} | {row['ref_val_acc']:.4f} | {row['ref_test_acc']:.4f} "
                    f"| {row['ref_time']:.1f} | {c} | {t} | {ratio} | {test} | {between} |"
                )
    if not fr.get("time_to"):
        lines += ["", "No `ort` or `torch` configuration ran: no time to a reference's accuracy."]
    return "\n".join(lines) + "\n"


def plot(fr: dict, path: Path) -> None:
    """Training time (s) against test accuracy: one line per configuration through its budgets,
    min–max over the seeds as vertical bars, each point labelled with its budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for c, pts in fr["fronts"].items():
        x = [p["time"] for p in pts]
        y = [p["test_acc"] for p in pts]
        err = [
            [p["test_acc"] - p["test_acc_range"][0] for p in pts],
            [p["test_acc_range"][1] - p["test_acc"] for p in pts],
        ]
        bars = ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=c)
        for p in pts:
            ax.annotate(
                f"E={p['budget']}", (p["time"], p["test_acc"]), textcoords="offset points", xytext=(4, 4),
                fontsize=7, color=bars[0].get_color(),
            )  # fmt: skip
    ax.set_xlabel("training time (s), median over seeds")
    ax.set_ylabel("test accuracy (final epoch), mean; bars min–max")
    ax.set_title(f"{fr['workload']}: {fr.get('model')}, budgets {', '.join(map(str, fr['budgets']))} epochs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a reader sees the old file or the new one


def write_fronts(workload_dir: Path, workload: str | None = None) -> dict | None:
    """fronts.json, fronts.md and fronts.png of one workload from its budget folders; None (and
    nothing written) when it has none."""
    workload_dir = Path(workload_dir)
    reps = load_budgets(workload_dir)
    if not reps:
        return None
    fr = build(reps, workload or workload_dir.name)
    _write(workload_dir / "fronts.json", json.dumps(fr, indent=1))
    _write(workload_dir / "fronts.md", markdown(fr, heading="#"))
    plot(fr, workload_dir / "fronts.png")
    return fr
