"""``accelc train`` as a function: :func:`train` runs one :class:`~accelc.runtime.spec.TrainSpec`
(the run directory opened and locked, the data and the artifacts loaded, a
:class:`~accelc.runtime.train.loop.Trainer` run, the summary and the curves written)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ...compiler.artifact_dir import load_artifacts
from ...compiler.artifacts import Artifacts
from ...compiler.errors import AccelcError, show
from ...compiler.fileio import atomic_write_text
from ...compiler.model import check_step_memory
from .. import checkpoint as ckpt
from ..algorithm import algorithms_for
from ..data import as_source, load_data
from ..spec import TrainSpec
from .logs import _write_error, check_loggers, tensorboard_writer
from .loop import RunSetup, Trainer
from .plots import plot_run
from .rundir import open_run_dir, release_run_dir
from .summary import machine_info


def _check_spec(spec: TrainSpec, dist) -> tuple:
    """What needs no file: the loggers and the allowed changes; returns (loggers, dist or None, world)."""
    loggers = check_loggers(spec.log)
    if "tensorboard" in loggers and (dist is None or not dist.distributed or dist.rank == 0):
        tensorboard_writer()  # a broken install: one line before anything is written
    bad = sorted(set(spec.allow_change) - set(ckpt.CHANGEABLE))
    if bad:
        raise AccelcError(
            f"--allow-change takes {', '.join(c.replace('_', '-') for c in ckpt.CHANGEABLE)}, got {show(bad[0])}"
        )
    dist = dist if dist is not None and dist.distributed else None
    world = dist.world_size if dist else 1
    if spec.batch_size % world:
        raise AccelcError(
            f"--batch-size {spec.batch_size} (the global batch) must be a multiple of the number of processes ({world})"
        )
    return loggers, dist, world


def _open(spec: TrainSpec, data, lock_fd: int | None, dist) -> tuple:
    """The run directory, locked by rank 0 (the other ranks only read it): (path, lock or None)."""
    artifact_dir = spec.artifacts
    data_dir = data.directory
    if dist is None or dist.rank == 0:
        return open_run_dir(
            spec.run_dir,
            spec.resume,
            spec.force,
            lock_fd,
            protect=[p for p in (artifact_dir, data_dir) if isinstance(p, (str, os.PathLike))],
        )
    # another rank: reads the run directory (a checkpoint to resume), never writes it
    return Path(os.path.abspath(spec.run_dir)), None


def _write_outputs(trainer: Trainer, summary: dict, rd: Path, artifact_dir) -> None:
    try:
        atomic_write_text(rd / "summary.json", json.dumps(summary, indent=1))
        if trainer.history:
            plot_run(trainer.history, rd / "curves.png", f"accelc train — {Path(str(artifact_dir)).name}")
    except OSError as e:
        raise _write_error(rd, e) from None


def train(spec: TrainSpec, *, algorithms: list | None = None, lock_fd: int | None = None, dist=None) -> dict:
    """Train compiled artifacts as ``spec`` says; returns the summary (also written to
    RUN_DIR/summary.json). ``algorithms`` default to those the artifacts' plan asks for;
    ``spec.allow_change``: settings a resume may change (``batch_size``, ``epochs``, ``nproc``).
    ``lock_fd``: the run directory's lock a supervising parent already holds. ``dist``: a
    :class:`~accelc.runtime.distributed.DistConfig` to train as one rank of a data-parallel job
    (``batch_size`` is the global batch; rank 0 alone writes the run directory). ``spec.log``:
    logs besides metrics.jsonl, of ``csv`` (metrics.csv, steps.csv) and ``tensorboard`` (a list, or
    a comma-separated string; ``none`` or empty: metrics.jsonl alone)."""
    from ..distributed import GradReducer, Group  # heavy: torch
    from ..session import TrainingSession  # heavy: torch and ORT

    if not isinstance(spec, TrainSpec):
        raise AccelcError(f"train takes a TrainSpec, got {type(spec).__name__}")
    config, artifact_dir = spec.exec, spec.artifacts
    loggers, dist, world = _check_spec(spec, dist)
    data = as_source(spec.data)  # a --data spec or data given in Python: what the run records is data.describe()
    rd, lock = _open(spec, data, lock_fd, dist)
    group = None
    try:
        art = artifact_dir if isinstance(artifact_dir, Artifacts) else load_artifacts(artifact_dir)[0]
        info = art.info
        check_step_memory(
            info, spec.batch_size // world, spec.memory_limit_gb, f"training at --batch-size {spec.batch_size}"
        )
        # the data first: a bad file is refused before ONNX Runtime is loaded
        ds = load_data(
            data,
            info.input_shape,
            info.num_classes,
            spec.train_limit,
            spec.test_limit,
            memory_limit_gb=spec.memory_limit_gb,
        )
        if dist is not None:  # joins the job: every rank waits here for the others
            group = Group(dist, config.device)
        # the artifacts loaded (and verified) once; the sessions built for the variant training starts with
        session = TrainingSession(art, config, lr=spec.lr, lazy=True)
        if group is not None:
            session.attach_reducer(GradReducer(group))
        if algorithms is None:
            algorithms = algorithms_for(session.artifacts)
        fingerprint = {
            "data": data.describe(),
            "train_limit": spec.train_limit,
            "test_limit": spec.test_limit,
            "train_images": int(len(ds.x_train)),
            "test_images": int(len(ds.x_test)),
            "lr": session.lr,
            "nproc": world,
        }
        trainer = Trainer(
            spec.replace(run_dir=rd, log=loggers, progress=spec.progress and (dist is None or dist.rank == 0)),
            session,
            ds,
            algorithms=algorithms,
            setup=RunSetup(
                fingerprint=fingerprint,
                artifacts_sha=ckpt.artifacts_sha256(artifact_dir) if not isinstance(artifact_dir, Artifacts) else None,
            ),
            dist=group,
        )
        trainer.artifacts_dir = None if isinstance(artifact_dir, Artifacts) else os.path.abspath(artifact_dir)
        summary = trainer.run()
        summary.update(
            {
                "artifacts": Path(str(artifact_dir)).name,
                "data": data.name,
                "device": config.device,
                "lr_schedule": trainer.lr_schedule.text(),
                "machine": machine_info(),
            }
        )
        if trainer.writer:
            _write_outputs(trainer, summary, rd, artifact_dir)
        return summary
    finally:
        if group is not None:
            group.close()
        if lock is not None:
            release_run_dir(rd, lock, lock.created)
