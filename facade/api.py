"""The Python API (the CLI is a thin layer over it). Importing it installs the built-in methods
(``accelc.passes.METHODS``) and those registered as ``accelc.methods`` entry points; a method
defined elsewhere is one :class:`~accelc.compiler.method.Method` handed to :func:`install`. Every
function validates every argument up front (before any file is read or
written) with the validators the CLI uses (:mod:`accelc.compiler.checks`), and raises
:class:`accelc.AccelcError` -- an ``InvalidValue`` (also a ``ValueError``) or ``InvalidType``
(also a ``TypeError``) for a bad argument -- with the message the CLI prints for the same value,
naming the CLI flag (``--lr must be a positive finite number, got -1.0``)."""

from __future__ import annotations

import os
from pathlib import Path

from .compiler import checks
from .compiler.artifacts import DEFAULT_LR, LOSSES, OPTIMIZERS
from .compiler.compile import compile_model, inspect_path
from .compiler.errors import AccelcError, InvalidType, InvalidValue, show
from .compiler.method import Method, install, installed, load_entry_points, uninstall
from .compiler.model import ModelInfo
from .compiler.pass_api import check_pass_options, parse_pass_list
from .runtime.config import DEVICES, ExecConfig
from .runtime.data import check_data_form, in_memory_data
from .runtime.distributed import MAX_WORLD
from .runtime.spec import TrainSpec
from .runtime.train import check_loggers
from .runtime.train import train as _train

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
    "check_train_args",
    "check_compile_args",
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


def check_compile_args(
    *,
    model,
    out_dir,
    passes,
    pass_options,
    loss,
    optimizer,
    lr,
    batch_size,
    force,
    validate_result,
    opt,
    memory_limit_gb=None,
    info=None,
) -> tuple[list[str], dict]:
    """Validate :func:`compile`'s arguments; returns (pass names, pass options). Raises
    InvalidType/InvalidValue with the CLI's message. Touches no file."""
    if info is not None and not isinstance(info, ModelInfo):
        raise InvalidType(f"info must be a ModelInfo, got {type(info).__name__}")
    if info is None or model is not None:
        checks.path_like("model", model)
    checks.path_like("-o", out_dir)
    names = parse_pass_list(passes)
    opt = checks.boolean("opt", opt)
    pass_options = check_pass_options(names, pass_options, defaults=opt)
    checks.choice("--loss", loss, LOSSES)
    checks.choice("--optimizer", optimizer, OPTIMIZERS)
    checks.positive_float("--lr", lr, checks.MAX_LR)
    checks.positive_int("--batch-size", batch_size, checks.MAX_BATCH)
    checks.boolean("force", force)
    checks.boolean("validate_result", validate_result)
    checks.memory_limit_gb(memory_limit_gb)
    return names, pass_options


def compile(
    model,
    out_dir,
    passes=None,
    pass_options: dict | None = None,
    loss: str = "cross_entropy",  # noqa: A001
    optimizer: str = "adamw",
    lr: float = DEFAULT_LR,
    batch_size: int = 64,
    force: bool = False,
    validate_result: bool = True,
    opt: bool = True,
    info=None,
    memory_limit_gb: float | None = None,
) -> dict:
    """Compile a forward ONNX model into ORT training artifacts rewritten by ``passes`` (a
    comma-separated string or a list/tuple of names); ``pass_options``: {pass: {option: value}},
    each value parsed as its CLI flag is. The default ``opt`` pass runs first unless
    ``opt=False``. ``memory_limit_gb``: the memory limit (``--memory-limit``; default 80% of the
    memory available). Returns the report (also written to report.json)."""
    names, pass_options = check_compile_args(
        model=model,
        out_dir=out_dir,
        passes=passes,
        pass_options=pass_options,
        loss=loss,
        optimizer=optimizer,
        lr=lr,
        batch_size=batch_size,
        force=force,
        validate_result=validate_result,
        opt=opt,
        memory_limit_gb=memory_limit_gb,
        info=info,
    )
    for flag, path in (("model", model), ("-o", out_dir)):
        if path is not None:
            _no_link_loop(flag, path)
    return compile_model(
        model,
        out_dir,
        names,
        pass_options,
        loss=loss,
        optimizer=optimizer,
        lr=float(lr),
        batch_size=int(batch_size),
        force=bool(force),
        validate_result=bool(validate_result),
        info=info,
        defaults=bool(opt),
        memory_limit_gb=memory_limit_gb,
    )


