"""Loading and checking user models (the forward ONNX graph a user exports).

Everything here turns malformed input into a one-line :class:`AccelcError`. External data is
only read from inside the model's own folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from .errors import AccelcError, exception_text, show
from .resources import check_memory

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FLOAT_TYPES = (TensorProto.FLOAT,)
# The exported module's trainable parameters, written by accelc.export (a JSON list of names).
TRAINABLE_KEY = "accelc.trainable"
# Input slots that carry no gradient (shapes, limits, exponents, statistics): an initialiser used
# only there is a constant, not a parameter.
NON_DIFFERENTIABLE = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Pad": (1, 2, 3),
    "Resize": (1, 2, 3), "Upsample": (1,), "Clip": (1, 2), "Pow": (1,), "Squeeze": (1,),
    "Unsqueeze": (1,), "ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,), "ReduceMin": (1,),
    "Split": (1,), "Range": (0, 1, 2), "ConstantOfShape": (0,), "BatchNormalization": (3, 4),
    "Dropout": (1, 2), "Gather": (1,), "Where": (0,), "OneHot": (1, 2),
    # comparisons output booleans: no gradient reaches either side (a threshold is a constant)
    "Greater": (0, 1), "Less": (0, 1), "GreaterOrEqual": (0, 1), "LessOrEqual": (0, 1), "Equal": (0, 1),
}  # fmt: skip
# Input slots torch differentiates but ORT Training 1.19.2 does not: a parameter there cannot train
# (ORT's gradient builder fails), so it is refused with a rewrite that trains the same way.
NO_ORT_GRADIENT = {
    "Clip": {1: ("min bound", "torch.maximum(x, p) in place of torch.clamp(x, min=p)"),
             2: ("max bound", "torch.minimum(x, p) in place of torch.clamp(x, max=p)")},
    "Pow": {1: ("exponent", "torch.exp(p * torch.log(x)) for a positive base")},
}  # fmt: skip
FLOAT_BYTES = 4  # accelc trains float32 models


@dataclass
class ModelInfo:
    """What accelc needs to know about a forward model."""

    model: onnx.ModelProto
    path: Path | None
    sha256: str
    input_name: str
    input_shape: tuple  # (C, H, W), batch excluded
    output_name: str
    num_classes: int
    params: list[str]  # trainable, in graph order
    frozen: list[str]  # float initialisers that are not trained (BN running stats, constants)
    warnings: list[str] = field(default_factory=list)
    legalize_notes: list[str] = field(default_factory=list)
    # the model as given, where ``model`` is its legalised form (shape arithmetic folded at the input
    # size): what a stage at another input size (rescale's low resolution) is rebuilt from
    source: onnx.ModelProto | None = None
    _shapes: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def shapes(self, batch: int) -> dict[str, tuple]:
        """Static shapes of every forward tensor at batch size ``batch`` (inferred once per batch)."""
        if batch not in self._shapes:
            self._shapes[batch] = infer_shapes(self.model, batch)
        return self._shapes[batch]

    @property
    def param_count(self) -> int:
        inits = {t.name: t for t in self.model.graph.initializer}
        return int(sum(np.prod(inits[p].dims) for p in self.params))


def infer_shapes(base_model: onnx.ModelProto, batch: int, scalars: bool = False) -> dict[str, tuple]:
    """Static shapes of every forward tensor at a concrete batch size (with ``scalars``, the
    0-d tensors' ``()`` too)."""
    m = onnx.ModelProto()
    m.CopyFrom(base_model)
    inits = {t.name for t in m.graph.initializer}
    for vi in list(m.graph.input) + list(m.graph.output):
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = batch
    try:
        m = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    except Exception:
        pass
    shapes: dict[str, tuple] = {}
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims) and (dims or (scalars and vi.type.tensor_type.HasField("shape"))):
            shapes[vi.name] = tuple(int(d.dim_value) for d in dims)
    for t in m.graph.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes


