"""Training-artifact generation (ORT's standard files) and the in-memory artifact set passes rewrite.

An artifact directory holds ORT's four standard files, loadable by any ORT Training user with
``onnxruntime.training.api`` and no accelc:

    training_model.onnx  eval_model.onnx  optimizer_model.onnx  checkpoint

plus accelc's ``report.json`` and ``plan.json`` (the directory format is
:mod:`accelc.compiler.artifact_dir`).

Two fix-ups are applied to ORT's output, both needed for ORT 1.19.2 to train correctly:
  * IR version: onnx >= 1.17 stamps IR 14 on generated models; ORT 1.19.2 loads at most IR 10.
  * Eval-mode BatchNorm: the eval model is cut from the training-mode export, so its
    BatchNormalization nodes would normalise with batch statistics; they are switched to use the
    running statistics (training_mode=0, one output).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .errors import AccelcError, ort_message
from .model import ModelInfo
from .ort_training import import_ort_training

MAX_IR_VERSION = 10
LOSSES = ("cross_entropy",)
OPTIMIZERS = ("adamw", "sgd")
FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")


@dataclass
class Artifacts:
    """One set of ORT training artifacts held in memory while passes rewrite it."""

    training: onnx.ModelProto
    eval: onnx.ModelProto
    optimizer: onnx.ModelProto
    checkpoint: bytes
    info: ModelInfo
    config: dict = field(default_factory=dict)  # loss, optimizer, lr, batch_size
    extra_files: dict = field(default_factory=dict)  # name -> bytes, written beside the models
    plan: list = field(default_factory=list)  # runtime controllers the passes ask for (plan.json)
    stages: dict = field(default_factory=dict)  # subdirectory -> Artifacts (e.g. a low-resolution stage)
    # a stage's artifacts while the pass manager replays passes on them: a pass's change records
    # (and what it computes only for them) are the root's
    is_stage: bool = False
    # the training graph's data input when it is not the model's input: a variant that trains on
    # activations computed ahead (skip's cached frozen prefix) reads them under this tensor's name
    train_input: str | None = None

    @property
    def data_input(self) -> str:
        """The training graph's input a step's data feeds."""
        return self.train_input or self.info.input_name

    def __repr__(self) -> str:  # never reads a checkpoint held on disk
        src = self.checkpoint_source()
        ckpt = f"<{len(src):,} bytes>" if isinstance(src, bytes) else repr(src)
        return (
            f"Artifacts(input={self.info.input_name} {tuple(self.info.input_shape)}, checkpoint={ckpt}, "
            f"stages={sorted(self.stages)})"
        )

    def checkpoint_source(self):
        """What :attr:`checkpoint` reads: the bytes, or the callable that reads them from disk
        (artifacts loaded from a directory). Copies share it without reading the file."""
        return self.__dict__["_checkpoint"]

    def copy(self) -> "Artifacts":
        def cp(m):
            c = onnx.ModelProto()
            c.CopyFrom(m)
            return c

        return Artifacts(
            cp(self.training),
            cp(self.eval),
            cp(self.optimizer),
            self.checkpoint_source(),
            self.info,
            dict(self.config),
            dict(self.extra_files),
            [dict(p) for p in self.plan],
            dict(self.stages),
            self.is_stage,
            self.train_input,
        )


def _get_checkpoint(self) -> bytes:
    c = self.__dict__["_checkpoint"]
    return c() if callable(c) else c


def _set_checkpoint(self, value) -> None:
    self.__dict__["_checkpoint"] = value


# The checkpoint (every parameter's initial value: the size of the model) is read when used, not
# held for as long as the artifacts are: a loader may set a callable that reads it from disk.
Artifacts.checkpoint = property(_get_checkpoint, _set_checkpoint, doc="The ORT checkpoint's bytes.")


def fix_ir_version(model: onnx.ModelProto) -> bool:
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
        return True
    return False


def fix_eval_batchnorm(model: onnx.ModelProto) -> list[str]:
    """Make eval-model BatchNorm use running statistics. Returns the names of changed nodes."""
    changed = []
    for n in model.graph.node:
        if n.op_type != "BatchNormalization":
            continue
        touched = False
        for a in n.attribute:
            if a.name == "training_mode" and a.i == 1:
                a.i = 0
                touched = True
        if len(n.output) > 1:  # ORT's eval model resets training_mode but keeps the stat outputs
            del n.output[1:]
            touched = True
        if touched:
            changed.append(n.name)
    return changed


def _ort_loss(loss: str):
    import_ort_training()
    from onnxruntime.training import artifacts as ort_artifacts  # heavy: ORT Training imports torch

    if loss == "cross_entropy":
        return ort_artifacts.LossType.CrossEntropyLoss
    raise AccelcError(f"unknown loss '{loss}'; choose from: {', '.join(LOSSES)}")


def _ort_optimizer(name: str):
    import_ort_training()
    from onnxruntime.training import artifacts as ort_artifacts  # heavy: ORT Training imports torch

    table = {"adamw": ort_artifacts.OptimType.AdamW, "sgd": ort_artifacts.OptimType.SGD}
    if name not in table:
        raise AccelcError(f"unknown optimizer '{name}'; choose from: {', '.join(OPTIMIZERS)}")
    return table[name]


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence C++ log lines ORT's gradient builder writes straight to fd 2 (INFO, one per transformer)."""
    fd = 2
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError):
        pass
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)


