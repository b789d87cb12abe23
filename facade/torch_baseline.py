"""The torch eager baseline of any ONNX model accelc accepts (``accelc bench --model my.onnx``).

The module comes from onnx2torch (a maintained ONNX -> torch.fx converter) and starts from the
ONNX model's own initialisers: the same initial weights the compiled artifacts' checkpoint holds.
accelc adds what a faithful *training* baseline needs on top of the conversion:

* BatchNorm as ``accelc.export`` writes it (training mode, with the running-statistic outputs
  ORT's gradient builder reads): the extra outputs are dropped before conversion when nothing
  reads them (onnx2torch converts inference-form BatchNorm; torch's BatchNorm in ``train()`` mode
  computes and updates the same statistics);
* the trainable set equals accelc's: every parameter of the torch module is mapped back to the
  ONNX initialiser it came from (the conversion is run once more on a copy whose trainable
  initialisers hold distinct constant values), initialisers accelc keeps frozen are frozen in
  torch too, one onnx2torch holds as a constant buffer (a Mul's layer scale) becomes a parameter
  again, and a model whose trainable initialiser is missing from the module, or becomes two torch
  tensors, is refused (its torch training would differ).

torchvision's wheel for torch 2.13 is a CUDA build whose compiled ops cannot load beside the CPU
torch, and onnx2torch imports torchvision (for its NMS and RoIAlign converters); where that import
fails on the missing ``torchvision::nms`` schema, the two schemas torchvision's Python side needs
are defined (as ``benchmarks/model_coverage.py`` does), so classification models convert (the
detection ops stay unavailable).
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import numpy_helper

from .compiler.errors import AccelcError, exception_text, show

TAG_BASE = 4096  # trainable initialiser k is tagged TAG_BASE + k: a value no real parameter tensor holds throughout
TAG_LIMIT = (1 << 24) - TAG_BASE  # float32 holds these integers exactly


def torchvision_without_ops() -> None:
    """Make ``import torchvision`` work beside the CPU torch: its compiled ops cannot load there, so
    the two operator definitions its Python code needs at import are given without kernels."""
    import torch

    if hasattr(torch.ops, "torchvision") and hasattr(torch.ops.torchvision, "nms"):
        return
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    torchvision_without_ops.lib = lib  # the definitions live as long as the library object


def _onnx2torch():
    try:
        import onnx2torch

        return onnx2torch
    except ImportError as e:
        if e.name == "onnx2torch":
            raise AccelcError(
                "the torch baseline of an ONNX model needs onnx2torch (pip install onnx2torch==1.5.15)"
            ) from None
        raise AccelcError(f"onnx2torch cannot be imported: {show(e, 160)}") from None
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise AccelcError(f"onnx2torch cannot be imported: {show(e, 160)}") from None
    # torchvision's compiled ops did not load: define their schemas, drop the half-imported modules, retry
    torchvision_without_ops()
    for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "onnx2torch")]:
        del sys.modules[name]
    try:
        import onnx2torch

        return onnx2torch
    except Exception as e:
        raise AccelcError(
            f"onnx2torch cannot be imported beside this torch: {type(e).__name__}: {show(e, 160)}"
        ) from None


def _convertible(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """A copy of ``model`` with training-mode BatchNorm's unused statistic outputs removed."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    read = {x for n in m.graph.node for x in n.input} | {o.name for o in m.graph.output}
    for n in m.graph.node:
        if n.op_type == "Dropout" and len(n.output) > 1:  # the mask: onnx2torch's Dropout returns one tensor
            if n.output[1] and n.output[1] in read:
                raise AccelcError(
                    f"no torch baseline for '{show(where)}': the mask of Dropout '{show(n.name or n.output[0])}' "
                    "is read by the graph"
                )
            del n.output[1:]
        if n.op_type == "BatchNormalization" and len(n.output) > 1:
            used = [o for o in n.output[1:] if o and o in read]
            if used:
                raise AccelcError(
                    f"no torch baseline for '{show(where)}': BatchNormalization '{show(n.name or n.output[0])}' "
                    f"has its running statistic {show(used[0])} read by the graph"
                )
            del n.output[1:]
            # the inference form ONNX allows with one output; torch's BatchNorm in train() mode
            # normalises with the batch statistics and updates the running ones all the same
            keep = [a for a in n.attribute if a.name != "training_mode"]
            del n.attribute[:]
            n.attribute.extend(keep)
    try:  # onnx2torch reads the shapes of intermediate tensors (e.g. BatchNorm's input rank)
        return onnx.shape_inference.infer_shapes(m, strict_mode=True)
    except Exception as e:
        raise AccelcError(
            f"no torch baseline for '{show(where)}': onnx cannot infer its shapes ({show(e, 160)})"
        ) from None


def _convert(onnx2torch, model: onnx.ModelProto, where: str):
    try:
        return onnx2torch.convert(model)
    except AccelcError:
        raise
    except Exception as e:  # an op or attribute onnx2torch does not convert: its reason, one line
        raise AccelcError(
            f"no torch baseline for '{show(where)}': onnx2torch cannot convert it ({exception_text(e, 200)})"
        ) from None


