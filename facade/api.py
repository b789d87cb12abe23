"""The Python API (the CLI is a thin layer over it). Importing it installs the built-in methods
(``accelc.passes.METHODS``) and those registered as ``accelc.methods`` entry points; a method
defined elsewhere is one :class:`~accelc.compiler.method.Method` handed to :func:`install`. Every
function validates every argument up front (before any file is read or
written) with the validators the CLI uses (:mod:`accelc.compiler.checks`), and raises
:class:`accelc.AccelcError` -- an ``InvalidValue`` (also a ``ValueError``) or ``InvalidType``
(also a ``TypeError``) for a bad argument -- with the message the CLI prints for the same value,
naming the CLI flag (``--lr must be a positive finite number, got -1.0``)."""

from __future__ import annotations

import inspect as pyinspect
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from .compiler import checks
from .compiler.artifacts import DEFAULT_LR, LOSSES, OPTIMIZERS
from .compiler.compile import compile_model, inspect_path
from .compiler.errors import AccelcError, InvalidType, InvalidValue, show
from .compiler.method import Method, install, installed, load_entry_points, uninstall
from .compiler.model import ModelInfo
from .compiler.pass_api import check_pass_options, parse_pass_list
from .runtime.checkpoint import CHANGEABLE
from .runtime.config import DEVICES, LAYOUTS, ExecConfig
from .runtime.data import check_data_form, in_memory_data
from .runtime.distributed import MAX_WORLD
from .runtime.lr_schedule import LRSchedule
from .runtime.spec import TrainSpec
from .runtime.train import check_loggers
from .runtime.train import train as _train

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "Method",
    "install",
    "installed",
    "uninstall",
    "compile",
    "inspect",
    "train",
    "export",
    "export_run",
    "train_spec",
    "check_train_args",
    "check_compile_args",
    "CompileSettings",
    "TrainSettings",
    "AccelcError",
]


def _install_methods() -> None:
    """The built-in methods, then the plug-ins (a plug-in that cannot be installed is one warning
    line: accelc still runs with the others)."""
    import warnings

    from .passes import METHODS

    install(*METHODS)
    try:
        plugins = load_entry_points()
    except AccelcError as e:
        warnings.warn(str(e), stacklevel=2)
        return
    for m in plugins:
        try:
            install(m)
        except (AccelcError, TypeError) as e:
            warnings.warn(f"the method plug-in '{m.name}' is not installed: {e}", stacklevel=2)


_install_methods()


class CompileSettings(TypedDict, total=False):
    """:func:`compile`'s keywords after ``pass_options`` (their defaults: :data:`COMPILE_DEFAULTS`)."""

    loss: str
    optimizer: str
    lr: float
    batch_size: int
    force: bool
    validate_result: bool
    opt: bool
    info: ModelInfo | None
    memory_limit_gb: float | None


COMPILE_DEFAULTS: dict = {
    "loss": "cross_entropy",
    "optimizer": "adamw",
    "lr": DEFAULT_LR,
    "batch_size": 64,
    "force": False,
    "validate_result": True,
    "opt": True,
    "info": None,
    "memory_limit_gb": None,
}


def _settings(function: str, given: dict, defaults: dict) -> dict:
    """``given`` keywords over ``defaults``; one that is not a keyword of ``function`` is the
    TypeError Python raises for it."""
    for k in given:
        if k not in defaults:
            raise TypeError(f"{function}() got an unexpected keyword argument '{k}'")
    return {**defaults, **given}


def _keyword_signature(fn, defaults: dict, settings) -> None:
    """``fn``'s signature with its ``**settings`` spelt out (keyword-only, with their defaults), for
    help() and editors."""
    sig = pyinspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    hints = settings.__annotations__
    params += [
        pyinspect.Parameter(
            k,
            pyinspect.Parameter.KEYWORD_ONLY,
            default=v,
            annotation=getattr(hints.get(k), "__forward_arg__", pyinspect.Parameter.empty),
        )
        for k, v in defaults.items()
    ]
    fn.__signature__ = sig.replace(parameters=params)