def ort_generate(info: ModelInfo, directory: Path, loss: str = "cross_entropy", optimizer: str = "adamw") -> None:
    """Plain ``generate_artifacts`` exactly as an ORT user would call it (no fix-ups)."""
    import onnxruntime as ort  # heavy: loaded when artifacts are generated

    import_ort_training()
    from onnxruntime.training import artifacts as ort_artifacts  # heavy: ORT Training imports torch

    ort.set_default_logger_severity(3)
    os.makedirs(directory, exist_ok=True)
    # generate_artifacts logs INFO lines through the root logger; keep the terminal clean for the
    # duration of the call only (importing accelc changes no logging).
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        with quiet_native_stderr(), contextlib.redirect_stdout(io.StringIO()):
            ort_artifacts.generate_artifacts(
                info.model,
                requires_grad=list(info.params),
                frozen_params=list(info.frozen),
                loss=_ort_loss(loss),
                optimizer=_ort_optimizer(optimizer),
                artifact_directory=str(directory),
                additional_output_names=[info.output_name],
            )
    finally:
        root.setLevel(level)


def generation_error(e: BaseException) -> str:
    """One line on why ORT could not build the training graph, naming the op when it can."""
    text = " ".join(str(e).split())
    m = re.search(r"gradient builder has not been registered: (\S+) for node (\S+)", text)
    if m:
        return (
            f"ORT Training 1.19.2 cannot differentiate op '{m.group(1)}' (node '{m.group(2)}') and accelc "
            f"has no exact rewrite for it; replace it in the model"
        )
    return f"ORT could not build the training graph: {ort_message(e)}"


DEFAULT_LR = 1e-3  # torch's and ORT's AdamW default: the learning rate when none is given


def generate(
    info: ModelInfo,
    loss: str = "cross_entropy",
    optimizer: str = "adamw",
    lr: float = DEFAULT_LR,
    batch_size: int = 64,
) -> tuple[Artifacts, list[str]]:
    """Generate ORT artifacts for a checked model and apply the fix-ups. Returns (artifacts, notes)."""
    if lr <= 0 or lr != lr:
        raise AccelcError(f"--lr must be a positive number, got {lr}")
    if batch_size <= 0:
        raise AccelcError(f"--batch-size must be positive, got {batch_size}")
    _ort_loss(loss), _ort_optimizer(optimizer)
    notes = []
    with tempfile.TemporaryDirectory(prefix="accelc-gen-") as d:
        try:
            ort_generate(info, Path(d), loss, optimizer)
        except AccelcError:
            raise
        except Exception as e:
            raise AccelcError(generation_error(e)) from None
        d = Path(d)
        training = onnx.load_model(str(d / "training_model.onnx"))
        eval_m = onnx.load_model(str(d / "eval_model.onnx"))
        opt = onnx.load_model(str(d / "optimizer_model.onnx"))
        ckpt = (d / "checkpoint").read_bytes()
    for name, m in (("training", training), ("eval", eval_m), ("optimizer", opt)):
        if fix_ir_version(m):
            notes.append(f"{name} model: IR version lowered to {MAX_IR_VERSION} for ORT 1.19.2")
    bn = fix_eval_batchnorm(eval_m)
    if bn:
        notes.append(f"eval model: {len(bn)} BatchNormalization node(s) switched to running statistics")
    config = {"loss": loss, "optimizer": optimizer, "lr": lr, "batch_size": batch_size}
    return Artifacts(training, eval_m, opt, ckpt, info, config), notes


# ORT's AdamW attributes (orttraining's AdamWOptimizer op) and their defaults
ADAMW_DEFAULTS = {
    "lr": 1e-3,
    "alpha": 0.9,
    "beta": 0.999,
    "epsilon": 1e-6,
    "weight_decay": 0.0,
    "adam_mode": 1,
    "correct_bias": 1,
}


def optimizer_hyperparameters(optimizer_model: onnx.ModelProto) -> dict:
    """Read the optimizer op and its attributes from an ORT optimizer model."""
    for n in optimizer_model.graph.node:
        if n.domain == "com.microsoft" and n.op_type.endswith("Optimizer") or n.op_type.startswith("SGDOptimizer"):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            kind = "adamw" if n.op_type.startswith("AdamW") else "sgd"
            return {"kind": kind, **{k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}}
    raise AccelcError("optimizer_model.onnx has no optimizer node")
