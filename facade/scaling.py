"""``accelc bench --nproc N``: how data-parallel training scales on this machine.

The model is compiled once (default passes); then the same training (same global batch, data and
seed) runs with 1, 2, ..., N processes of one thread each, plus one process with every core (what
a user would run without ``--nproc``), interleaved round by round. Each row reports throughput
(median over the epochs after the first, which carries the start-up), the step time, the speed-up
over one single-thread process, the all-reduce cost per step measured on its own, and how long a
step waited for it after its backward (what overlapping did not hide).

The simple model printed with the table: a step on P processes costs
``t(P) = t_compute(1) / P + t_wait(P)``, with ``t_wait`` at most one ring all-reduce,
``2 (P-1)/P · bytes / bandwidth + 2 (P-1) · latency``; on several machines the bandwidth is the
network's. :func:`predict` applies it to the measured numbers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from . import api
from .bench.spec import check_keywords, keyword_signature
from .compiler import checks
from .compiler.artifacts import DEFAULT_LR
from .compiler.errors import AccelcError
from .compiler.fileio import atomic_dir
from .compiler.resources import max_threads
from .runtime.distributed import MAX_WORLD

if TYPE_CHECKING:
    from typing_extensions import Unpack


class ScalingSettings(TypedDict, total=False):
    """The keywords :func:`run_scaling` takes besides the model, data, epochs, output folder and
    process count (their meaning: :class:`ScalingSpec`)."""

    batch_size: int
    seed: int
    lr: float
    repeats: int
    train_limit: int | None
    test_limit: int | None
    input_shape: tuple | None
    force: bool
    progress: bool


@dataclass(frozen=True)
class ScalingSpec:
    """One scaling measurement: the model (a zoo name or an ONNX path) trained on ``data`` for
    ``epochs`` epochs with 1..``nproc`` processes of one thread each and one process with every
    core, ``repeats`` rounds, global batch ``batch_size``; written to ``out_dir`` (replaced only
    with ``force``)."""

    model: str
    data: str
    epochs: int
    out_dir: Any
    nproc: int
    batch_size: int = 64
    seed: int = 0
    lr: float = DEFAULT_LR
    repeats: int = 1
    train_limit: int | None = None
    test_limit: int | None = None
    input_shape: tuple | None = None
    force: bool = False
    progress: bool = True


def run_scaling(model: str, data: str, epochs: int, out_dir, nproc: int, **settings: Unpack[ScalingSettings]) -> dict:
    """Measure data-parallel scaling (the module doc); the keywords: :class:`ScalingSpec`."""
    check_keywords("run_scaling", settings, ScalingSettings)
    spec = ScalingSpec(model, data, epochs, out_dir, nproc, **settings)
    _check(spec)
    from .zoo import ZOO  # heavy: torch

    protect = [] if model in ZOO else [model]
    with atomic_dir(out_dir, force=spec.force, kind="scaling", protect=protect) as out:
        return _run(spec, Path(out))


keyword_signature(run_scaling, ScalingSpec, ScalingSettings)


def _check(spec: ScalingSpec) -> None:
    """Refuse what cannot be measured, with the messages the CLI prints."""
    api.check_train_args(
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        seed=spec.seed,
        lr=spec.lr,
        threads=None,
        train_limit=spec.train_limit,
        test_limit=spec.test_limit,
        device="cpu",
        data=spec.data,
    )
    checks.positive_int("--nproc", spec.nproc, MAX_WORLD)
    checks.positive_int("--repeats", spec.repeats, 1000)
    if spec.nproc < 2:
        raise AccelcError("--nproc must be at least 2 to measure scaling")
    if spec.epochs < 2:
        raise AccelcError("--epochs must be at least 2 with --nproc (the first epoch carries the start-up)")
    for n in range(2, spec.nproc + 1):
        if spec.batch_size % n:
            raise AccelcError(
                f"--batch-size {spec.batch_size} must be a multiple of every process count 1..{spec.nproc}"
            )


def _run(spec: ScalingSpec, out: Path) -> dict:
    import shutil

    from .runtime.train import machine_info
    from .zoo import ZOO, export_zoo

    work = out / "work"
    work.mkdir()
    if spec.model in ZOO:
        model_path = work / f"{spec.model}.onnx"
        export_zoo(spec.model, model_path, input_shape=spec.input_shape, seed=spec.seed)
    else:
        model_path = Path(spec.model)
    art = work / "artifacts"
    api.compile(model_path, art, lr=spec.lr, batch_size=spec.batch_size)
    cores = max_threads()
    setups = [(1, cores)] + [(n, 1) for n in range(1, spec.nproc + 1)]
    runs = _measure(spec, art, work, setups)
    rows = _rows(runs, setups, spec.batch_size)
    rep = {
        "model": spec.model if spec.model in ZOO else Path(spec.model).name,
        "data": spec.data.split(":")[0],
        "epochs": spec.epochs,
        "batch_size": spec.batch_size,
        "repeats": spec.repeats,
        "train_limit": spec.train_limit,
        "cores": cores,
        "machine": machine_info(),
        "rows": rows,
        "prediction": predict(rows, spec.batch_size),
    }
    (out / "scaling.json").write_text(json.dumps(rep, indent=1))
    (out / "scaling.md").write_text(markdown(rep))
    plot(rep, out / "scaling.png")
    for f in sorted(work.glob("run-*")):  # keep the summaries, not the checkpoints
        (out / "runs").mkdir(exist_ok=True)
        os.replace(f / "summary.json", out / "runs" / f"{f.name}.json")
    shutil.rmtree(work)
    return rep


def _measure(spec: ScalingSpec, art: Path, work: Path, setups: list[tuple[int, int]]) -> dict[str, list[dict]]:
    """Every setup (processes, threads each) trained once per round, interleaved round by round:
    its median throughput after the first epoch, final accuracy and all-reduce numbers."""
    import sys

    import numpy as np

    runs: dict[str, list[dict]] = {}
    for r in range(spec.repeats):
        for n, threads in setups:
            key = f"{n}x{threads}"
            run = work / f"run-{key}-{r}"
            if spec.progress:
                print(f"scaling: round {r + 1}/{spec.repeats}, {n} process(es) x {threads} thread(s)", file=sys.stderr)
            # as rank processes for every n (one included), so every row starts its training the same way
            s = api._train_local_ranks(
                api.train_spec(
                    art, spec.data, epochs=spec.epochs, batch_size=spec.batch_size, run_dir=run, seed=spec.seed,
                    lr=spec.lr, threads=threads, train_limit=spec.train_limit, test_limit=spec.test_limit, nproc=n,
                )
            )  # fmt: skip
            ips = [m["images_per_second"] for m in s["history"][1:]]
            runs.setdefault(key, []).append(
                {
                    "images_per_second": float(np.median(ips)),
                    "final_test_acc": s["final_test_acc"],
                    **(s.get("distributed") or {}),
                }
            )
    return runs


def _rows(runs: dict[str, list[dict]], setups: list[tuple[int, int]], batch_size: int) -> list[dict]:
    """One row per setup over its rounds: throughput median and min–max, step time, speed-up and
    efficiency against one single-thread process, and the all-reduce cost of distributed rows."""
    import numpy as np

    base = float(np.median([x["images_per_second"] for x in runs["1x1"]]))
    rows = []
    for n, threads in setups:
        xs = runs[f"{n}x{threads}"]
        ips = [x["images_per_second"] for x in xs]
        med = float(np.median(ips))
        row = {
            "processes": n,
            "threads_each": threads,
            "images_per_second": med,
            "images_per_second_min": min(ips),
            "images_per_second_max": max(ips),
            "step_ms": 1e3 * batch_size / med,
            "speedup_vs_1x1": med / base,
            "efficiency": med / base / (n * threads),
            "final_test_acc": xs[-1]["final_test_acc"],
        }
        if n > 1:
            row["allreduce_alone_ms"] = float(np.median([x["allreduce_alone_ms"] for x in xs]))
            row["allreduce_wait_ms_per_step"] = float(np.median([x["allreduce_wait_ms_per_step"] for x in xs]))
            row["gradient_bytes"] = xs[0]["gradient_bytes"]
            row["buckets"] = xs[0]["buckets"]
        rows.append(row)
    return rows


def predict(rows: list[dict], batch_size: int, bandwidths_gbit=(10.0, 100.0), latency_us: float = 20.0) -> dict:
    """The simple model of the module doc, fed with this machine's numbers: the single-thread
    compute time of a step and the gradient bytes. Returns the predicted step time and speed-up
    for P = 2, 4, 8, 16 machines of this machine's single-process, all-core speed, on networks of
    ``bandwidths_gbit``."""
    full = next(r for r in rows if r["processes"] == 1 and r["threads_each"] > 1)
    dist = [r for r in rows if r["processes"] > 1]
    if not dist:
        return {}
    nbytes = dist[0]["gradient_bytes"]
    t1 = full["step_ms"]
    out = {"assumptions": f"step compute {t1:.1f} ms (one machine, all cores), {nbytes} gradient bytes, "
           f"ring all-reduce, {latency_us:g} us latency per hop, no overlap", "machines": {}}  # fmt: skip
    for bw in bandwidths_gbit:
        for p in (2, 4, 8, 16):
            comm = 2 * (p - 1) / p * nbytes * 8 / (bw * 1e9) * 1e3 + 2 * (p - 1) * latency_us / 1e3
            step = t1 / p + comm
            out["machines"][f"{p}@{bw:g}Gbit"] = {"step_ms": step, "speedup": t1 / step, "allreduce_ms": comm}
    return out


def markdown(rep: dict) -> str:
    m = rep["machine"]
    lines = [
        f"# Data-parallel scaling — {rep['model']} on {rep['data']}",
        "",
        f"Global batch {rep['batch_size']}, {rep['epochs']} epochs per run (throughput: median of epochs 2..), "
        f"{rep['repeats']} round(s) interleaved; {rep['cores']} cores, {m['platform']}, "
        f"ORT {m['onnxruntime']}, torch {m['torch']}.",
        "",
        "*All-reduce alone*: one all-reduce of every gradient bucket with nothing to hide it behind. *Waited per "
        "step*: how long a step waited after its backward for the all-reduces still running and for the "
        "slower rank (what overlapping with the backward did not hide).",
        "",
        "| processes × threads | images/s (median) | min–max | ms/step | × 1×1 | efficiency | all-reduce alone (ms) "
        "| waited per step (ms) | gradient MB (buckets) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["rows"]:
        ar = (
            f"{r['allreduce_alone_ms']:.2f} | {r['allreduce_wait_ms_per_step']:.2f} | "
            f"{r['gradient_bytes'] / 2**20:.2f} ({r['buckets']})"
            if "allreduce_alone_ms" in r
            else "– | – | –"
        )
        lines.append(
            f"| {r['processes']} × {r['threads_each']} | {r['images_per_second']:.0f} | "
            f"{r['images_per_second_min']:.0f}–{r['images_per_second_max']:.0f} | {r['step_ms']:.1f} | "
            f"{r['speedup_vs_1x1']:.2f} | {r['efficiency']:.2f} | {ar} |"
        )
    pred = rep.get("prediction") or {}
    if pred:
        lines += ["", f"Predicted on P machines like this one ({pred['assumptions']}):", ""]
        lines += ["| machines @ network | ms/step | all-reduce ms | speed-up |", "|---|---|---|---|"]
        for k, v in pred["machines"].items():
            lines.append(f"| {k} | {v['step_ms']:.1f} | {v['allreduce_ms']:.2f} | {v['speedup']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rep: dict, path: Path) -> None:
    import matplotlib  # heavy

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rep["rows"] if r["threads_each"] == 1]
    full = [r for r in rep["rows"] if r["threads_each"] > 1]
    fig, ax = plt.subplots(figsize=(6, 4))
    n = [r["processes"] for r in rows]
    y = [r["images_per_second"] for r in rows]
    err = [[r["images_per_second"] - r["images_per_second_min"] for r in rows],
           [r["images_per_second_max"] - r["images_per_second"] for r in rows]]  # fmt: skip
    ax.errorbar(n, y, yerr=err, fmt="o-", capsize=4, label="P processes × 1 thread")
    ax.plot(n, [y[0] * k for k in n], "k:", label="ideal (linear)")
    for r in full:
        ax.axhline(r["images_per_second"], color="C1", ls="--", label=f"1 process × {r['threads_each']} threads")
    ax.set_xticks(n)
    ax.set_xlabel("processes")
    ax.set_ylabel("training images / s")
    ax.set_title(f"data-parallel scaling — {rep['model']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
