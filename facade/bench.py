"""``accelc bench``: configurations side by side on one model, initial weights, data order and
hyper-parameters, in one process, one after the other.

Configurations: ``torch`` (torch eager, the baseline users would otherwise run), ``ort`` (the
artifacts without passes) and ``ort+PASS[+PASS...]`` (artifacts compiled with those passes and
their controllers; ``ort+all`` = ``ort+rescale+reuse+skip``). ``--repeats R`` runs the whole set R
times, interleaved, and reports medians.

Per configuration: time per epoch and step, time to the target accuracy, final and best accuracy,
ratios against torch and ort, operation and bandwidth reduction (cost-model FLOPs and bytes of
every step actually run — the variant of each epoch, reuse at its measured remain ratio — against
the plain ``ort`` artifacts), and peak resident memory while the configuration trained.
Writes bench.json, bench.md, accuracy_vs_time.png and controllers.png (skip timeline, remain
ratio per reused layer, resolution stage).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import threading
import time
from pathlib import Path

from . import api
from .compiler import checks
from .compiler.artifact_dir import load_artifacts
from .compiler.artifacts import optimizer_hyperparameters
from .compiler.cost import graph_costs
from .compiler.errors import AccelcError, InvalidValue, show
from .compiler.fileio import atomic_dir, atomic_write_text
from .compiler.graph import training_graph
from .compiler.model import load_model
from .compiler.pass_api import parse_pass_list, registered
from .compiler.resources import check_threads
from .runtime.algorithm import algorithms_for
from .runtime.config import ExecConfig
from .runtime.data import load_data
from .runtime.train import Trainer, machine_info


def parse_configs(text: str) -> list[str]:
    """Configurations: torch, ort, ort+PASS[+PASS...], each optionally with pass options in
    brackets, e.g. ``ort+skip[policy=suffix;tau=1.5]``."""
    out = []
    for c in [c.strip() for c in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", text) if c.strip()]:
        if c in ("torch", "ort", "ort-noopt"):
            out.append(c)
        elif c.startswith("ort+"):
            config_passes(c)
            out.append(c)
        else:
            raise AccelcError(f"unknown configuration '{c}'; use torch, ort or ort+PASS[+PASS][opt=value;...]")
    if not out:
        raise AccelcError("--configs is empty")
    if len(set(out)) != len(out):
        raise AccelcError("a configuration is listed twice in --configs")
    return out


def config_passes(c: str) -> tuple[list[str], dict]:
    """('ort+skip[tau=1.5]') -> (['skip'], {'skip': {'tau': '1.5'}}): options go to every pass that has them."""

    if c in ("ort", "ort-noopt"):
        return [], {}
    m = re.fullmatch(r"ort\+([\w+]+)(?:\[([^\]]*)\])?", c)
    if not m:
        raise AccelcError(f"bad configuration '{c}'")
    reg = registered()
    every = [n for n, cls in reg.items() if not cls.default]
    names = parse_pass_list(every if m.group(1) == "all" else m.group(1).replace("+", ","))
    opts: dict = {}
    for kv in filter(None, (m.group(2) or "").split(";")):
        k, _, v = kv.partition("=")
        owners = [n for n in names if k.strip() in reg[n].options]
        if not owners or not v:
            raise AccelcError(f"configuration '{c}': no pass in it has option '{k}' (or no value given)")
        for n in owners:
            opts.setdefault(n, {})[k.strip()] = v.strip()
    return names, opts


def _time_to(history: list[dict], target: float | None):
    if target is None:
        return None
    for m in history:
        if m["test_acc"] >= target - 1e-9:
            return m["train_time"]
    return None


def run_bench(
    model: str,
    data: str,
    epochs: int,
    configs: list[str],
    out_dir,
    batch_size: int = 64,
    seed: int = 0,
    lr: float = 1e-3,
    repeats: int = 1,
    train_limit=None,
    test_limit=None,
    target: str = "ort-best",
    progress: bool = True,
    threads: int | None = None,
    input_shape: tuple | None = None,
    force: bool = False,
) -> dict:
    """Run ``configs`` side by side; everything is written to ``out_dir`` atomically (a failed or
    interrupted benchmark leaves no folder; an existing one is replaced only with ``force``)."""
    api.check_train_args(
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        lr=lr,
        threads=threads,
        train_limit=train_limit,
        test_limit=test_limit,
        device="cpu",
        data=data,
    )
    checks.positive_int("--repeats", repeats, 1000)
    parse_target(target, configs)
    check_threads(threads)
    protect = [] if model in _zoo_names() else [model]
    with atomic_dir(out_dir, force=force, kind="bench", protect=protect) as out:
        return _run_bench(
            model, data, epochs, configs, out, batch_size, seed, lr, repeats, train_limit, test_limit, target,
            progress, threads, input_shape,
        )  # fmt: skip


def _zoo_names():
    from .compiler.export import ZOO  # heavy: torch

    return ZOO


def parse_target(spec, configs) -> float | None:
    """Validate ``--target``: ort-best (needs the ort configuration), torch-best-0.2 (needs torch)
    or an accuracy in (0, 1]; returns the number or None for the relative rules."""
    if spec == "ort-best":
        if "ort" not in configs:
            raise InvalidValue("--target ort-best needs the 'ort' configuration in --configs")
        return None
    if spec == "torch-best-0.2":
        if "torch" not in configs:
            raise InvalidValue("--target torch-best-0.2 needs the 'torch' configuration in --configs")
        return None
    try:
        v = float(spec)
    except (TypeError, ValueError):
        v = float("nan")
    if not (0.0 < v <= 1.0):
        raise InvalidValue(f"--target must be ort-best, torch-best-0.2 or an accuracy in (0, 1], got '{show(spec)}'")
    return v


def _run_bench(
    model, data, epochs, configs, out_dir, batch_size, seed, lr, repeats, train_limit, test_limit, target, progress,
    threads, input_shape,
) -> dict:  # fmt: skip
    import torch  # heavy: loaded when a benchmark runs

    from .compiler.export import ZOO, export_zoo, zoo_module  # heavy: torch, loaded when a benchmark runs
    from .runtime.session import TrainingSession  # heavy
    from .runtime.torch_engine import TorchSession  # heavy

    out = Path(out_dir)
    work = out / "artifacts"
    work.mkdir(exist_ok=True)
    if model in ZOO:
        model_path = work / f"{model}.onnx"
        export_zoo(model, model_path, input_shape=input_shape, seed=seed)
    else:
        model_path = Path(model)
        if "torch" in configs:
            print("accelc: warning: torch eager needs a zoo model; dropping the torch configuration", file=sys.stderr)
            configs = [c for c in configs if c != "torch"]
    info = load_model(model_path)
    ds = load_data(data, info.input_shape, info.num_classes, train_limit, test_limit)
    art_dirs = {}
    for c in configs:
        if c == "torch":
            continue
        names, opts = config_passes(c)
        d = work / re.sub(r"[^\w.-]+", "_", c).strip("_")
        api.compile(
            model_path, d, names, opts, lr=lr, batch_size=batch_size, force=True, info=info, opt=c != "ort-noopt"
        )
        art_dirs[c] = d
    if threads:
        torch.set_num_threads(threads)
    # torch eager uses the optimizer the artifacts describe (ORT's AdamW defaults without artifacts)
    hyper = (
        optimizer_hyperparameters(load_artifacts(next(iter(art_dirs.values())))[0].optimizer)
        if art_dirs
        else {
            "kind": "adamw",
            "alpha": 0.9,
            "beta": 0.999,
            "epsilon": 1e-6,
            "weight_decay": 0.0,
            "adam_mode": 1,
            "correct_bias": 1,
        }
    )
    results: dict[str, list[dict]] = {c: [] for c in configs}
    base_cost = _plain_cost(model_path, work, info, lr, batch_size, art_dirs)
    for r in range(repeats):
        for c in configs:
            if c == "torch":
                module, _ = zoo_module(model, info.input_shape, info.num_classes, seed)
                engine = TorchSession(module, hyper, lr)
                algs = []
            else:
                engine = TrainingSession(art_dirs[c], ExecConfig(threads=threads), lr=lr)
                algs = algorithms_for(engine.artifacts)
            tr = Trainer(engine, ds, None, epochs, batch_size, seed, algs, progress=progress, name=c, checkpoints=False)
            with PeakRSS() as mem:
                s = tr.run()
            s["peak_rss_mb"] = mem.peak_mb
            s.update(_reductions(s["history"], base_cost))
            results[c].append(s)
            del engine, tr
    report = summarise(results, target, ds, batch_size)
    report.update(
        {
            "model": model if model in ZOO else Path(model).name,
            "data": data.split(":")[0],
            "epochs": epochs,
            "batch_size": batch_size,
            "seed": seed,
            "lr": lr,
            "repeats": repeats,
            "train_images": int(len(ds.x_train)),
            "test_images": int(len(ds.x_test)),
            "machine": machine_info(),
            "date": time.strftime("%Y-%m-%d"),
        }
    )
    atomic_write_text(out / "bench.json", json.dumps(report, indent=1))
    atomic_write_text(out / "bench.md", markdown(report))
    plot_bench(results, out / "accuracy_vs_time.png", report)
    plot_controllers(results, out / "controllers.png", report)
    return report


class PeakRSS:
    """Peak resident set size of this process while the block runs (sampled every 20 ms from
    /proc; the process-wide peak of getrusage never goes down between configurations)."""

    def __enter__(self):

        self.peak_mb = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.02):
            self.peak_mb = max(self.peak_mb, self._rss())

    @staticmethod
    def _rss() -> float:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError):
            return 0.0

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak_mb = max(self.peak_mb, self._rss())
        return False


def _plain_cost(model_path, work, info, lr, batch_size, art_dirs) -> dict:
    """Cost-model FLOPs and bytes per step of the plain ``ort`` artifacts (the reduction baseline)."""
    d = art_dirs.get("ort")
    if d is None:
        d = work / "ort_reference"
        api.compile(model_path, d, [], {}, lr=lr, batch_size=batch_size, force=True, info=info)
    art = load_artifacts(d)[0]
    c = graph_costs(training_graph(art), art.config.get("optimizer", "adamw"))["total"]
    return {"flops": c["flops"], "bytes": c["bytes"]}


def _reductions(history: list[dict], base: dict) -> dict:
    """Operation and bandwidth reduction of a run against the plain artifacts, over the steps run."""
    if not history or "flops_per_step" not in history[0]:
        return {}
    steps = sum(m["steps"] for m in history)
    ops = sum(m["steps"] * (m["flops_per_step"] - m.get("reuse_flops_saved_per_step", 0.0)) for m in history)
    by = sum(m["steps"] * m["bytes_per_step"] for m in history)
    return {"op_reduction": 1 - ops / (steps * base["flops"]), "bandwidth_reduction": 1 - by / (steps * base["bytes"])}


def summarise(results: dict, target_spec: str, ds, batch_size: int) -> dict:
    med = statistics.median
    rows = {}
    for c, runs in results.items():
        h0 = runs[0]["history"]
        per_epoch = [m["train_seconds"] for s in runs for m in s["history"]]
        steps = h0[0]["steps"] if h0 else 1
        rows[c] = {
            "epoch_seconds": med(per_epoch),
            "ms_per_step": 1000 * med(per_epoch) / steps,
            "final_test_acc": med([s["final_test_acc"] for s in runs]),
            "best_test_acc": med([s["best_test_acc"] for s in runs]),
            "train_time": med([s["train_time"] for s in runs]),
            "decisions": runs[0]["decisions"],
            "histories": [s["history"] for s in runs],
            "controllers": runs[0].get("controllers", {}),
            "peak_rss_mb": med([s.get("peak_rss_mb", 0.0) for s in runs]),
        }
        if "op_reduction" in runs[0]:
            rows[c]["op_reduction"] = med([s["op_reduction"] for s in runs])
            rows[c]["bandwidth_reduction"] = med([s["bandwidth_reduction"] for s in runs])
    target = None
    if target_spec == "ort-best" and "ort" in rows:
        target = rows["ort"]["best_test_acc"]
    elif target_spec == "torch-best-0.2" and "torch" in rows:  # 0.2 points of accuracy
        target = rows["torch"]["best_test_acc"] - 0.002
    else:
        try:
            target = float(target_spec)
        except ValueError:
            target = None
    for c, r in rows.items():
        times = [_time_to(h, target) for h in r["histories"]]
        r["time_to_target"] = med(times) if target is not None and all(t is not None for t in times) else None
        for base in ("torch", "ort"):
            if base in rows:
                r[f"epoch_ratio_vs_{base}"] = r["epoch_seconds"] / rows[base]["epoch_seconds"]
                r[f"time_to_target_ratio_vs_{base}"] = None
        for base in ("torch", "ort"):
            if base in rows and r["time_to_target"] is not None:
                tb = [_time_to(h, target) for h in rows[base]["histories"]]
                if all(t is not None for t in tb):
                    r[f"time_to_target_ratio_vs_{base}"] = r["time_to_target"] / med(tb)
    return {"target_acc": target, "target_rule": target_spec, "configs": rows}


def _f(x, fmt="{:.3f}"):
    return "—" if x is None else fmt.format(x)


def markdown(rep: dict) -> str:
    lines = [
        f"# accelc bench — {rep['model']} on {rep['data']}",
        "",
        f"{rep['epochs']} epochs, batch {rep['batch_size']}, lr {rep['lr']}, seed {rep['seed']}, "
        f"{rep['train_images']} training / {rep['test_images']} test images, repeats {rep['repeats']} "
        f"(medians). Machine: {rep['machine']['platform']}, {rep['machine']['cpus']} CPUs, "
        f"ORT {rep['machine']['onnxruntime']}, torch {rep['machine']['torch']}. Date {rep['date']}.",
        "",
        f"Target accuracy: {_f(rep['target_acc'], '{:.4f}')} ({rep['target_rule']}). Times are training "
        f"seconds (evaluation excluded).",
        "",
        "| config | s/epoch (median) | ms/step | training time (s) | ×torch (epoch) | ×ort (epoch) "
        "| time to target (s) | ×torch (target) | ×ort (target) | final acc | best acc | ops −% | bytes −% "
        "| peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, r in rep["configs"].items():
        lines.append(
            f"| {c} | {r['epoch_seconds']:.2f} | {r['ms_per_step']:.1f} | {r['train_time']:.1f} "
            f"| {_f(r.get('epoch_ratio_vs_torch'), '{:.2f}')} "
            f"| {_f(r.get('epoch_ratio_vs_ort'), '{:.2f}')} | {_f(r['time_to_target'], '{:.1f}')} "
            f"| {_f(r.get('time_to_target_ratio_vs_torch'), '{:.2f}')} | {_f(r.get('time_to_target_ratio_vs_ort'), '{:.2f}')} "
            f"| {r['final_test_acc']:.4f} | {r['best_test_acc']:.4f} "
            f"| {_f(r.get('op_reduction'), '{:.1%}')} | {_f(r.get('bandwidth_reduction'), '{:.1%}')} "
            f"| {r.get('peak_rss_mb', 0):.0f} |"
        )
    dec = [(c, d) for c, r in rep["configs"].items() for d in r.get("decisions", [])]
    if dec:
        lines += ["", "Controller decisions (first run):", ""]
        lines += [f"- {c}, epoch {d['epoch']}: {d['action']}: {d['why']}" for c, d in dec]
    return "\n".join(lines) + "\n"


def plot_bench(results: dict, path: Path, rep: dict) -> None:
    import matplotlib  # heavy: loaded when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c, runs in results.items():
        h = runs[0]["history"]
        ax.plot([0] + [m["train_time"] for m in h], [None] + [m["test_acc"] for m in h], "o-", label=c)
    if rep.get("target_acc"):
        ax.axhline(rep["target_acc"], color="grey", ls=":", label="target")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{rep['model']} on {rep['data']}")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def plot_controllers(results: dict, path: Path, rep: dict) -> None:
    """Three panels over epochs: skipped layers (timeline), remain ratio per reused layer, and the
    resolution stage (input height), for every configuration that has the controller."""
    import matplotlib  # heavy: loaded when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    layers_seen: list = []
    for c, runs in results.items():
        h = runs[0]["history"]
        ep = [m["epoch"] for m in h]
        if any("skip" in m for m in h):
            for m in h:
                for layer in m.get("skip", {}).get("skipped", []):
                    if layer not in layers_seen:
                        layers_seen.append(layer)
            pts = [(m["epoch"], layers_seen.index(layer)) for m in h for layer in m.get("skip", {}).get("skipped", [])]
            ax[0].scatter([p[0] for p in pts], [p[1] for p in pts], marker="s", s=60, label=c)
        if any("reuse" in m for m in h):
            names = sorted({k for m in h for k in m.get("reuse", {})})
            for k in names:
                ax[1].plot(ep, [m.get("reuse", {}).get(k, {}).get("remain_ratio") for m in h], "o-", label=f"{c}: {k}")
        ax[2].step(ep, [m["input_hw"][0] for m in h], where="mid", label=c)
    ax[0].set_yticks(range(len(layers_seen)), layers_seen)
    ax[0].set_title("skipped layers (from the epoch after the decision)")
    ax[1].set_title("remain ratio (clusters / rows) per reused layer")
    ax[1].set_ylim(0, 1.05)
    ax[2].set_title("resolution stage (input height)")
    for a in ax:
        a.set_xlabel("epoch")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.suptitle(f"{rep['model']} on {rep['data']}: what the controllers did")
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
