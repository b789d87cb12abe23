"""Export torch modules to ONNX *for training* (the built-in model zoo is :mod:`accelc.zoo`).

Exporting in eval mode lets torch fold BatchNorm into Conv, which silently breaks training, so
this helper always exports in training mode without constant folding.
"""

from __future__ import annotations

import collections
import copy
import errno
import io
import json
import os
import stat
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

from . import checks
from .errors import AccelcError, InvalidType, InvalidValue, show
from .fileio import atomic_write_bytes, output_state
from .model import TRAINABLE_KEY

OPSET = 17


def export_bytes(module: nn.Module, example_input: torch.Tensor) -> bytes:
    """Return the ONNX bytes of ``module`` exported for training (BatchNorm kept, batch dim dynamic)."""
    was_training = module.training
    module.train()
    # BatchNorm running statistics must not move during export.
    # (a copy of the state dict keeps its _metadata: modules such as torchvision's MNASNet read
    # their version from it when the state is loaded back)
    state = module.state_dict()
    saved = collections.OrderedDict((k, v.clone()) for k, v in state.items())
    if hasattr(state, "_metadata"):
        saved._metadata = copy.deepcopy(state._metadata)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example_input,),
                buf,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "N"}, "output": {0: "N"}},
                opset_version=OPSET,
                training=torch.onnx.TrainingMode.TRAINING,
                do_constant_folding=False,
                dynamo=False,
            )
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        # the module cannot run (or be traced) on this input: a wrong example shape, most often
        raise InvalidValue(
            f"cannot export {type(module).__name__} with an example input of shape "
            f"{','.join(map(str, example_input.shape))}: {first_line(e)}"
        ) from None
    finally:
        module.load_state_dict(saved)
        module.train(was_training)
    # Tracing ran one training-mode forward, which moved BatchNorm running statistics before torch
    # captured them as initialisers: put the module's true values back.

    model = onnx.load_model_from_string(buf.getvalue())
    if len(model.graph.output) != 1:  # a tuple, list or dict of tensors: accelc trains one logits output
        raise InvalidValue(
            f"{type(module).__name__} returns {len(model.graph.output)} outputs (a tuple, list or dict?); "
            "accelc trains a module whose forward returns one tensor, the logits (N, classes): return only those"
        )
    for i, t in enumerate(model.graph.initializer):
        if t.name in saved and ("running_" in t.name or "num_batches" in t.name):
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(saved[t.name].cpu().numpy(), t.name))
    # torch's own list of what trains, so the compiler trains exactly that (a layer scale used by
    # Mul included) and says so when a parameter did not survive export as an initialiser
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    model.metadata_props.add(key=TRAINABLE_KEY, value=json.dumps(trainable))
    return model.SerializeToString()


def first_line(e: BaseException) -> str:
    """torch's reason: its first paragraph (what follows a blank line is a trace), never cut at a
    newline inside it (one in a module name is escaped)."""
    text = str(e).strip().split("\n\n", 1)[0].strip()
    return show(text or type(e).__name__, 240)


def check_export_args(module, example_input, path) -> Path:
    """``export``'s arguments checked (InvalidType/InvalidValue); returns the path."""
    if not isinstance(module, nn.Module):
        raise InvalidType(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise InvalidType(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    if example_input.dim() < 1 or example_input.shape[0] < 1:
        raise InvalidValue(
            f"example_input must have a batch dimension first (N >= 1), got shape {tuple(example_input.shape)}"
        )
    return check_output_file("path", path)


def check_output_file(flag: str, path) -> Path:
    """A file path to write: its folder exists (and is a folder), the path is not a folder and
    resolves without a symbolic link loop. Checked before any work (an export takes seconds)."""
    path = checks.path_like(flag, path)
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InvalidValue(f"{flag} '{show(path)}' is a symbolic link loop (or goes through one)") from None
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise InvalidValue(f"{flag} '{show(path)}': {e.strerror or e}") from None
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise InvalidValue(f"{flag} '{show(path)}' is a folder; give a file path such as {show(path / 'model.onnx')}")
    parent = path.parent
    try:
        pst = os.stat(parent)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise InvalidValue(f"{flag} '{show(path)}': folder '{show(parent)}' does not exist") from None
        raise InvalidValue(f"{flag} '{show(path)}': '{show(parent)}': {e.strerror or e}") from None
    if not stat.S_ISDIR(pst.st_mode):
        raise InvalidValue(f"{flag} '{show(path)}': '{show(parent)}' is not a folder")
    return path


def export(module: nn.Module, example_input: torch.Tensor, path: str | os.PathLike) -> Path:
    """Export any torch module for training with accelc; written atomically to ``path``."""
    path = check_export_args(module, example_input, path)
    found = output_state(path)  # replaced only if still there, unchanged, once the export is done
    data = export_bytes(module, example_input)
    try:
        atomic_write_bytes(path, data, expect=found)
    except OSError as e:  # the folder went away, a full disk, no permission: one line
        raise AccelcError(f"cannot write '{show(path)}': {e.strerror or e}") from None
    return path