def check_compile_args(args: dict | None = None, /, **kw) -> tuple[list[str], dict]:
    """Validate :func:`compile`'s arguments, given as a dict or as keywords (``model``,
    ``out_dir``, ``passes``, ``pass_options`` and :class:`CompileSettings`); returns (pass names,
    pass options). Raises InvalidType/InvalidValue with the CLI's message. Touches no file."""
    a = {"model": None, "passes": None, "pass_options": None, **COMPILE_DEFAULTS, **(args or {}), **kw}
    info, model = a["info"], a["model"]
    if info is not None and not isinstance(info, ModelInfo):
        raise InvalidType(f"info must be a ModelInfo, got {type(info).__name__}")
    if info is None or model is not None:
        checks.path_like("model", model)
    checks.path_like("-o", a.get("out_dir"))
    names = parse_pass_list(a["passes"])
    opt = checks.boolean("opt", a["opt"])
    pass_options = check_pass_options(names, a["pass_options"], defaults=opt)
    checks.choice("--loss", a["loss"], LOSSES)
    checks.choice("--optimizer", a["optimizer"], OPTIMIZERS)
    checks.positive_float("--lr", a["lr"], checks.MAX_LR)
    checks.positive_int("--batch-size", a["batch_size"], checks.MAX_BATCH)
    checks.boolean("force", a["force"])
    checks.boolean("validate_result", a["validate_result"])
    checks.memory_limit_gb(a["memory_limit_gb"])
    return names, pass_options


def compile(model, out_dir, passes=None, pass_options: dict | None = None, **settings: Unpack[CompileSettings]) -> dict:
    """Compile a forward ONNX model into ORT training artifacts rewritten by ``passes`` (a
    comma-separated string or a list/tuple of names); ``pass_options``: {pass: {option: value}},
    each value parsed as its CLI flag is. Keywords (:data:`COMPILE_DEFAULTS`): ``loss``,
    ``optimizer``, ``lr``, ``batch_size``, ``force``, ``validate_result``; the default ``opt``
    pass runs first unless ``opt=False``; ``info``: the model's ModelInfo when known;
    ``memory_limit_gb``: the memory limit (``--memory-limit``; default 80% of the memory
    available). Returns the report (also written to report.json)."""
    s = _settings("compile", settings, COMPILE_DEFAULTS)
    names, pass_options = check_compile_args(s, model=model, out_dir=out_dir, passes=passes, pass_options=pass_options)
    for flag, path in (("model", model), ("-o", out_dir)):
        if path is not None:
            _no_link_loop(flag, path)
    return compile_model(
        model,
        out_dir,
        names,
        pass_options,
        loss=s["loss"],
        optimizer=s["optimizer"],
        lr=float(s["lr"]),
        batch_size=int(s["batch_size"]),
        force=bool(s["force"]),
        validate_result=bool(s["validate_result"]),
        info=s["info"],
        defaults=bool(s["opt"]),
        memory_limit_gb=s["memory_limit_gb"],
    )


_keyword_signature(compile, COMPILE_DEFAULTS, CompileSettings)


def _no_link_loop(flag: str, path) -> None:
    """A path that goes through a symbolic link loop is one line (resolving it raises RuntimeError)."""
    try:
        Path(path).resolve()
    except (RuntimeError, OSError):
        raise InvalidValue(f"{flag} '{show(path)}' is a symbolic link loop (or goes through one)") from None


def inspect(path) -> dict:
    """Per-layer view of an artifact directory or an ONNX model; for artifacts also ``engine``:
    how many of the training graph's nodes accelc's kernels run on this machine's default
    configuration, the op kinds left to ORT, and under ``cuda`` the op kinds of the training and
    evaluation graphs no kernel runs on CUDA (what ``--device cuda`` refuses; none: it trains there)."""
    checks.path_like("path", path)
    view = inspect_path(path)
    if view.get("source") == "artifacts":
        from .compiler.artifact_dir import load_artifacts
        from .compiler.lowering import lower_training_model
        from .runtime.config import ExecConfig
        from .runtime.executor import coverage, fell_back

        art, _ = load_artifacts(path)
        lowered, _ = lower_training_model(art.training, art.info.output_name)
        view["engine"] = coverage(lowered, ExecConfig())
        view["engine"]["cuda"] = {"no_cuda_kernel": fell_back((lowered, art.eval), ExecConfig(device="cuda"))}
    return view


