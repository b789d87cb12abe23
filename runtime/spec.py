"""One training run as one value: :class:`TrainSpec`, the settings ``accelc train`` and
:func:`accelc.train` take, checked once and handed on whole (to the training loop, and as a JSON
file to every worker process of a data-parallel run).

A spec file is read as untrusted input: :meth:`TrainSpec.from_json` checks every field (its type
and range, with the message the CLI prints for the same flag) and refuses anything else in one
line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..compiler import checks
from ..compiler.errors import AccelcError, InvalidType, InvalidValue, show
from .checkpoint import CHANGEABLE
from .config import LAYOUTS, ExecConfig
from .lr_schedule import LRSchedule

SPEC_VERSION = 2  # 2: the activations' layout (``layout``), the learning-rate schedule
MAX_SPEC_BYTES = 1 << 20  # a spec is a few hundred bytes; a larger file is not one
LOGGERS = ("csv", "tensorboard")  # logs besides metrics.jsonl (``--log``)
MAX_NPROC = 4096  # runtime.distributed.MAX_WORLD (not imported: it loads torch)
SPEC_FILE = ".train-spec.json"  # in the run directory: the spec a launcher hands its worker processes


@dataclass(frozen=True)
class TrainSpec:
    """What one training run is. ``artifacts``: the compiled artifact directory (or an
    :class:`~accelc.compiler.artifacts.Artifacts` in memory); ``data``: a ``--data`` spec or data
    given in Python (the data source); ``run_dir``: None trains without a run directory (nothing
    written). ``exec``: device, threads, kernels and the activations' layout. ``allow_change``: settings a resume may change;
    ``log``: logs besides metrics.jsonl (``csv``, ``tensorboard``)."""

    artifacts: Any = None
    data: Any = "synthetic"
    epochs: int = 3
    batch_size: int = 64
    run_dir: Any = "run"
    seed: int = 0
    resume: bool = False
    lr: float | None = None
    lr_schedule: str = "constant"  # runtime.lr_schedule: constant, linear or linear:W
    train_limit: int | None = None
    test_limit: int | None = None
    force: bool = False
    progress: bool = True
    exec: ExecConfig = field(default_factory=ExecConfig)
    memory_limit_gb: float | None = None
    allow_change: frozenset = frozenset()
    nproc: int = 1
    dist_timeout: float = 300.0
    log: tuple = ("csv",)

    def replace(self, **changes) -> "TrainSpec":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ the spec file
    def to_json(self) -> str:
        """The spec as JSON (a file a worker process reads). Only a spec of files can be written:
        artifacts and data given in Python stay in the process that holds them."""
        if not isinstance(self.artifacts, (str, os.PathLike)):
            raise InvalidValue("artifacts given in Python cannot be written to a spec file: give their directory")
        data = self.data if isinstance(self.data, str) else getattr(self.data, "spec", None)
        if not isinstance(data, str):
            raise InvalidValue("data given in Python cannot be handed to other processes: give a --data spec")
        return json.dumps(
            {
                "version": SPEC_VERSION,
                "artifacts": os.fspath(self.artifacts),
                "data": data,
                "epochs": self.epochs,
                "batch_size": self.batch_size,
                "run_dir": None if self.run_dir is None else os.fspath(self.run_dir),
                "seed": self.seed,
                "resume": self.resume,
                "lr": self.lr,
                "lr_schedule": self.lr_schedule,
                "train_limit": self.train_limit,
                "test_limit": self.test_limit,
                "force": self.force,
                "progress": self.progress,
                "device": self.exec.device,
                "threads": self.exec.threads,
                "kernels": dict(self.exec.kernels),
                "layout": self.exec.layout,
                "memory_limit_gb": self.memory_limit_gb,
                "allow_change": sorted(self.allow_change),
                "nproc": self.nproc,
                "dist_timeout": self.dist_timeout,
                "log": list(self.log),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text, where: str = "the train spec") -> "TrainSpec":
        """The spec a :meth:`to_json` wrote, every field checked (one line for anything else)."""
        try:
            if isinstance(text, bytes):
                if len(text) > MAX_SPEC_BYTES:
                    raise AccelcError(f"{where} is over {MAX_SPEC_BYTES} bytes: not a train spec")
                text = text.decode("utf-8")
            if not isinstance(text, str):
                raise AccelcError(f"{where} must be JSON text, got {type(text).__name__}")
            if len(text) > MAX_SPEC_BYTES:
                raise AccelcError(f"{where} is over {MAX_SPEC_BYTES} bytes: not a train spec")
            raw = json.loads(text, parse_constant=_no_constant)
        except UnicodeDecodeError:
            raise AccelcError(f"{where} is not UTF-8 text") from None
        except (ValueError, RecursionError) as e:
            raise AccelcError(f"{where} is not valid JSON ({show(str(e).splitlines()[0], 120)})") from None
        try:
            return _from_dict(raw)
        except AccelcError as e:
            raise type(e)(f"{where}: {e}") from None

    @classmethod
    def read(cls, path) -> "TrainSpec":
        """A spec file (read as untrusted: at most :data:`MAX_SPEC_BYTES`, every field checked)."""
        path = Path(path)
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_SPEC_BYTES + 1)
        except OSError as e:
            raise AccelcError(f"cannot read train spec '{show(path)}': {e.strerror or e}") from None
        return cls.from_json(data, f"train spec '{show(path)}'")

    def write(self, path) -> None:
        from ..compiler.fileio import atomic_write_text

        atomic_write_text(Path(path), self.to_json())


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


_FIELDS = (
    "version", "artifacts", "data", "epochs", "batch_size", "run_dir", "seed", "resume", "lr", "lr_schedule",
    "train_limit",
    "test_limit", "force", "progress", "device", "threads", "kernels", "layout", "memory_limit_gb", "allow_change",
    "nproc", "dist_timeout", "log",
)  # fmt: skip


def _string(name: str, value, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or "\0" in value:
        raise InvalidType(f"{name} must be a non-empty string, got {checks.got(value)}")
    return value


def _strings(name: str, value, allowed) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise InvalidType(f"{name} must be a list of strings, got {checks.got(value)}")
    bad = [x for x in value if x not in allowed]
    if bad:
        raise InvalidValue(f"{name} takes {', '.join(allowed)}, got {show(bad[0])}")
    return value


def _from_dict(raw) -> TrainSpec:
    if not isinstance(raw, dict):
        raise InvalidType(f"must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise InvalidValue(f"unknown field {show(unknown[0])}")
    missing = [k for k in _FIELDS if k not in raw]
    if missing:
        raise InvalidValue(f"missing field {show(missing[0])}")
    if raw["version"] != SPEC_VERSION or isinstance(raw["version"], bool):
        raise InvalidValue(f"version {show(raw['version'])} is not {SPEC_VERSION}")
    data = checks.data_spec("--data", _string("data", raw["data"]))
    kernels = checks.mapping("kernels", raw["kernels"], optional=False)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in kernels.items()):
        raise InvalidType("kernels must map kernel names to implementation names (strings)")
    device = checks.choice("--device", raw["device"], ("cpu", "cuda"))
    timeout = checks.positive_float("--dist-timeout", raw["dist_timeout"], 86400)
    spec = TrainSpec(
        artifacts=_string("artifacts", raw["artifacts"]),
        data=data,
        epochs=checks.positive_int("--epochs", raw["epochs"], checks.MAX_EPOCHS),
        batch_size=checks.positive_int("--batch-size", raw["batch_size"], checks.MAX_BATCH),
        run_dir=_string("run_dir", raw["run_dir"], optional=True),
        seed=checks.seed("--seed", raw["seed"]),
        resume=checks.boolean("resume", raw["resume"]),
        lr=checks.optional_positive_float("--lr", raw["lr"], checks.MAX_LR),
        lr_schedule=LRSchedule.parse(raw["lr_schedule"]).text(),
        train_limit=checks.optional_positive_int("--train-limit", raw["train_limit"]),
        test_limit=checks.optional_positive_int("--test-limit", raw["test_limit"]),
        force=checks.boolean("force", raw["force"]),
        progress=checks.boolean("progress", raw["progress"]),
        exec=ExecConfig(
            device=device,
            threads=checks.threads(raw["threads"]),
            kernels=dict(kernels),
            layout=checks.choice("--layout", raw["layout"], LAYOUTS),
        ),
        memory_limit_gb=checks.memory_limit_gb(raw["memory_limit_gb"]),
        allow_change=frozenset(_strings("allow_change", raw["allow_change"], CHANGEABLE)),
        nproc=checks.positive_int("--nproc", raw["nproc"], MAX_NPROC),
        dist_timeout=float(timeout),
        log=tuple(dict.fromkeys(_strings("log", raw["log"], LOGGERS))),
    )
    if spec.resume and spec.force:
        raise InvalidValue("--resume continues a run and --force starts it again: give one of them")
    if spec.batch_size % spec.nproc:
        raise InvalidValue(
            f"--batch-size {spec.batch_size} (the global batch) must be a multiple of the number of processes "
            f"({spec.nproc})"
        )
    return spec
