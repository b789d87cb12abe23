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
import stat
import statistics
import threading
import time
from pathlib import Path

from . import api
from .compiler import checks
from .compiler.artifact_dir import load_artifacts
from .compiler.artifacts import DEFAULT_LR, optimizer_hyperparameters
from .compiler.cost import graph_costs
from .compiler.errors import AccelcError, InvalidValue, show
from .compiler.fileio import atomic_dir, atomic_write_text
from .compiler.graph import training_graph
from .compiler.method import installed
from .compiler.model import load_model
from .compiler.pass_api import check_pass_options, parse_pass_list, registered
from .compiler.resources import check_threads
from .runtime.algorithm import algorithms_for
from .runtime.config import ExecConfig
from .runtime.data import as_source, in_memory_data, load_data
from .runtime.spec import TrainSpec
from .runtime.train import Trainer, machine_info

BASELINES = ("torch", "torch-amp", "ort", "ort-noopt")  # torch-amp: torch eager under bf16 autocast
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
CONFIG_FILE_SCHEMA = {
    "type": "object",
    "required": ["configs"],
    "additionalProperties": False,
    "properties": {
        "configs": {
            "type": "array",
            "maxItems": 64,
            "items": {
                "oneOf": [
                    {"type": "string", "maxLength": 200},
                    {
                        "type": "object",
                        "required": ["name", "passes"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "maxLength": 64},
                            "passes": {"type": "array", "maxItems": 16, "items": {"type": "string", "maxLength": 64}},
                            "options": {"type": "object", "additionalProperties": {"type": "object"}},
                            "opt": {"type": "boolean"},
                        },
                    },
                ]
            },
        }
    },
}


def parse_configs(text=None, pass_options: dict | None = None, config_file=None) -> dict[str, dict]:
    """The configurations to run, by name: ``text`` lists torch, torch-amp, ort, ort-noopt and
    ort+PASS[+PASS...] (ort+all: every pass), comma-separated; ``pass_options`` ({pass: {option:
    value}}, the compile flags ``--skip-tau 1.5`` ...) apply to every configuration that runs the
    pass; ``config_file`` (JSON ``{"configs": [NAME | {"name", "passes", "options", "opt"}]}``) adds
    named configurations with options of their own (e.g. two reuse strategies side by side).
    Returns name -> {"engine": torch|torch-amp|ort, "passes", "options", "opt"}."""
    items: list = []
    if text is not None:
        if not isinstance(text, str):
            raise AccelcError(f"--configs must be a comma-separated string, got {type(text).__name__}")
        if "[" in text:
            raise AccelcError(
                "pass options go in the pass flags (e.g. --skip-tau 1.5, as compile takes them) or in a "
                f"--config-file, not in brackets: {show(text, 80)}"
            )
        items += [c.strip() for c in text.split(",") if c.strip()]
    if config_file is not None:
        items += _read_config_file(config_file)
    out: dict[str, dict] = {}
    shared = dict(pass_options or {})
    used = set()
    for item in items:
        if isinstance(item, str):
            name, spec = item, _named(item)
            given = {p: dict(shared[p]) for p in spec["passes"] if p in shared}
            spec["options"] = given
        else:
            name = item["name"]
            if not NAME.fullmatch(name):
                raise AccelcError(f"configuration name {show(name, 80)}: use letters, digits and _ . + -")
            passes = parse_pass_list(",".join(item["passes"]) if item["passes"] else "none")
            opts = {p: dict(shared.get(p, {}), **dict(item.get("options", {}).get(p, {}))) for p in passes}
            stray = set(item.get("options", {})) - set(passes)
            if stray:
                raise AccelcError(f"configuration {show(name)}: options for pass(es) it does not run: {sorted(stray)}")
            spec = {"engine": "ort", "passes": passes, "options": {p: o for p, o in opts.items() if o}}
            spec["opt"] = bool(item.get("opt", True))
            _check_reserved(name, spec, any(item.get("options", {}).values()))
        check_pass_options(spec["passes"], spec["options"], defaults=spec.get("opt", True))
        if name in out:
            raise AccelcError(f"configuration {show(name)} is listed twice")
        used |= set(spec["passes"])
        out[name] = spec
    if not out:
        raise AccelcError("--configs is empty")
    unused = sorted(set(shared) - used - {n for n, c in registered().items() if c.default})
    if unused:
        cls = registered()[unused[0]]
        flag = cls.flag(next(iter(shared[unused[0]]))) if shared[unused[0]] else unused[0]
        raise AccelcError(f"{flag} given but no configuration runs pass '{unused[0]}'")
    return out