class TrainSettings(TypedDict, total=False):
    """:func:`train`'s keywords that make its :class:`~accelc.runtime.spec.TrainSpec` (their
    defaults: :data:`TRAIN_DEFAULTS`, the spec's own)."""

    epochs: int
    batch_size: int
    run_dir: str | os.PathLike
    device: str
    seed: int
    resume: bool
    lr: float | None
    lr_schedule: str
    threads: int | None
    train_limit: int | None
    test_limit: int | None
    force: bool
    progress: bool
    kernels: dict | None
    layout: str
    memory_limit_gb: float | None
    allow_change: list | tuple | str
    nproc: int
    dist_timeout: float
    log: tuple | list | str


def _train_defaults() -> dict:
    spec = TrainSpec()
    d = {k: getattr(spec, k, None) for k in TrainSettings.__annotations__}
    d.update(device=spec.exec.device, threads=spec.exec.threads, kernels=None, layout=spec.exec.layout, allow_change=())
    return d


TRAIN_DEFAULTS: dict = _train_defaults()


def check_train_args(args=None, /, **kw) -> None:
    """Validate the arguments of ``accelc train`` / :func:`train` that need no file, given as a
    :class:`~accelc.runtime.spec.TrainSpec`, a dict of :func:`train`'s keywords (``data``
    included) or those keywords: raises InvalidType/InvalidValue with the message the CLI prints,
    returns nothing. :func:`train_spec` calls it first."""
    if isinstance(args, TrainSpec):
        args = {
            **{k: getattr(args, k) for k in ("data", "epochs", "batch_size", "seed", "lr", "lr_schedule")},
            "memory_limit_gb": args.memory_limit_gb,
            **{k: getattr(args, k) for k in ("train_limit", "test_limit")},
            "device": args.exec.device,
            "threads": args.exec.threads,
            "layout": args.exec.layout,
        }
    a = {"data": "synthetic", **TRAIN_DEFAULTS, **(args or {}), **kw}
    data = a["data"]
    if isinstance(data, str):
        checks.data_spec("--data", data)
    else:  # arrays or a torch Dataset given in Python: the form here, the content when train reads it
        check_data_form(data)
    checks.positive_int("--epochs", a["epochs"], checks.MAX_EPOCHS)
    checks.positive_int("--batch-size", a["batch_size"], checks.MAX_BATCH)
    checks.seed("--seed", a["seed"])
    checks.optional_positive_float("--lr", a["lr"], checks.MAX_LR)
    LRSchedule.parse(a["lr_schedule"])
    checks.choice("--device", a["device"], DEVICES)
    checks.choice("--layout", a["layout"], LAYOUTS)
    checks.threads(a["threads"])
    checks.optional_positive_int("--train-limit", a["train_limit"])
    checks.optional_positive_int("--test-limit", a["test_limit"])
    checks.memory_limit_gb(a["memory_limit_gb"])


def _check_kernels(kernels) -> dict:
    kernels = checks.mapping("kernels", kernels)
    for k, v in kernels.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidType(
                f"kernels must map kernel names to implementation names (str), got {show(k, 40)}: {type(v).__name__}"
            )
    return dict(kernels)


def _optional_int(v) -> int | None:
    return None if v is None else int(v)


def _check_allow_change(allow_change) -> frozenset:
    if isinstance(allow_change, str):
        allow_change = [x for x in allow_change.split(",") if x.strip()]
    if not isinstance(allow_change, (list, tuple, set, frozenset)):
        raise InvalidType(f"allow_change must be a list of setting names, got {type(allow_change).__name__}")
    allow = {str(x).strip().replace("-", "_") for x in allow_change}
    bad = sorted(allow - set(CHANGEABLE))
    if bad:
        raise InvalidValue(
            f"--allow-change takes {', '.join(c.replace('_', '-') for c in CHANGEABLE)}, got {show(bad[0])}"
        )
    return frozenset(allow)


