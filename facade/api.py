"""The Python API (the CLI is a thin layer over it). Every function loads the passes first, so
their registrations are in place, and raises :class:`accelc.AccelcError` with the message the
CLI prints."""

from __future__ import annotations

from . import passes as _passes  # noqa: F401  (registers every pass, algorithm, node kernel and cost hook)
from .compiler.compile import compile_model, inspect_path
from .compiler.errors import AccelcError
from .compiler.pass_api import default_passes, parse_pass_list
from .runtime.config import ExecConfig
from .runtime.train import train as _train


def compile(
    model,
    out_dir,
    passes=None,
    pass_options: dict | None = None,
    loss: str = "cross_entropy",  # noqa: A001
    optimizer: str = "adamw",
    lr: float = 1e-3,
    batch_size: int = 64,
    force: bool = False,
    validate_result: bool = True,
    opt: bool = True,
    info=None,
) -> dict:
    """Compile a forward ONNX model into ORT training artifacts rewritten by ``passes`` (names, or
    a comma-separated string); ``pass_options``: {pass: {option: value}}. The default ``opt``
    pass runs first unless ``opt=False``. Returns the report (also written to report.json)."""
    names = parse_pass_list(passes)
    pass_options = pass_options or {}
    if not isinstance(pass_options, dict):
        raise AccelcError(f"pass_options must be a dict of dicts, got {type(pass_options).__name__}")
    allowed = set(names) | (set(default_passes()) if opt else set())
    stray = [p for p in pass_options if p not in allowed]
    if stray:
        raise AccelcError(
            f"options given for pass(es) {', '.join(map(str, stray))} that are not run "
            f"(passes: {', '.join(sorted(allowed)) or 'none'})"
        )
    return compile_model(
        model,
        out_dir,
        names,
        pass_options,
        loss=loss,
        optimizer=optimizer,
        lr=lr,
        batch_size=batch_size,
        force=force,
        validate_result=validate_result,
        info=info,
        defaults=opt,
    )


def inspect(path) -> dict:
    """Per-layer view of an artifact directory or an ONNX model."""
    return inspect_path(path)


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
) -> dict:
    """Train compiled artifacts; returns the summary (also written to RUN_DIR/summary.json).
    ``kernels``: {node-kernel name: implementation} (see ``accelc train --help``)."""

    config = ExecConfig(device=device, threads=threads, kernels=dict(kernels or {}))
    return _train(
        artifact_dir,
        data,
        epochs,
        batch_size,
        run_dir,
        config,
        seed=seed,
        resume=resume,
        lr=lr,
        train_limit=train_limit,
        test_limit=test_limit,
        force=force,
        progress=progress,
        algorithms=algorithms,
    )


def export(module, example_input, path):
    """Export any torch module for training with accelc (BatchNorm kept, never folded)."""
    from .compiler.export import export as _export  # heavy: torch

    return _export(module, example_input, path)
