"""``make demo``: the story of one pass that pays off, in about three minutes on 2 cores.

It exports the built-in ``largekernel`` CNN (7×7/2 and 5×5/2 convolutions on 64×64 images),
compiles it with ``--passes rescale`` (progressive resizing: the input size ramps up over the
epochs) and prints what the compiler says the pass will do, then trains torch eager, plain ORT
Training and ORT + rescale side by side on the built-in synthetic data for the same budget of
epochs (same weights, data order and learning-rate schedule: warmed up and decayed linearly to zero
over the budget, as budgeted training is measured), with one line per epoch, and ends with a few
lines on what the pass did and what it saved, measured in this run.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from . import api
from .bench import markdown, run_bench
from .compiler.compile import explain
from .compiler.errors import AccelcError, show

MODEL = "largekernel"
DATA = "synthetic:4000"
EPOCHS = 6
# a budget of EPOCHS with the linear schedule; the target is the best validation accuracy plain ORT
# reaches in it (time to that accuracy, an epoch counting only at full input size, next to each
# configuration's final accuracy)
TARGET = "ort-best"
SCHEDULE = "linear"
CONFIGS = ["torch", "ort", "ort+rescale"]


def main(out: str = "demo-out") -> int:
    from .zoo import export_zoo  # heavy: torch

    t0 = time.perf_counter()
    out_dir = Path(out)
    out_dir.mkdir(exist_ok=True)
    epochs = int(os.environ.get("DEMO_EPOCHS", EPOCHS))
    onnx_path = out_dir / f"{MODEL}.onnx"
    export_zoo(MODEL, onnx_path)
    print(f"== accelc export {MODEL}: 7x7/2 and 5x5/2 convolutions on 1x64x64 images\n")
    report = api.compile(onnx_path, out_dir / "artifacts", passes=["rescale"], force=True)
    print(f"== accelc compile {onnx_path} --passes rescale -o {out_dir}/artifacts")
    for line in explain(report):
        print(f"  {line}")
    print(
        f"\n== training {', '.join(CONFIGS)} side by side: {DATA.split(':')[1]} synthetic images, a budget of "
        f"{epochs} epochs (same weights, data order and learning rate, warmed up and decayed to zero)\n",
        flush=True,
    )
    rep = run_bench(
        MODEL,
        DATA,
        epochs=epochs,
        configs=CONFIGS,
        out_dir=out_dir / "bench",
        batch_size=64,
        seed=0,
        target=TARGET,
        lr_schedule=SCHEDULE,
        progress=True,
        force=True,
    )
    print()
    print(markdown(rep))
    for line in story(rep):
        print(line)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; plots and JSON in {out_dir}/bench/")
    stage = first_stage(report)
    print(
        f"see what rescale rewrote: accelc view {out_dir}/artifacts --graph {stage} --changes "
        f"(the smallest input size's stage; --graph training for the full-resolution graph)"
    )
    return 0


def first_stage(report: dict) -> str:
    """The stage the run trains first, from the compile report's plan entry: the rescale pass
    names it (``stage``: a progressive ramp's smallest size, or kernel mode's ``stage-low``)."""
    entry = next((e for e in report.get("plan", []) if e.get("type") == "rescale"), {})
    return str(entry.get("stage") or "stage-low")


def story(rep: dict) -> list[str]:
    """What each configuration did and what it saved, from the bench report (measured here)."""
    rows = rep["configs"]
    ort, torch = rows.get("ort"), rows.get("torch")
    lines = ["== what the passes did"]
    for name, r in rows.items():
        if not name.startswith("ort+"):
            continue
        ratio = r.get("epoch_ratio_vs_ort")
        per_epoch = f"{r['epoch_seconds']:.1f} s/epoch" + (f" ({ratio:.2f}x ort's)" if ratio else "")
        total = r.get("train_time")
        took = (
            f"; {total:.0f} s of training against {ort['train_time']:.0f} s for ort"
            if total is not None and ort and ort.get("train_time")
            else ""
        )
        acc = f"; final test accuracy {r['final_test_acc']:.4f}" + (
            f" (ort {ort['final_test_acc']:.4f})" if ort else ""
        )
        lines.append(f"  {name}: {per_epoch}{took}{acc}")
        for d in r.get("decisions", [])[:4]:
            lines.append(f"    epoch {d['epoch']}: {d['action']}: {d['why']}")
        if r.get("op_reduction") is not None:
            lines.append(
                f"    cost model: {100 * r['op_reduction']:.0f}% fewer operations and "
                f"{100 * r['bandwidth_reduction']:.0f}% fewer bytes moved over the run"
            )
    target = rep.get("target_acc")
    if target is not None:
        reached = [f"{n} {r['time_to_target']:.0f} s" for n, r in rows.items() if r.get("time_to_target") is not None]
        lines.append(
            f"  time to the target accuracy {target:.4f} ({rep.get('target_rule')}): "
            + (", ".join(reached) if reached else "no configuration reached it")
        )
    if torch and ort:
        lines.append(
            f"  torch eager: {torch['epoch_seconds']:.1f} s/epoch; ort: {ort['epoch_seconds']:.1f} s/epoch "
            f"({ort.get('epoch_ratio_vs_torch', float('nan')):.2f}x torch)"
        )
    return lines


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AccelcError as e:
        print(f"accelc: error: {show(e, 2000)}", file=sys.stderr)
        sys.exit(2)