def train_spec(artifact_dir, data="synthetic", **settings: Unpack[TrainSettings]) -> TrainSpec:
    """:func:`train`'s arguments checked (every one, before any file is read or written, with the
    CLI's messages) and made one :class:`~accelc.runtime.spec.TrainSpec`. Data given in Python is
    read here, once (and cannot go to other processes: ``nproc`` > 1 needs a ``--data`` spec)."""
    s = _settings("train", settings, TRAIN_DEFAULTS)
    check_train_args(s, data=data)
    checks.path_like("artifacts", artifact_dir)
    checks.path_like("-o", s["run_dir"])
    for flag in ("resume", "force", "progress"):
        checks.boolean(flag, s[flag])
    kernels = _check_kernels(s["kernels"])
    allow_change = _check_allow_change(s["allow_change"])
    nproc, batch_size = s["nproc"], s["batch_size"]
    checks.positive_int("--nproc", nproc, MAX_WORLD)
    checks.positive_float("--dist-timeout", s["dist_timeout"], 86400)
    if batch_size % nproc:
        raise InvalidValue(
            f"--batch-size {batch_size} (the global batch) must be a multiple of the number of processes ({nproc})"
        )
    if not isinstance(data, str):  # a DataSource, or data given in Python
        if nproc > 1:
            raise InvalidValue(
                "data given in Python cannot be handed to other processes: with nproc > 1 give a --data spec"
            )
        # read once and checked (model checks when loaded); a torch dataset only as far as the limits
        data = in_memory_data(data, s["memory_limit_gb"], s["train_limit"], s["test_limit"])
    return TrainSpec(
        artifacts=artifact_dir,
        data=data,
        epochs=int(s["epochs"]),
        batch_size=int(batch_size),
        run_dir=s["run_dir"],
        seed=int(s["seed"]),
        resume=bool(s["resume"]),
        lr=None if s["lr"] is None else float(s["lr"]),
        lr_schedule=LRSchedule.parse(s["lr_schedule"]).text(),
        train_limit=_optional_int(s["train_limit"]),
        test_limit=_optional_int(s["test_limit"]),
        force=bool(s["force"]),
        progress=bool(s["progress"]),
        exec=ExecConfig(device=s["device"], threads=_optional_int(s["threads"]), kernels=kernels, layout=s["layout"]),
        memory_limit_gb=s["memory_limit_gb"],
        allow_change=allow_change,
        nproc=int(nproc),
        dist_timeout=float(s["dist_timeout"]),
        log=check_loggers(s["log"]),
    )