def _meaning(spec: dict) -> str:
    if spec["engine"] != "ort":
        return {"torch": "torch eager", "torch-amp": "torch eager under bf16 autocast"}.get(
            spec["engine"], spec["engine"]
        )
    opt = "" if spec.get("opt", True) else " without the opt pass"
    return f"ORT with passes {'+'.join(spec['passes'])}{opt}" if spec["passes"] else f"plain ORT{opt}"


def _check_reserved(name: str, spec: dict, own_options: bool) -> None:
    """A --config-file entry may take a name --configs gives a meaning (torch, torch-amp, ort,
    ort-noopt, ort+PASS...) only to mean exactly that: the report compares against the rows of
    those names (ratios, the ort-best target), so an entry named 'ort' that ran skip would make
    every comparison silently wrong."""
    if name not in BASELINES and not name.startswith("ort+"):
        return
    try:
        meant = _named(name)
    except AccelcError:
        meant = None
    if (
        meant is not None
        and not own_options
        and (meant["engine"], meant["passes"], bool(meant["opt"])) == (spec["engine"], spec["passes"], spec["opt"])
    ):
        return
    means = _meaning(meant) if meant is not None else "the passes named after 'ort+'"
    raise AccelcError(
        f"configuration name '{show(name)}' is reserved for {means}"
        + (" (pass options: the pass flags)" if meant is not None and own_options else "")
        + f"; this entry runs {_meaning(spec)}{' with options of its own' if own_options else ''}: give it another name"
    )


def _named(c: str) -> dict:
    """A configuration given by name (see :func:`parse_configs`)."""
    if c in ("torch", "torch-amp"):
        return {"engine": c, "passes": [], "options": {}, "opt": False}
    if c in ("ort", "ort-noopt"):
        return {"engine": "ort", "passes": [], "options": {}, "opt": c == "ort"}
    m = re.fullmatch(r"ort\+([\w+]+)", c)
    if not m:
        raise AccelcError(
            f"unknown configuration {show(c, 80)}; use {', '.join(BASELINES)}, ort+PASS[+PASS...] or ort+all "
            "(pass options: the pass flags or --config-file)"
        )
    every = [n for n, cls in registered().items() if not cls.default]
    names = parse_pass_list(every if m.group(1) == "all" else m.group(1).replace("+", ","))
    return {"engine": "ort", "passes": names, "options": {}, "opt": True}


def config_passes(c: str) -> tuple[list[str], dict]:
    """A named configuration's passes: ('ort+skip') -> (['skip'], {})."""
    spec = _named(c)
    return spec["passes"], spec["options"]


MAX_CONFIG_FILE = 1 << 20  # bytes of a --config-file (64 configurations take a few KB)


def _not_regular(path, mode: int) -> AccelcError:
    what = "a folder" if stat.S_ISDIR(mode) else "a FIFO, device or socket"
    return AccelcError(f"--config-file '{show(path)}' is not a regular file ({what}); give a JSON file")