def _tagged(model: onnx.ModelProto, params: list[str]) -> onnx.ModelProto:
    """``model`` with trainable initialiser k filled with the constant TAG_BASE + k."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    index = {n: k for k, n in enumerate(params)}
    for i, t in enumerate(m.graph.initializer):
        if t.name in index:
            a = numpy_helper.to_array(t)
            m.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(np.full(a.shape, TAG_BASE + index[t.name], dtype=a.dtype), t.name)
            )
    return m


def _source(t, n_params: int) -> int | None:
    """The trainable initialiser a tagged tensor came from, or None."""
    if t.numel() == 0 or not t.is_floating_point():
        return None
    v = float(t.reshape(-1)[0])
    if v != int(v) or not TAG_BASE <= v < TAG_BASE + n_params or not bool((t == v).all()):
        return None
    return int(v) - TAG_BASE


def torch_module_for(model_path, info=None):
    """A ``torch.nn.Module`` computing the ONNX model at ``model_path`` (``info``: its
    :class:`~accelc.compiler.model.ModelInfo`, loaded when None) from its own initial weights,
    training the parameters accelc trains and only those. AccelcError with the reason when no
    faithful torch module can be built."""
    import torch  # heavy

    from .compiler.model import load_model

    info = info if info is not None else load_model(model_path)
    where = str(model_path)
    params = list(info.params)
    if len(params) >= TAG_LIMIT:
        raise AccelcError(f"no torch baseline for '{show(where)}': {len(params)} parameters are too many to map")
    onnx2torch = _onnx2torch()
    model = _convertible(info.model, where)
    module = _convert(onnx2torch, model, where)
    tagged = _convert(onnx2torch, _tagged(model, params), where)
    got = dict(tagged.named_parameters())
    same = list(got) == [k for k, _ in module.named_parameters()]
    if not same or [k for k, _ in tagged.named_buffers()] != [k for k, _ in module.named_buffers()]:
        raise AccelcError(f"no torch baseline for '{show(where)}': onnx2torch converts it differently each time")
    held: dict[int, str] = {}
    for name, t in got.items():
        k = _source(t.detach(), len(params))
        if k is None:  # a constant accelc does not train (frozen initialiser): frozen in torch too
            module.get_parameter(name).requires_grad_(False)
            continue
        if k in held:
            raise AccelcError(
                f"no torch baseline for '{show(where)}': parameter {show(params[k])} becomes two torch parameters "
                f"({show(held[k])}, {show(name)}), which would train apart"
            )
        held[k] = name
    for name, t in tagged.named_buffers():  # a parameter onnx2torch keeps as a constant (e.g. a Mul's
        k = _source(t, len(params))  # layer scale): made a torch parameter again, so it trains
        if k is None:
            continue
        if k in held:
            raise AccelcError(
                f"no torch baseline for '{show(where)}': parameter {show(params[k])} becomes two torch tensors "
                f"({show(held[k])}, {show(name)}), which would train apart"
            )
        prefix, _, attr = name.rpartition(".")
        owner = module.get_submodule(prefix) if prefix else module
        value = owner._buffers.pop(attr)
        owner.register_parameter(attr, torch.nn.Parameter(value.detach().clone()))
        held[k] = name
    constants = [params[k] for k in range(len(params)) if k not in held]
    if constants:
        raise AccelcError(
            f"no torch baseline for '{show(where)}': onnx2torch holds parameter {show(constants[0])} as a constant"
            + (f" (+{len(constants) - 1} more)" if len(constants) > 1 else "")
            + ", so torch would not train it"
        )
    module.accelc_param_names = {name: params[k] for k, name in held.items()}  # torch name -> ONNX name
    module.train()
    for name, p in module.named_parameters():
        if p.dtype != torch.float32:
            raise AccelcError(
                f"no torch baseline for '{show(where)}': parameter {show(name)} is {p.dtype}, not float32"
            )
    return module


RANDOM_OPS = {
    "Dropout",
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Bernoulli",
    "Multinomial",
}


def check_same_loss(module, session, x, y, rtol: float = 1e-4) -> dict:
    """The torch module and an ORT :class:`~accelc.runtime.session.TrainingSession` of the same
    model give the same loss on one batch: in evaluation mode (the artifacts' eval graph: BatchNorm
    on running statistics, no dropout) and -- for a model without random ops, whose training-mode
    loss is deterministic -- in training mode (batch statistics). Nothing is updated: the module is
    copied, the session only computes gradients. Returns the losses; AccelcError when a pair
    differs by more than ``rtol`` (a converter that changed the model's arithmetic)."""
    import copy

    import torch
    import torch.nn.functional as F

    xt = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.as_tensor(np.asarray(y, dtype=np.int64))
    m = copy.deepcopy(module)  # the module's own state (BatchNorm statistics) is kept

    def torch_loss(train: bool) -> float:
        m.train(train)
        with torch.no_grad():
            return float(F.cross_entropy(m(xt), yt))

    out = {"eval": {"torch_loss": torch_loss(False), "ort_loss": session.evaluate_batch(x, y)[0]}}
    random = {n.op_type for n in session.info.model.graph.node} & RANDOM_OPS
    random |= {type(s).__name__ for s in m.modules() if "Dropout" in type(s).__name__}
    random = sorted(random)
    if random:
        out["train"] = None  # random masks differ between engines: not comparable step for step
        out["train_skipped"] = f"the model has random ops ({', '.join(random)})"
    else:
        out["train"] = {"torch_loss": torch_loss(True), "ort_loss": session.compute_gradients(x, y)[0]}
    for mode in ("train", "eval"):
        pair = out[mode]
        if pair is not None and not abs(pair["torch_loss"] - pair["ort_loss"]) <= rtol * max(
            abs(pair["ort_loss"]), 1e-12
        ):
            raise AccelcError(
                f"the torch baseline's {mode}-mode loss on the first batch is {pair['torch_loss']:.6g}, ONNX Runtime's "
                f"{pair['ort_loss']:.6g}: the converted module does not compute the model"
            )
    out["rtol"] = rtol
    return out