def train(artifact_dir, data="synthetic", *, algorithms=None, **settings: Unpack[TrainSettings]) -> dict:
    """Train compiled artifacts; returns the summary (also written to RUN_DIR/summary.json).
    ``data``: a ``--data`` spec, or data in Python: ``(x_train, y_train, x_test, y_test)`` numpy
    arrays or torch tensors (images N,C,H,W float at the model's input shape, used as given;
    labels integer class indices), ``(train, test)`` with each a torch ``Dataset``, ``DataLoader``
    or ``(x, y)`` pair (read once into memory: with ``train_limit``/``test_limit`` only that many
    samples, and one without a ``__len__`` -- an IterableDataset -- at most 1,000,000 samples, so an
    endless stream is refused: give it a limit), or a dict with those four keys; the run records
    it by its SHA-256, so a resume with other data is refused. ``algorithms``: run-time
    algorithms instead of those the artifacts' plan asks for (one process only).
    The other arguments are keyword-only (:class:`TrainSettings`, defaults :data:`TRAIN_DEFAULTS`),
    each the ``accelc train`` flag of its name: ``epochs``, ``batch_size``, ``run_dir`` (``-o``),
    ``device``, ``seed``, ``resume``, ``lr``, ``threads``, ``train_limit``, ``test_limit``,
    ``force``, ``progress`` (not ``-q``), ``lr_schedule`` (``"constant"``, ``"linear"`` or
    ``"linear:W"``: warm-up over W of the budget, then linear decay to zero over the epochs). ``allow_change``: with ``resume``, settings that may
    differ from the checkpoint's (``"batch_size"``, ``"epochs"``, ``"nproc"``; ``--allow-change``).
    ``kernels``: {node-kernel name: implementation} (see ``accelc train --help``); ``layout``: the
    activations' memory layout, ``"auto"`` (measured), ``"nchw"`` or ``"nhwc"`` (``--layout``);
    ``memory_limit_gb``: the memory limit (``--memory-limit``). ``nproc``: train data-parallel on
    that many local processes (``--nproc``; ``batch_size`` is the global batch), each a worker that
    reads the run's spec from a file in the run directory, supervised as the CLI does;
    ``dist_timeout``: seconds a rank waits for the others; ``log``: logs besides metrics.jsonl
    (``--log``: "csv", "tensorboard", "none"). Every argument is validated before any file is read
    or written (:func:`train_spec`)."""
    if algorithms is not None and not isinstance(algorithms, (list, tuple)):
        raise InvalidType(
            f"algorithms must be a list of accelc.runtime.algorithm.Algorithm, got {type(algorithms).__name__}"
        )
    spec = train_spec(artifact_dir, data, **settings)
    if spec.nproc == 1:
        return _train(spec, algorithms=None if algorithms is None else list(algorithms))
    if algorithms is not None:
        raise InvalidValue("algorithms cannot be handed to other processes: with nproc > 1 the plan's are used")
    return _train_local_ranks(spec)


_keyword_signature(train, TRAIN_DEFAULTS, TrainSettings)


def _train_local_ranks(spec: TrainSpec) -> dict:
    """``spec`` trained by ``spec.nproc`` local ranks (:func:`accelc.launch.train_supervised`: each a
    worker process that reads the spec from a file, supervised as the CLI's ``--nproc`` does, one
    rank included); returns rank 0's summary. The workers print no progress."""
    from .launch import train_supervised

    train_supervised(spec.replace(progress=False), local_ranks=True)
    return json.loads((Path(os.path.abspath(spec.run_dir)) / "summary.json").read_text())


def export(module, example_input, path):
    """Export any torch module for training with accelc (BatchNorm kept, never folded). A module
    that cannot run on ``example_input`` is one AccelcError line naming the reason."""
    checks.path_like("path", path)
    from .compiler.export import export as _export  # heavy: torch

    return _export(module, example_input, path)


def export_run(run_dir, output, artifacts=None, epoch: int | None = None, ort_checkpoint=None, force: bool = False):
    """Write a trained run (``accelc train``'s run directory) as an inference ONNX model at
    ``output``: the artifacts' eval graph without the loss (output = logits), with the trained
    parameters and BatchNorm running statistics as initialisers, runnable on plain onnxruntime.
    ``ort_checkpoint``: also write an ORT training ``CheckpointState`` holding the trained
    parameters (``onnxruntime.training.api.Module(training_model.onnx, state, eval_model.onnx)``
    continues from it). ``artifacts``: the artifact directory the run was trained from (default:
    found beside the run and verified by the checkpoint's hash); ``epoch``: 1-based (the run keeps
    its last epoch's checkpoint, the default); ``force``: replace existing output files. Returns
    what was written."""
    checks.path_like("run", run_dir)
    checks.path_like("-o", output)
    if artifacts is not None:
        checks.path_like("--artifacts", artifacts)
    if ort_checkpoint is not None:
        checks.path_like("--ort-checkpoint", ort_checkpoint)
    epoch = checks.optional_positive_int("--epoch", epoch, checks.MAX_EPOCHS)
    force = checks.boolean("force", force)
    from .runtime.export_run import export_run as _export_run  # heavy: onnx, ORT

    return _export_run(run_dir, output, artifacts=artifacts, epoch=epoch, ort_checkpoint=ort_checkpoint, force=force)