def _no_link_loop(flag: str, path) -> None:
    """A path that goes through a symbolic link loop is one line (resolving it raises RuntimeError)."""
    try:
        Path(path).resolve()
    except (RuntimeError, OSError):
        raise InvalidValue(f"{flag} '{show(path)}' is a symbolic link loop (or goes through one)") from None


def inspect(path) -> dict:
    """Per-layer view of an artifact directory or an ONNX model; for artifacts also ``engine``:
    how many of the training graph's nodes accelc's kernels run on this machine's default
    configuration, and the op kinds left to ORT."""
    checks.path_like("path", path)
    view = inspect_path(path)
    if view.get("source") == "artifacts":
        from .compiler.artifact_dir import load_artifacts
        from .compiler.lowering import lower_training_model
        from .runtime.config import ExecConfig
        from .runtime.executor import coverage

        art, _ = load_artifacts(path)
        lowered, _ = lower_training_model(art.training, art.info.output_name)
        view["engine"] = coverage(lowered, ExecConfig())
    return view


def check_train_args(
    *,
    epochs,
    batch_size,
    seed,
    lr,
    threads,
    train_limit,
    test_limit,
    device,
    data,
    memory_limit_gb=None,
) -> None:
    """Validate the arguments of ``accelc train`` / :func:`train` that need no file: raises
    InvalidType/InvalidValue with the message the CLI prints, returns nothing. The CLI calls it
    before it spawns its training worker; :func:`train` calls it first."""
    if isinstance(data, str):
        checks.data_spec("--data", data)
    else:  # arrays or a torch Dataset given in Python: the form here, the content when train reads it
        check_data_form(data)
    checks.positive_int("--epochs", epochs, checks.MAX_EPOCHS)
    checks.positive_int("--batch-size", batch_size, checks.MAX_BATCH)
    checks.seed("--seed", seed)
    checks.optional_positive_float("--lr", lr, checks.MAX_LR)
    checks.choice("--device", device, DEVICES)
    checks.threads(threads)
    checks.optional_positive_int("--train-limit", train_limit)
    checks.optional_positive_int("--test-limit", test_limit)
    checks.memory_limit_gb(memory_limit_gb)


def _check_kernels(kernels) -> dict:
    kernels = checks.mapping("kernels", kernels)
    for k, v in kernels.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidType(
                f"kernels must map kernel names to implementation names (str), got {show(k, 40)}: {type(v).__name__}"
            )
    return dict(kernels)


