"""The run of ``accelc bench``: :func:`run_bench` checks its settings into a :class:`BenchSpec`, then
compiles every ORT configuration per seed, trains every configuration in turn (interleaved per seed
and repeat, peak memory sampled while each trains) and writes bench.json, bench.md and the plots
into its output folder, atomically."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .. import api
from ..compiler import checks
from ..compiler.artifact_dir import load_artifacts
from ..compiler.artifacts import ADAMW_DEFAULTS, optimizer_hyperparameters
from ..compiler.cost import graph_costs
from ..compiler.errors import AccelcError, InvalidValue
from ..compiler.fileio import atomic_dir, atomic_write_text
from ..compiler.graph import training_graph
from ..compiler.model import load_model
from ..compiler.resources import check_threads
from ..runtime.algorithm import algorithms_for
from ..runtime.config import ExecConfig
from ..runtime.data import as_source, in_memory_data, load_data
from ..runtime.spec import TrainSpec
from ..runtime.train import RunSetup, Trainer, machine_info
from .configs import parse_configs
from .plots import plot_bench, plot_controllers, plot_time_to_target
from .report import markdown
from .spec import BenchSettings, BenchSpec, check_keywords, keyword_signature
from .summary import _full_size, _reductions, parse_seeds, parse_target, summarise

if TYPE_CHECKING:
    from typing_extensions import Unpack

# torch eager uses the optimizer the artifacts describe; these are ORT's AdamW defaults (no artifacts)
DEFAULT_HYPER = {"kind": "adamw", **{k: v for k, v in ADAMW_DEFAULTS.items() if k != "lr"}}


def run_bench(model: str, data, epochs: int, configs, out_dir, **settings: Unpack[BenchSettings]) -> dict:
    """Run ``configs`` side by side; everything is written to ``out_dir`` atomically (a failed or
    interrupted benchmark leaves no folder; an existing one is replaced only with ``force``).
    ``configs``: names (a comma-separated string or a list: torch, torch-amp, torch-cl, ort, ort-noopt,
    ort+PASS[+PASS], ort+all), or what :func:`parse_configs` returns (with a config file's named
    configurations); ``pass_options``: {pass: {option: value}} for every configuration that runs
    the pass (the compile flags). The other keywords (:class:`BenchSettings`, defaults in
    :class:`BenchSpec`): batch_size=64, seed=0, lr, repeats=1, train_limit, test_limit,
    target="ort-best", progress=True, threads, input_shape, force=False, seeds, val_split="auto",
    stop_at_target=False.

    The time-to-accuracy protocol: ``seeds`` (a list, default ``[seed]``) each give the initial
    weights (zoo models) and the data order; every configuration runs once per seed (and repeat),
    interleaved. ``val_split`` holds out the last training images (``auto``: min(5000, 10%)) and
    the target is judged on it; the test split only reports (test accuracy at the target, final).
    ``stop_at_target``: a configuration stops at the end of the epoch that reached a fixed target."""
    check_keywords("run_bench", settings, BenchSettings)
    spec = _checked(BenchSpec(model, data, epochs, configs, out_dir, **settings))
    protect = [] if spec.model in _zoo_names() else [spec.model]
    with atomic_dir(spec.out_dir, force=spec.force, kind="bench", protect=protect) as out:
        return _Bench(spec, Path(out)).run()


keyword_signature(run_bench, BenchSpec, BenchSettings)


def _checked(spec: BenchSpec) -> BenchSpec:
    """``spec`` validated (the messages the CLI prints) and normalised: configurations parsed, data
    arrays wrapped, seeds and the validation split parsed."""
    configs = spec.configs
    if not isinstance(configs, dict):
        if isinstance(configs, (list, tuple)):
            configs = ",".join(str(c) for c in configs)
        configs = parse_configs(configs, spec.pass_options)
    elif spec.pass_options:
        raise AccelcError("pass_options go to parse_configs when configs are already parsed")
    data = spec.data if isinstance(spec.data, str) else in_memory_data(spec.data)  # arrays or torch datasets
    api.check_train_args(
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        seed=spec.seed,
        lr=spec.lr,
        lr_schedule=spec.lr_schedule,
        threads=spec.threads,
        train_limit=spec.train_limit,
        test_limit=spec.test_limit,
        device="cpu",
        data=data,
    )
    checks.positive_int("--repeats", spec.repeats, 1000)
    seeds = parse_seeds(spec.seeds, spec.seed)
    fixed = parse_target(spec.target, configs)
    if spec.stop_at_target and fixed is None:
        raise InvalidValue("--stop-at-target needs a fixed --target accuracy (a number), not a rule")
    from ..runtime.data import parse_val_split

    val_split = parse_val_split(spec.val_split)
    check_threads(spec.threads)
    return replace(spec, configs=configs, data=data, seeds=seeds, val_split=val_split)


def _zoo_names():
    from ..zoo import ZOO  # heavy: torch

    return ZOO


def bf16_capable() -> tuple[bool, str]:
    """Whether this machine runs torch's bf16 autocast natively (CUDA, or a CPU with AVX512_BF16 or
    AMX that oneDNN uses); without it bf16 is emulated, tens of times slower than float32."""
    import torch  # heavy

    try:
        ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        ok = False
    cap = torch.backends.cpu.get_cpu_capability()
    return ok, f"oneDNN bf16 {'supported' if ok else 'not supported'} (torch CPU capability {cap})"


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


class _Bench:
    """One benchmark while it runs in its output folder: the model and compiled artifacts per seed,
    the data, and the runs of every configuration."""

    def __init__(self, spec: BenchSpec, out: Path):
        from ..zoo import ZOO  # heavy: torch, loaded when a benchmark runs

        self.spec = spec
        self.out = out
        self.work = out / "artifacts"
        self.work.mkdir(exist_ok=True)
        self.zoo = spec.model in ZOO
        self.not_run = _not_runnable(spec.configs)
        self.runnable = {c: s for c, s in spec.configs.items() if c not in self.not_run}
        self.eager = [c for c, s in self.runnable.items() if s["engine"] != "ort"]
        self.fixed = parse_target(spec.target, spec.configs)  # a fixed target accuracy, or None for a rule
        self.art_dirs: dict[int, dict[str, Path]] = {}

    def model_for(self, s: int) -> Path:
        """The ONNX model of seed ``s``: a zoo model's initial weights come from the seed."""
        from ..zoo import export_zoo  # heavy: torch

        if not self.zoo:
            return Path(self.spec.model)
        path = self.work / f"seed{s}" / f"{self.spec.model}.onnx"
        path.parent.mkdir(exist_ok=True)
        export_zoo(self.spec.model, path, input_shape=self.spec.input_shape, seed=s)
        return path

    def compile_all(self, path: Path, s: int) -> dict[str, Path]:
        """Every ORT configuration compiled from ``path`` (the model of seed ``s``)."""
        dirs = {}
        for c, cfg in self.runnable.items():
            if cfg["engine"] != "ort":
                continue
            d = self.work / (f"seed{s}" if self.zoo else "all") / re.sub(r"[^\w.-]+", "_", c).strip("_")
            d.parent.mkdir(exist_ok=True)
            api.compile(
                path, d, cfg["passes"], cfg["options"], lr=self.spec.lr, batch_size=self.spec.batch_size,
                force=True, info=load_model(path), opt=cfg["opt"],
            )  # fmt: skip
            dirs[c] = d
        return dirs

    def torch_module(self, s: int):
        """A fresh torch module of the model with seed ``s``'s weights (a user's ONNX model: converted
        afresh each run, with the model's own initial weights)."""
        if self.zoo:
            from ..zoo import zoo_module  # heavy: torch

            return zoo_module(self.spec.model, self.info.input_shape, self.info.num_classes, s)[0]
        from ..torch_baseline import torch_module_for  # heavy: onnx2torch

        return torch_module_for(self.first, self.info)

    def prepare(self) -> None:
        """The first seed's model and artifacts, the data, the optimizer torch eager uses and the
        plain ORT cost per step (the reduction baseline)."""
        import torch  # heavy: loaded when a benchmark runs

        spec = self.spec
        self.first = self.model_for(spec.first_seed)
        self.info = load_model(self.first)
        if self.eager and not self.zoo:  # the user's ONNX model in torch (onnx2torch): refused here when impossible
            from ..torch_baseline import torch_module_for  # heavy: onnx2torch

            torch_module_for(self.first, self.info)
        self.ds = load_data(
            spec.data, self.info.input_shape, self.info.num_classes, spec.train_limit, spec.test_limit,
            val_split=spec.val_split,
        )  # fmt: skip
        self.art_dirs[spec.first_seed] = self.compile_all(self.first, spec.first_seed)
        if spec.threads:
            torch.set_num_threads(spec.threads)
        some = next(iter(self.art_dirs[spec.first_seed].values()), None)
        self.hyper = optimizer_hyperparameters(load_artifacts(some)[0].optimizer) if some else DEFAULT_HYPER
        self.base_cost = _plain_cost(
            self.first, self.work, self.info, spec.lr, spec.batch_size, self.art_dirs[spec.first_seed]
        )

    def baseline_check(self) -> dict | None:
        """torch's module computes the model: the same loss as ORT on the first batch, same weights."""
        if not self.eager:
            return None
        from ..runtime.session import TrainingSession  # heavy
        from ..torch_baseline import check_same_loss

        spec = self.spec
        ref = TrainingSession(
            self.art_dirs[spec.first_seed].get("ort") or self.work / "ort_reference",
            ExecConfig(threads=spec.threads),
            lr=spec.lr,
        )
        _, x0, y0 = next(self.ds.batches(0, spec.batch_size, spec.first_seed))
        return check_same_loss(self.torch_module(spec.first_seed), ref, x0, y0)

    def engine(self, c: str, s: int):
        """The engine configuration ``c`` trains with on seed ``s``, and its algorithms."""
        kind = self.runnable[c]["engine"]
        if kind != "ort":
            import torch  # heavy

            from ..runtime.torch_engine import TorchSession  # heavy

            autocast = torch.bfloat16 if kind == "torch-amp" else None
            module, cl = self.torch_module(s), kind == "torch-cl"
            return TorchSession(module, self.hyper, self.spec.lr, autocast_dtype=autocast, channels_last=cl), []
        from ..runtime.session import TrainingSession  # heavy

        engine = TrainingSession(self.art_dirs[s][c], ExecConfig(threads=self.spec.threads), lr=self.spec.lr, lazy=True)
        return engine, algorithms_for(engine.artifacts)

    def run_one(self, c: str, s: int) -> dict:
        """Configuration ``c`` trained once on seed ``s``: its summary, peak memory and reductions."""
        spec = self.spec
        engine, algs = self.engine(c, s)
        name = c if len(spec.seeds) == 1 else f"{c} seed {s}"
        run = TrainSpec(
            run_dir=None,
            epochs=spec.epochs,
            batch_size=spec.batch_size,
            seed=s,
            progress=spec.progress,
            lr_schedule=spec.lr_schedule,
        )
        tr = Trainer(run, engine, self.ds, algorithms=algs, setup=RunSetup(name=name, checkpoints=False))
        if spec.stop_at_target:
            fixed = self.fixed
            key = "val_acc" if self.ds.x_val is not None else "test_acc"
            full = list(self.ds.shape[1:])
            tr.stop_when = lambda m, key=key, full=full: m[key] >= fixed - 1e-9 and _full_size(m, full)
        with PeakRSS() as mem:
            summary = tr.run()
        summary["peak_rss_mb"] = mem.peak_mb
        summary["seed"] = s
        summary.update(_reductions(summary["history"], self.base_cost))
        return summary

    def run(self) -> dict:
        """Every configuration per seed and repeat, then the report and its files."""
        spec = self.spec
        self.prepare()
        results: dict[str, list[dict]] = {c: [] for c in self.runnable}
        baseline_check = self.baseline_check()
        for s in spec.seeds:  # per seed, every configuration in turn (interleaved: drift hits all alike)
            if s not in self.art_dirs:
                self.art_dirs[s] = (
                    self.compile_all(self.model_for(s), s) if self.zoo else self.art_dirs[spec.first_seed]
                )
            for _ in range(spec.repeats):
                for c in self.runnable:
                    results[c].append(self.run_one(c, s))
        report = self.report(results, baseline_check)
        self.write(results, report)
        return report

    def report(self, results: dict, baseline_check: dict | None) -> dict:
        """What bench.json holds: the summary, what did not run, and the settings and machine."""
        spec, ds = self.spec, self.ds
        report = summarise(results, spec.target, ds, spec.batch_size, full_hw=list(ds.shape[1:]))
        report["not_run"] = self.not_run
        if baseline_check is not None:
            report["torch_baseline_check"] = baseline_check
        report.update(
            {
                "model": spec.model if self.zoo else Path(spec.model).name,
                "data": as_source(spec.data).name,
                "epochs": spec.epochs,
                "batch_size": spec.batch_size,
                "seed": spec.first_seed,
                "seeds": spec.seeds,
                "lr": spec.lr,
                "lr_schedule": spec.lr_schedule,
                "repeats": spec.repeats,
                "input_shape": list(self.info.input_shape),
                "train_images": int(len(ds.x_train)),
                "val_images": 0 if ds.x_val is None else int(len(ds.x_val)),
                "test_images": int(len(ds.x_test)),
                "decided_on": "validation" if ds.x_val is not None else "test (no validation split)",
                "stop_at_target": bool(spec.stop_at_target),
                "machine": machine_info(),
                "date": time.strftime("%Y-%m-%d"),
            }
        )
        return report

    def write(self, results: dict, report: dict) -> None:
        out = self.out
        atomic_write_text(out / "bench.json", json.dumps(report, indent=1))
        atomic_write_text(out / "bench.md", markdown(report))
        plot_bench(results, out / "accuracy_vs_time.png", report)
        plot_time_to_target(out / "time_to_target.png", report)
        plot_controllers(results, out / "controllers.png", report)


def _not_runnable(configs: dict) -> dict[str, str]:
    """Configurations this machine cannot run, and why: emulated bf16 runs for hours, so torch-amp
    is reported as not run instead."""
    amp = [c for c, cfg in configs.items() if cfg["engine"] == "torch-amp"]
    if not amp:
        return {}
    ok, why = bf16_capable()
    return {} if ok else {c: f"this machine has no bf16 arithmetic: {why}" for c in amp}