def _read_config_bytes(path) -> bytes:
    """The bytes of a --config-file: a regular file of at most MAX_CONFIG_FILE bytes. Anything else
    is refused before it is opened (a FIFO would block the open forever, a device never end), and
    again on the open file (the path may have been swapped in between)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise AccelcError(f"--config-file '{show(path)}': {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise _not_regular(path, st.st_mode)
            if st.st_size > MAX_CONFIG_FILE:
                raise AccelcError(f"--config-file '{show(path)}' is larger than 1 MiB")
            os.set_blocking(fh.fileno(), True)
            raw = fh.read(MAX_CONFIG_FILE + 1)  # bounded even if it grows while read
    except OSError as e:
        raise AccelcError(f"--config-file '{show(path)}': {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_FILE:
        raise AccelcError(f"--config-file '{show(path)}' is larger than 1 MiB")
    return raw


def _read_config_file(path) -> list:
    import jsonschema

    checks.path_like("--config-file", path)
    raw = _read_config_bytes(path)
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AccelcError(f"--config-file '{show(path)}' is not valid JSON ({show(str(e), 120)})") from None
    try:
        jsonschema.validate(doc, CONFIG_FILE_SCHEMA)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "the top level"
        raise AccelcError(f"--config-file '{show(path)}': at {show(where)}: {show(e.message, 200)}") from None
    return doc["configs"]


def _acc_key(history: list[dict]) -> str:
    """The accuracy that decides: validation when the run has a validation split, else test."""
    return "val_acc" if history and "val_acc" in history[0] else "test_acc"


def _full_size(m: dict, full_hw) -> bool:
    """An epoch of the model at its full input size (a low-resolution stage is another network on
    other images: its accuracy does not count towards the target)."""
    return full_hw is None or m.get("input_hw") is None or list(m["input_hw"]) == list(full_hw)


def _at_target(history: list[dict], target: float | None, full_hw=None) -> dict | None:
    """Where a run first reached ``target`` on its deciding split at full size: the epoch, its
    training time, the evaluation time spent up to then, and the *test* accuracy there (what the
    protocol reports)."""
    if target is None:
        return None
    key = _acc_key(history)
    eval_s = 0.0
    for m in history:
        eval_s += m.get("eval_seconds", 0.0) + m.get("val_seconds", 0.0)
        if m[key] >= target - 1e-9 and _full_size(m, full_hw):
            return {"epoch": m["epoch"], "train_time": m["train_time"], "eval_time": eval_s, "test_acc": m["test_acc"]}
    return None


def run_bench(
    model: str,
    data: str,
    epochs: int,
    configs,
    out_dir,
    batch_size: int = 64,
    seed: int = 0,
    lr: float = DEFAULT_LR,
    repeats: int = 1,
    train_limit=None,
    test_limit=None,
    target: str = "ort-best",
    progress: bool = True,
    threads: int | None = None,
    input_shape: tuple | None = None,
    force: bool = False,
    pass_options: dict | None = None,
    seeds=None,
    val_split="auto",
    stop_at_target: bool = False,
) -> dict:
    """Run ``configs`` side by side; everything is written to ``out_dir`` atomically (a failed or
    interrupted benchmark leaves no folder; an existing one is replaced only with ``force``).
    ``configs``: names (a comma-separated string or a list: torch, torch-amp, ort, ort-noopt,
    ort+PASS[+PASS], ort+all), or what :func:`parse_configs` returns (with a config file's named
    configurations); ``pass_options``: {pass: {option: value}} for every configuration that runs
    the pass (the compile flags).

    The time-to-accuracy protocol: ``seeds`` (a list, default ``[seed]``) each give the initial
    weights (zoo models) and the data order; every configuration runs once per seed (and repeat),
    interleaved. ``val_split`` holds out the last training images (``auto``: min(5000, 10%)) and
    the target is judged on it; the test split only reports (test accuracy at the target, final).
    ``stop_at_target``: a configuration stops at the end of the epoch that reached a fixed target."""
    if not isinstance(configs, dict):
        if isinstance(configs, (list, tuple)):
            configs = ",".join(str(c) for c in configs)
        configs = parse_configs(configs, pass_options)
    elif pass_options:
        raise AccelcError("pass_options go to parse_configs when configs are already parsed")
    if not isinstance(data, str):  # arrays or torch datasets given in Python
        data = in_memory_data(data)
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
    seeds = parse_seeds(seeds, seed)
    fixed = parse_target(target, configs)
    if stop_at_target and fixed is None:
        raise InvalidValue("--stop-at-target needs a fixed --target accuracy (a number), not a rule")
    from .runtime.data import parse_val_split

    val_split = parse_val_split(val_split)
    check_threads(threads)
    protect = [] if model in _zoo_names() else [model]
    with atomic_dir(out_dir, force=force, kind="bench", protect=protect) as out:
        return _run_bench(
            model, data, epochs, configs, out, batch_size, seeds, lr, repeats, train_limit, test_limit, target,
            progress, threads, input_shape, val_split, stop_at_target,
        )  # fmt: skip


def _zoo_names():
    from .zoo import ZOO  # heavy: torch

    return ZOO


def parse_seeds(seeds, seed: int = 0) -> list[int]:
    """``--seeds 0,1,2`` (a string or a list of integers); default: the one ``--seed``."""
    if seeds is None:
        return [checks.seed("--seed", seed)]
    items = seeds.split(",") if isinstance(seeds, str) else seeds
    if not isinstance(items, (list, tuple)) or not items or len(items) > 100:
        raise InvalidValue(f"--seeds must be a comma list of 1 to 100 seeds, got '{show(seeds)}'")
    out = []
    for v in items:
        try:
            v = int(v.strip()) if isinstance(v, str) else v
        except ValueError:
            raise InvalidValue(f"--seeds must be integers, got '{show(seeds)}'") from None
        out.append(checks.seed("--seeds", v))
    if len(set(out)) != len(out):
        raise InvalidValue(f"--seeds has a seed twice: '{show(seeds)}'")
    return out


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
    model, data, epochs, configs, out_dir, batch_size, seeds, lr, repeats, train_limit, test_limit, target, progress,
    threads, input_shape, val_split="auto", stop_at_target=False,
) -> dict:  # fmt: skip
    import torch  # heavy: loaded when a benchmark runs

    from .runtime.session import TrainingSession  # heavy
    from .runtime.torch_engine import TorchSession  # heavy
    from .zoo import ZOO, export_zoo, zoo_module  # heavy: torch, loaded when a benchmark runs

    out = Path(out_dir)
    work = out / "artifacts"
    work.mkdir(exist_ok=True)
    zoo = model in ZOO
    not_run: dict[str, str] = {}
    amp = [c for c, spec in configs.items() if spec["engine"] == "torch-amp"]
    if amp:
        ok, why = bf16_capable()
        if not ok:  # emulated bf16 runs for hours: say so instead
            not_run.update({c: f"this machine has no bf16 arithmetic: {why}" for c in amp})
    runnable = {c: spec for c, spec in configs.items() if c not in not_run}

    def model_for(s: int) -> Path:  # a zoo model's initial weights come from the seed
        if not zoo:
            return Path(model)
        path = work / f"seed{s}" / f"{model}.onnx"
        path.parent.mkdir(exist_ok=True)
        export_zoo(model, path, input_shape=input_shape, seed=s)
        return path

    first = model_for(seeds[0])
    info = load_model(first)
    eager = [c for c, spec in runnable.items() if spec["engine"] != "ort"]
    if eager and not zoo:  # the user's ONNX model in torch (onnx2torch): refused here when impossible
        from .torch_baseline import torch_module_for  # heavy: onnx2torch

        torch_module_for(first, info)
    ds = load_data(data, info.input_shape, info.num_classes, train_limit, test_limit, val_split=val_split)

    def compile_all(path: Path, s: int) -> dict:
        dirs = {}
        for c, spec in runnable.items():
            if spec["engine"] != "ort":
                continue
            d = work / (f"seed{s}" if zoo else "all") / re.sub(r"[^\w.-]+", "_", c).strip("_")
            d.parent.mkdir(exist_ok=True)
            api.compile(
                path, d, spec["passes"], spec["options"], lr=lr, batch_size=batch_size, force=True,
                info=load_model(path), opt=spec["opt"],
            )  # fmt: skip
            dirs[c] = d
        return dirs

    art_dirs = {seeds[0]: compile_all(first, seeds[0])}
    if threads:
        torch.set_num_threads(threads)
    some = next(iter(art_dirs[seeds[0]].values()), None)
    # torch eager uses the optimizer the artifacts describe (ORT's AdamW defaults without artifacts)
    hyper = (
        optimizer_hyperparameters(load_artifacts(some)[0].optimizer)
        if some
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
    results: dict[str, list[dict]] = {c: [] for c in runnable}
    base_cost = _plain_cost(first, work, info, lr, batch_size, art_dirs[seeds[0]])
    baseline_check = None
    if eager:  # torch's module computes the model: the same loss as ORT on the first batch, same weights
        from .torch_baseline import check_same_loss, torch_module_for

        ref = TrainingSession(
            art_dirs[seeds[0]].get("ort") or work / "ort_reference", ExecConfig(threads=threads), lr=lr
        )
        _, x0, y0 = next(ds.batches(0, batch_size, seeds[0]))
        m0 = (
            zoo_module(model, info.input_shape, info.num_classes, seeds[0])[0] if zoo else torch_module_for(first, info)
        )
        baseline_check = check_same_loss(m0, ref, x0, y0)
        del ref, m0
    fixed = parse_target(target, configs)
    for s in seeds:  # per seed, every configuration in turn (interleaved: drift hits all alike)
        if s not in art_dirs:
            art_dirs[s] = compile_all(model_for(s), s) if zoo else art_dirs[seeds[0]]
        for _ in range(repeats):
            for c in runnable:
                engine_kind = runnable[c]["engine"]
                if engine_kind != "ort":
                    if zoo:
                        module, _ = zoo_module(model, info.input_shape, info.num_classes, s)
                    else:  # converted afresh each run: the ONNX model's own initial weights
                        module = torch_module_for(first, info)
                    autocast = torch.bfloat16 if engine_kind == "torch-amp" else None
                    engine = TorchSession(module, hyper, lr, autocast_dtype=autocast)
                    algs = []
                else:
                    engine = TrainingSession(art_dirs[s][c], ExecConfig(threads=threads), lr=lr, lazy=True)
                    algs = algorithms_for(engine.artifacts)
                name = c if len(seeds) == 1 else f"{c} seed {s}"
                run = TrainSpec(run_dir=None, epochs=epochs, batch_size=batch_size, seed=s, progress=progress)
                tr = Trainer(run, engine, ds, algorithms=algs, name=name, checkpoints=False)
                if stop_at_target:
                    key = "val_acc" if ds.x_val is not None else "test_acc"
                    full = list(ds.shape[1:])
                    tr.stop_when = lambda m, key=key, full=full: m[key] >= fixed - 1e-9 and _full_size(m, full)
                with PeakRSS() as mem:
                    summary = tr.run()
                summary["peak_rss_mb"] = mem.peak_mb
                summary["seed"] = s
                summary.update(_reductions(summary["history"], base_cost))
                results[c].append(summary)
                del engine, tr
    report = summarise(results, target, ds, batch_size, full_hw=list(ds.shape[1:]))
    report["not_run"] = not_run
    if baseline_check is not None:
        report["torch_baseline_check"] = baseline_check
    report.update(
        {
            "model": model if zoo else Path(model).name,
            "data": as_source(data).name,
            "epochs": epochs,
            "batch_size": batch_size,
            "seed": seeds[0],
            "seeds": seeds,
            "lr": lr,
            "repeats": repeats,
            "input_shape": list(info.input_shape),
            "train_images": int(len(ds.x_train)),
            "val_images": 0 if ds.x_val is None else int(len(ds.x_val)),
            "test_images": int(len(ds.x_test)),
            "decided_on": "validation" if ds.x_val is not None else "test (no validation split)",
            "stop_at_target": bool(stop_at_target),
            "machine": machine_info(),
            "date": time.strftime("%Y-%m-%d"),
        }
    )
    atomic_write_text(out / "bench.json", json.dumps(report, indent=1))
    atomic_write_text(out / "bench.md", markdown(report))
    plot_bench(results, out / "accuracy_vs_time.png", report)
    plot_time_to_target(out / "time_to_target.png", report)
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


BASES = ("torch", "torch-amp", "ort")  # the ratios every row carries


def summarise(results: dict, target_spec: str, ds, batch_size: int, full_hw=None) -> dict:
    """Per configuration over its runs (seeds × repeats): time to the target as median and
    min–max over the runs that reached it, how many did, the test accuracy where they did, the
    evaluation time spent until then, final test accuracy, epoch time and ratios against the
    baselines (ratios of the medians)."""
    med = statistics.median
    rows = {}
    for c, runs in results.items():
        h0 = runs[0]["history"]
        per_epoch = [m["train_seconds"] for s in runs for m in s["history"]]
        steps = h0[0]["steps"] if h0 else 1
        key = _acc_key(h0)
        finals = [s["final_test_acc"] for s in runs]
        rows[c] = {
            "runs": len(runs),
            "seeds": [s.get("seed") for s in runs],
            "epoch_seconds": med(per_epoch),
            "ms_per_step": 1000 * med(per_epoch) / steps,
            "final_test_acc": med(finals),
            "final_test_acc_range": [min(finals), max(finals)],
            "best_test_acc": med([s["best_test_acc"] for s in runs]),
            "best_deciding_acc": med([max(m[key] for m in s["history"]) for s in runs]),
            "train_time": med([s["train_time"] for s in runs]),
            # what the algorithms spent before the first step (counted in the training time)
            "setup_seconds": med([s.get("setup_seconds", 0.0) for s in runs]),
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
        target = rows["ort"]["best_deciding_acc"]
    elif target_spec == "torch-best-0.2" and "torch" in rows:  # 0.2 points of accuracy
        target = rows["torch"]["best_deciding_acc"] - 0.002
    else:
        try:
            target = float(target_spec)
        except ValueError:
            target = None
    for r in rows.values():
        hits = [_at_target(h, target, full_hw) for h in r["histories"]]
        got = [x for x in hits if x is not None]
        r["reached"] = len(got)
        r["at_target"] = hits
        r["time_to_target"] = med([x["train_time"] for x in got]) if got else None
        r["time_to_target_range"] = (
            [min(x["train_time"] for x in got), max(x["train_time"] for x in got)] if got else None
        )
        r["all_reached"] = len(got) == len(hits) and target is not None
        r["test_acc_at_target"] = med([x["test_acc"] for x in got]) if got else None
        r["eval_time_to_target"] = med([x["eval_time"] for x in got]) if got else None
        r["epochs_to_target"] = med([x["epoch"] for x in got]) if got else None
    for r in rows.values():
        for base in BASES:
            if base not in rows:
                continue
            r[f"epoch_ratio_vs_{base}"] = r["epoch_seconds"] / rows[base]["epoch_seconds"]
            # a ratio of medians only where both reached the target in every run: a median over the
            # seeds that got there would compare a configuration's lucky seeds with all of the baseline's
            tb = rows[base]["time_to_target"]
            both = r["all_reached"] and rows[base]["all_reached"]
            r[f"time_to_target_ratio_vs_{base}"] = r["time_to_target"] / tb if both and tb else None
    return {"target_acc": target, "target_rule": target_spec, "configs": rows}


def _f(x, fmt="{:.3f}"):
    return "—" if x is None else fmt.format(x)


def _range(r, fmt="{:.1f}"):
    return "—" if not r else f"{fmt.format(r[0])}–{fmt.format(r[1])}"


def markdown(rep: dict) -> str:
    split = rep.get("decided_on", "test")
    seeds = rep.get("seeds") or [rep["seed"]]
    lines = [
        f"# accelc bench — {rep['model']} on {rep['data']}",
        "",
        f"Up to {rep['epochs']} epochs, batch {rep['batch_size']}, lr {rep['lr']}, seeds "
        f"{', '.join(str(s) for s in seeds)} (configurations interleaved per seed), repeats {rep['repeats']}; "
        f"{rep['train_images']} training / {rep.get('val_images', 0)} validation / {rep['test_images']} test "
        f"images. Machine: {rep['machine']['platform']}, {rep['machine']['cpus']} CPUs, "
        f"ORT {rep['machine']['onnxruntime']}, torch {rep['machine']['torch']}. Date {rep['date']}.",
        "",
        f"Target accuracy: {_f(rep['target_acc'], '{:.4f}')} ({rep['target_rule']}), judged on the {split} "
        "split; the test split only reports. Time to target is training seconds to the end of the first "
        "epoch that reached it at full input size (a low-resolution stage does not count; evaluation "
        "excluded, shown apart; the algorithms' setup before the first step, such as reuse's layer "
        "measurement, included): median and min–max over the runs that reached it. Ratios are ratios of "
        "those medians, given only where both reached the target on every seed."
        + (" Each configuration stopped at the target." if rep.get("stop_at_target") else ""),
        "",
        "| config | reached | time to target (s) | min–max | eval (s) | test acc at target | final test acc "
        "| min–max | ×torch | ×torch-amp | ×ort |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, r in rep["configs"].items():
        lines.append(
            f"| {c} | {r.get('reached', 0)}/{r.get('runs', 1)} | {_f(r['time_to_target'], '{:.1f}')} "
            f"| {_range(r.get('time_to_target_range'))} | {_f(r.get('eval_time_to_target'), '{:.1f}')} "
            f"| {_f(r.get('test_acc_at_target'), '{:.4f}')} | {r['final_test_acc']:.4f} "
            f"| {_range(r.get('final_test_acc_range'), '{:.4f}')} "
            f"| {_f(r.get('time_to_target_ratio_vs_torch'), '{:.2f}')} "
            f"| {_f(r.get('time_to_target_ratio_vs_torch-amp'), '{:.2f}')} "
            f"| {_f(r.get('time_to_target_ratio_vs_ort'), '{:.2f}')} |"
        )
    for c, why in (rep.get("not_run") or {}).items():
        lines.append(f"| {c} | not run: {why} | | | | | | | | | |")
    lines += [
        "",
        "| config | s/epoch (median) | ms/step | setup (s) | training time (s) | ×torch (epoch) | ×ort (epoch) "
        "| best test acc | ops −% | bytes −% | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, r in rep["configs"].items():
        lines.append(
            f"| {c} | {r['epoch_seconds']:.2f} | {r['ms_per_step']:.1f} | {r.get('setup_seconds', 0.0):.1f} "
            f"| {r['train_time']:.1f} "
            f"| {_f(r.get('epoch_ratio_vs_torch'), '{:.2f}')} | {_f(r.get('epoch_ratio_vs_ort'), '{:.2f}')} "
            f"| {r['best_test_acc']:.4f} "
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