def train(
    artifact_dir,
    data: str = "synthetic",
    epochs: int = 3,
    batch_size: int = 64,
    run_dir="run",
    device: str = "cpu",
    seed: int = 0,
    resume: bool = False,
    lr: float | None = None,
    threads: int | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    force: bool = False,
    progress: bool = True,
    kernels: dict | None = None,
    algorithms=None,
    memory_limit_gb: float | None = None,
    allow_change=(),
    nproc: int = 1,
    dist_timeout: float = 300.0,
    log=("csv",),
    _lock_fd: int | None = None,
    _dist=None,
) -> dict:
    """Train compiled artifacts; returns the summary (also written to RUN_DIR/summary.json).
    ``data``: a ``--data`` spec, or data in Python: ``(x_train, y_train, x_test, y_test)`` numpy
    arrays or torch tensors (images N,C,H,W float at the model's input shape, used as given;
    labels integer class indices), ``(train, test)`` with each a torch ``Dataset``, ``DataLoader``
    or ``(x, y)`` pair (read once into memory: with ``train_limit``/``test_limit`` only that many
    samples, and one without a ``__len__`` -- an IterableDataset -- at most 1,000,000 samples, so an
    endless stream is refused: give it a limit), or a dict with those four keys; the run records
    it by its SHA-256, so a resume with other data is refused.
    ``allow_change``: with ``resume``, settings that may differ from the checkpoint's
    (``"batch_size"``, ``"epochs"``; ``--allow-change``).
    ``kernels``: {node-kernel name: implementation} (see ``accelc train --help``);
    ``memory_limit_gb``: the memory limit (``--memory-limit``). ``nproc``: train data-parallel on
    that many local processes (``--nproc``; ``batch_size`` is the global batch), which run
    ``accelc train`` and are supervised as the CLI does; ``dist_timeout``: seconds a rank waits for
    the others; ``log``: logs besides metrics.jsonl (``--log``: "csv", "tensorboard", "none").
    Every argument is validated before any file is read or written."""
    check_train_args(
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        lr=lr,
        threads=threads,
        train_limit=train_limit,
        test_limit=test_limit,
        device=device,
        data=data,
        memory_limit_gb=memory_limit_gb,
    )
    checks.path_like("artifacts", artifact_dir)
    checks.path_like("-o", run_dir)
    checks.boolean("resume", resume)
    checks.boolean("force", force)
    checks.boolean("progress", progress)
    kernels = _check_kernels(kernels)
    if algorithms is not None and not isinstance(algorithms, (list, tuple)):
        raise InvalidType(
            f"algorithms must be a list of accelc.runtime.algorithm.Algorithm, got {type(algorithms).__name__}"
        )

    config = ExecConfig(device=device, threads=None if threads is None else int(threads), kernels=kernels)
    if isinstance(allow_change, str):
        allow_change = [x for x in allow_change.split(",") if x.strip()]
    if not isinstance(allow_change, (list, tuple, set, frozenset)):
        raise InvalidType(f"allow_change must be a list of setting names, got {type(allow_change).__name__}")
    allow_change = {str(x).strip().replace("-", "_") for x in allow_change}
    checks.positive_int("--nproc", nproc, MAX_WORLD)
    checks.positive_float("--dist-timeout", dist_timeout, 86400)
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
        data = in_memory_data(data, memory_limit_gb, train_limit, test_limit)
    log = check_loggers(log)
    if nproc > 1 and _dist is None:
        if algorithms is not None:
            raise InvalidValue("algorithms cannot be handed to other processes: with nproc > 1 the plan's are used")
        return _train_local_ranks(
            artifact_dir, data, epochs, batch_size, run_dir, device, seed, resume, lr, threads, train_limit,
            test_limit, force, kernels, allow_change, memory_limit_gb, nproc, dist_timeout, log,
        )  # fmt: skip
    spec = TrainSpec(
        artifacts=artifact_dir,
        data=data,
        epochs=int(epochs),
        batch_size=int(batch_size),
        run_dir=run_dir,
        seed=int(seed),
        resume=bool(resume),
        lr=None if lr is None else float(lr),
        train_limit=None if train_limit is None else int(train_limit),
        test_limit=None if test_limit is None else int(test_limit),
        force=bool(force),
        progress=bool(progress),
        exec=config,
        memory_limit_gb=memory_limit_gb,
        allow_change=frozenset(allow_change),
        nproc=int(nproc),
        dist_timeout=float(dist_timeout),
        log=log,
    )
    return _train(spec, algorithms=None if algorithms is None else list(algorithms), lock_fd=_lock_fd, dist=_dist)


def _train_local_ranks(
    artifact_dir, data, epochs, batch_size, run_dir, device, seed, resume, lr, threads, train_limit, test_limit,
    force, kernels, allow_change, memory_limit_gb, nproc, dist_timeout, log=("csv",),
) -> dict:  # fmt: skip
    """:func:`train` with ``nproc`` > 1: the ranks are ``accelc train`` processes, supervised as
    the CLI's ``--nproc`` does; returns rank 0's summary."""
    import json

    from .launch import launch_local, local_threads
    from .runtime.train import open_run_dir, release_run_dir

    argv = ["train", os.fspath(artifact_dir), "--data", data, "--epochs", str(epochs)]
    argv += ["--batch-size", str(batch_size), "-o", os.fspath(run_dir), "--device", device, "--seed", str(seed)]
    argv += ["--nproc", str(nproc), "--dist-timeout", repr(float(dist_timeout)), "-q"]
    argv += ["--log", ",".join(log) or "none"]
    for flag, v in (("--lr", lr), ("--train-limit", train_limit), ("--test-limit", test_limit)):
        if v is not None:
            argv += [flag, repr(v)]
    if memory_limit_gb is not None:
        argv += ["--memory-limit", repr(float(memory_limit_gb))]
    if resume:
        argv.append("--resume")
    if force:
        argv.append("--force")
    if allow_change:
        argv += ["--allow-change", ",".join(sorted(c.replace("_", "-") for c in allow_change))]
    for k, v in kernels.items():
        argv += ["--kernel", f"{k}={v}"]
    threads = threads if threads is not None else local_threads(os.environ, nproc)
    rd, lock = open_run_dir(run_dir, resume, force, protect=[artifact_dir])
    try:
        worker = argv + ["--in-process", "--supervised-by", str(os.getpid())]
        launch_local(worker, nproc, rd, lock, epochs, threads)
    finally:
        release_run_dir(rd, lock, lock.created)
    return json.loads((rd / "summary.json").read_text())


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
