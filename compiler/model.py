"""Loading and checking user models (the forward ONNX graph a user exports).

Everything here turns malformed input into a one-line :class:`AccelcError`. External data is
only read from inside the model's own folder.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from .errors import AccelcError

# Ops whose float initialiser inputs are trainable parameters, and which input slots hold them.
PARAM_SLOTS = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (0, 1),
    "Add": (0, 1),  # only a bias add that directly follows a MatMul, see _trainable_params
    "BatchNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "LayerNormalization": (1, 2),
}
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FLOAT_TYPES = (TensorProto.FLOAT,)
# Standard ONNX ops that the ORT 1.19 gradient builder handles (the CNN vocabulary we support).
SUPPORTED_OPS = {
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "Gelu",
    "Softmax",
    "LogSoftmax",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "BatchNormalization",
    "Flatten",
    "Reshape",
    "Transpose",
    "Concat",
    "Split",
    "Slice",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Dropout",
    "Shape",
    "Gather",
    "Constant",
    "Cast",
    "Pad",
    "ReduceMean",
    "ReduceSum",
    "Clip",
    "Sqrt",
    "Pow",
    "Neg",
    "Exp",
    "HardSigmoid",
    "HardSwish",
    "Expand",
    "Where",
    "Equal",
    "Less",
    "Greater",
    "Range",
    "ConstantOfShape",
    "InstanceNormalization",
    "LayerNormalization",
    "Resize",
    "Upsample",
}


@dataclass
class ModelInfo:
    """What accelc needs to know about a forward model."""

    model: onnx.ModelProto
    path: Path | None
    sha256: str
    input_name: str
    input_shape: tuple  # (C, H, W) or (F,), batch excluded
    output_name: str
    num_classes: int
    params: list[str]  # trainable, in graph order
    frozen: list[str]  # float initialisers that are not trained (BN running stats, constants)
    warnings: list[str] = field(default_factory=list)
    legalize_notes: list[str] = field(default_factory=list)
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


def infer_shapes(base_model: onnx.ModelProto, batch: int) -> dict[str, tuple]:
    """Static shapes of every forward tensor at a concrete batch size."""
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
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(int(d.dim_value) for d in dims)
    for t in m.graph.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes


def _check_path(path: Path) -> None:
    if not path.exists():
        raise AccelcError(f"'{path}': no such file")
    if path.is_dir():
        raise AccelcError(f"'{path}' is a directory, not an ONNX model file")
    if path.stat().st_size == 0:
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


def _trainable_params(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    trainable: list[str] = []
    for node in model.graph.node:
        slots = PARAM_SLOTS.get(node.op_type, ())
        if node.op_type == "Add":
            # a MatMul bias: Add(MatMul(x, W), b)
            if not any(i in producers and producers[i].op_type == "MatMul" for i in node.input):
                continue
        for s in slots:
            if s < len(node.input) and node.input[s] in inits:
                name = node.input[s]
                if inits[name].data_type in FLOAT_TYPES and name not in trainable:
                    trainable.append(name)
    frozen = [n for n, t in inits.items() if t.data_type in FLOAT_TYPES and n not in trainable]
    return trainable, frozen


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [
        d.dim_param if d.HasField("dim_param") or not d.HasField("dim_value") else d.dim_value
        for d in vi.type.tensor_type.shape.dim
    ]


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
        if n.op_type not in SUPPORTED_OPS:
            raise AccelcError(
                f"unsupported op '{n.op_type}' (node '{n.name}'): ORT Training has no gradient for it "
                f"or accelc does not support it"
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
        first = str(e).strip().splitlines()[0]
        raise AccelcError(f"model fails the ONNX checker: {first}") from None
    for n in g.node:  # a Conv reading the data input needs the batch dimension in front
        if n.op_type == "Conv" and n.input and n.input[0] == inp.name and len(n.input) > 1:
            w = next((t for t in g.initializer if t.name == n.input[1]), None)
            if w is not None and len(w.dims) != len(dims):
                raise AccelcError(
                    f"input '{inp.name}' has shape {dims} but Conv '{n.name}' needs a "
                    f"{len(w.dims)}-D input [batch, C, ...]: is the batch dimension missing?"
                )
    params, frozen = _trainable_params(model)
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
    hint = folded_batchnorm_hint(model)
    if hint:
        info.warnings.append(hint)
    return info


def load_model(path: str | os.PathLike) -> ModelInfo:
    model, sha = read_model(path)
    return check_model(model, sha, Path(path))