def _check_path(path: Path) -> None:
    try:
        st = path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise AccelcError(f"'{path}' is a symbolic link loop (or goes through one)") from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise AccelcError(f"'{path}': no such file") from None
        raise AccelcError(f"'{path}': {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise AccelcError(f"'{path}' is a directory, not an ONNX model file")
    if not stat.S_ISREG(st.st_mode):  # a device (/dev/zero reads as size 0), a FIFO, a socket
        raise AccelcError(f"'{path}' is not a regular file (a device, FIFO or socket); give an ONNX model file")
    if st.st_size == 0:
        raise AccelcError(f"'{path}' is empty")


def _check_external_data(model: onnx.ModelProto, base: Path) -> None:
    """Refuse external-data references that point outside the model's folder; read nothing."""
    base = base.resolve()
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        loc = {e.key: e.value for e in t.external_data}.get("location", "")
        if not loc or os.path.isabs(loc):
            raise AccelcError(f"initialiser '{t.name}': external data location '{loc}' must be a relative path")
        target = (base / loc).resolve()
        if base != target and base not in target.parents:
            raise AccelcError(
                f"initialiser '{t.name}': external data '{loc}' points outside the model's folder; refused"
            )
        if not target.is_file():
            raise AccelcError(f"initialiser '{t.name}': external data file '{loc}' is missing")


def read_model(path: str | os.PathLike) -> tuple[onnx.ModelProto, str]:
    """Parse an ONNX file safely; return the model (external data loaded) and its sha256."""
    path = Path(path)
    _check_path(path)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:
        raise AccelcError(f"'{path}' is not a readable ONNX model (protobuf parse failed)") from None
    if not model.HasField("graph") or not model.graph.node:
        raise AccelcError(f"'{path}' is not an ONNX model (no graph nodes)")
    _check_external_data(model, path.parent)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as e:
        raise AccelcError(f"'{path}': cannot read external data: {e}") from None
    return model, h.hexdigest()


def declared_trainable(model: onnx.ModelProto) -> list[str] | None:
    """The trainable parameters the exporter wrote into the model (accelc.export does), or None."""
    text = {p.key: p.value for p in model.metadata_props}.get(TRAINABLE_KEY)
    if text is None:
        return None
    try:
        names = json.loads(text)
    except ValueError:
        raise AccelcError(f"model metadata '{TRAINABLE_KEY}' is not valid JSON") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise AccelcError(f"model metadata '{TRAINABLE_KEY}' must be a list of parameter names")
    return names


def _ungradable_params(model: onnx.ModelProto, trainable: list[str]):
    """(node, role, rewrite, [parameters]) for each input slot of NO_ORT_GRADIENT that one of the
    ``trainable`` parameters reaches through ops a gradient flows through (a Cast included): ORT
    builds no gradient there, so such a parameter would fail to train or miss part of its
    gradient."""
    producers = {o: n for n in model.graph.node for o in n.output}
    wanted = set(trainable)
    for node in model.graph.node:
        for slot, (role, rewrite) in NO_ORT_GRADIENT.get(node.op_type, {}).items():
            if slot >= len(node.input) or not node.input[slot]:
                continue
            found, seen, stack = [], set(), [node.input[slot]]
            while stack:
                name = stack.pop()
                if name in seen:
                    continue
                seen.add(name)
                if name in wanted:
                    found.append(name)
                    continue
                src = producers.get(name)
                if src is not None:
                    skip = NON_DIFFERENTIABLE.get(src.op_type, ())
                    stack.extend(i for k, i in enumerate(src.input) if i and k not in skip)
            if found:
                yield node, role, rewrite, sorted(found, key=trainable.index)


LEGALIZED_CONSTANT = "accelc.legalize."  # the name prefix of the constants compiler.legalize adds


def _trainable_params(model: onnx.ModelProto) -> tuple[list[str], list[str], str | None]:
    """(trainable, frozen, warning). Trainable: the parameters the exporter declared (accelc.export
    writes them), or else every float initialiser that feeds a node where a gradient flows (not
    only Conv/Gemm/BatchNorm weights: a layer scale used by Mul trains too). Constants (used only
    as shapes, limits, exponents, BatchNorm statistics) and generated 'onnx::' names stay frozen."""
    inits = {t.name: t for t in model.graph.initializer}
    floats = {n for n, t in inits.items() if t.data_type in FLOAT_TYPES}
    declared = declared_trainable(model)
    trainable: list[str] = []
    for node in model.graph.node:  # graph order: the optimizer state follows it
        skip = NON_DIFFERENTIABLE.get(node.op_type, ())
        for slot, name in enumerate(node.input):
            if name not in floats or name in trainable:
                continue
            if declared is not None:
                if name in declared:
                    trainable.append(name)
            elif slot not in skip and not name.startswith("onnx::"):
                trainable.append(name)
    for node, role, rewrite, names in _ungradable_params(model, trainable):
        if declared is None:  # only guessed to be parameters: ORT cannot train them, keep them constant
            trainable = [n for n in trainable if n not in names]
            continue
        raise AccelcError(
            f"the {role} of {node.op_type} '{show(node.name or node.output[0])}' is computed from parameter "
            f"'{show(names[0])}': ORT Training 1.19.2 cannot differentiate a {node.op_type} {role} (torch "
            f"does); write {rewrite}, or make it a buffer if it should not train"
        )
    # constants accelc's legalisation added (an AveragePool's depthwise kernel) stay constants of the
    # graph, as in a model legalised after this check: a stage made from the legalised model (rescale's
    # low resolution) must hold the same parameters as the model it switches to
    frozen = [n for n in inits if n in floats and n not in trainable and not n.startswith(LEGALIZED_CONSTANT)]
    warning = None
    if declared is not None:
        lost = [n for n in declared if n not in trainable]
        if lost:
            warning = (
                f"{len(lost)} parameter(s) torch trains are not initialisers the model uses "
                f"({', '.join(show(n) for n in lost[:5])}{', ...' if len(lost) > 5 else ''}): the exported graph does not use "
                f"them (unused, inlined or renamed), so they will not train"
            )
    else:
        stats = {
            node.input[s]
            for node in model.graph.node
            if node.op_type == "BatchNormalization"
            for s in (3, 4)
            if s < len(node.input)
        }
        # an initialiser used only where no gradient flows (a Clip bound, a Pow exponent, a shape)
        # is a constant by construction: no need to warn about it
        grad_slots = {
            name
            for node in model.graph.node
            for slot, name in enumerate(node.input)
            if slot not in NON_DIFFERENTIABLE.get(node.op_type, ())
        }
        unsure = [n for n in frozen if n not in stats and n in grad_slots]
        if unsure:
            warning = (
                f"{len(unsure)} float initialiser(s) are not trained ({', '.join(show(n) for n in unsure[:5])}"
                f"{', ...' if len(unsure) > 5 else ''}): the model does not say which are parameters "
                f"(export it with accelc.export to carry torch's own list)"
            )
    return trainable, frozen, warning


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [
        d.dim_param if d.HasField("dim_param") or not d.HasField("dim_value") else d.dim_value
        for d in vi.type.tensor_type.shape.dim
    ]


def _fmt_dims(dims) -> str:
    return "[" + ", ".join(show(d, 40) for d in dims) + "]"


def step_memory_bytes(info: ModelInfo, batch: int) -> int:
    """Estimated memory of one training step at ``batch``, from the static shapes alone (nothing is
    allocated): every forward activation is kept for the backward pass and gets a gradient of its
    own size (2x the activations, the input batch included), and each parameter has its value, its
    gradient and two AdamW moments (4x the parameters). Tensors whose shape is unknown count 0."""
    inits = info.model.graph.initializer
    params = sum(int(np.prod(list(t.dims), dtype=object)) for t in inits)
    return activation_bytes(info, batch) + FLOAT_BYTES * 4 * params


def activation_bytes(info: ModelInfo, batch: int) -> int:
    """The activations part of :func:`step_memory_bytes`: every forward tensor and its gradient."""
    inits = {t.name for t in info.model.graph.initializer}
    acts = sum(int(np.prod(shape, dtype=object)) for name, shape in info.shapes(batch).items() if name not in inits)
    return FLOAT_BYTES * 2 * acts


def check_step_memory(info: ModelInfo, batch: int, limit_gb: float | None = None, what: str = "training") -> int:
    """Refuse (one line, with the estimate) a training step at ``batch`` whose estimated memory
    (:func:`step_memory_bytes`) exceeds the limit (``limit_gb``, else the default of
    :func:`accelc.compiler.resources.memory_limit`); returns the estimate in bytes.
    ``what`` names the step: "validating the model", "training"."""
    nbytes = step_memory_bytes(info, batch)
    shape = _fmt_dims([batch, *info.input_shape])
    check_memory(f"{what} at batch {batch} (input {shape})", nbytes, limit_gb)
    return nbytes


def folded_batchnorm_hint(model: onnx.ModelProto) -> str | None:
    """Say so when a model looks exported in eval mode, where torch folds BatchNorm into Conv."""
    bn_eval = [
        n.name
        for n in model.graph.node
        if n.op_type == "BatchNormalization"
        and not any(a.name == "training_mode" and a.i == 1 for a in n.attribute)
        and len(n.output) == 1
    ]
    if bn_eval:
        return (
            f"BatchNormalization node(s) {bn_eval[:3]} are in inference mode: the model was exported "
            "in eval mode, so BatchNorm will not train; re-export with accelc.export()"
        )
    folded = [
        n.input[1]
        for n in model.graph.node
        if n.op_type == "Conv" and len(n.input) > 1 and n.input[1].startswith("onnx::Conv_")
    ]
    if folded:
        return (
            f"Conv weight(s) {folded[:3]} have generated names: BatchNorm looks folded into Conv "
            "(eval-mode export), which is wrong for training; re-export with accelc.export() "
            "or torch.onnx.export(..., training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)"
        )
    return None


def check_model(model: onnx.ModelProto, sha256: str = "", path: Path | None = None) -> ModelInfo:
    """Check that ``model`` is a CNN accelc can train; describe it. Raises AccelcError."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    for t in g.initializer:
        if any(d <= 0 for d in t.dims):
            raise AccelcError(f"initialiser '{t.name}' has a non-positive dimension {list(t.dims)}")
    for n in g.node:
        if n.domain not in ("", "ai.onnx"):
            raise AccelcError(
                f"node '{n.name or n.op_type}' uses op '{n.domain}::{n.op_type}' from an unknown "
                f"domain; accelc supports standard ONNX ops only"
            )
    data_inputs = [i for i in g.input if i.name not in inits]
    if len(data_inputs) != 1:
        raise AccelcError(
            f"model must have exactly one data input, found {len(data_inputs)}: {[i.name for i in data_inputs]}"
        )
    inp = data_inputs[0]
    if inp.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise AccelcError(f"input '{inp.name}' must be float32")
    dims = _dims(inp)
    if len(dims) < 2:
        raise AccelcError(f"input '{inp.name}' has shape {dims}: it needs a batch dimension and a sample shape")
    for d in dims[1:]:
        if not isinstance(d, int) or d <= 0:
            raise AccelcError(f"input '{inp.name}' has shape {dims}: sample dimensions must be positive integers")
    if isinstance(dims[0], int) and dims[0] <= 0:
        raise AccelcError(f"input '{inp.name}' has a non-positive batch dimension {dims[0]}")
    if len(g.output) != 1:
        raise AccelcError(f"model must have exactly one output (the logits), found {len(g.output)}")
    out = g.output[0]
    odims = _dims(out)
    if len(odims) != 2 or not isinstance(odims[1], int) or odims[1] < 2:
        raise AccelcError(f"output '{out.name}' has shape {odims}: expected logits [batch, classes]")
    if model.ir_version > 10:  # ORT 1.19.2 loads IR <= 10; onnx >= 1.17 writes newer ones
        model.ir_version = 10
        info_note = "input model IR version lowered to 10 for ORT 1.19.2"
    else:
        info_note = None
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise AccelcError(f"model fails the ONNX checker: {exception_text(e, 600)}") from None
    for n in g.node:  # a Conv reading the data input needs the batch dimension in front
        if n.op_type == "Conv" and n.input and n.input[0] == inp.name and len(n.input) > 1:
            w = next((t for t in g.initializer if t.name == n.input[1]), None)
            if w is not None and len(w.dims) != len(dims):
                raise AccelcError(
                    f"input '{inp.name}' has shape {dims} but Conv '{n.name}' needs a "
                    f"{len(w.dims)}-D input [batch, C, ...]: is the batch dimension missing?"
                )
    if len(dims) != 4:
        # the data loaders, the synthetic data and the passes all work on images; a model of any
        # other input rank would compile and then fail in train
        raise AccelcError(
            f"accelc trains image models with an input [N, C, H, W]; this model's input "
            f"'{show(inp.name)}' is {_fmt_dims(dims)}"
        )
    params, frozen, frozen_warning = _trainable_params(model)
    if not params:
        raise AccelcError("model has no trainable parameters (no Conv/Gemm/MatMul weight initialisers)")
    info = ModelInfo(
        model=model,
        path=path,
        sha256=sha256,
        input_name=inp.name,
        input_shape=tuple(dims[1:]),
        output_name=out.name,
        num_classes=int(odims[1]),
        params=params,
        frozen=frozen,
    )
    if info_note:
        info.legalize_notes.append(info_note)
    if frozen_warning:
        info.warnings.append(frozen_warning)
    hint = folded_batchnorm_hint(model)
    if hint:
        info.warnings.append(hint)
    return info


def load_model(path: str | os.PathLike) -> ModelInfo:
    model, sha = read_model(path)
    return check_model(model, sha, Path(path))
