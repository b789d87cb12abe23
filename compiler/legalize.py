"""Legalisation: rewrite forward-graph constructs that ORT Training 1.19.2 cannot train (or
cannot train safely) into exact equivalents, before the gradient graph is built. One function per
construct; each returns the nodes that replace one node and a note, or None to keep it.

* ``AveragePool``: ORT 1.19.2's CPU ``AveragePoolGrad`` kills the process with SIGFPE
  (seen on this machine for a plain 4×4/4 pool). An average pool with ``count_include_pad=1``
  (or no padding) equals a depthwise convolution whose kernel is 1/(kh·kw) everywhere; that
  Conv (a frozen constant weight) trains through ORT's ConvGrad. Pools that cannot be expressed
  so (``count_include_pad=0`` with padding, ``ceil_mode=1`` with partial windows) are refused.
* ``HardSigmoid`` / ``HardSwish`` (MobileNetV3, GhostNet): ORT 1.19.2 has no gradient builder
  for them. HardSigmoid(x) = Clip(αx + β, 0, 1) and HardSwish(x) = x · HardSigmoid(x) with
  α = 1/6, β = 1/2 — the same values, built from Mul, Add and Clip, which ORT differentiates.
* ``LayerNormalization`` with only its first output (as torch exports it; ConvNeXt): ORT's
  gradient builder reads the optional Mean and InvStdDev outputs and fails on an assertion
  without them. They are added (unused by the forward), which changes no value.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import provenance
from .errors import AccelcError
from .model import infer_shapes

PASS = "legalize"


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _const(name: str, value: float) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], name=name, value=numpy_helper.from_array(np.array(value, np.float32), name)
    )


def _average_pool(n, shapes, m):
    a = _attrs(n)
    k = list(a.get("kernel_shape", []))
    strides = list(a.get("strides", [1] * len(k)))
    pads = list(a.get("pads", [0] * 2 * len(k)))
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    xs = shapes.get(n.input[0])
    where = f"AveragePool '{n.name}'"
    if not xs or len(xs) != 4 or len(k) != 2:
        raise AccelcError(
            f"{where}: needs a known 4-D input shape to be trained safely on ORT 1.19.2 "
            f"(its AveragePoolGrad crashes the process)"
        )
    if auto_pad not in ("NOTSET", "VALID"):
        raise AccelcError(
            f"{where}: auto_pad={auto_pad} is not supported (ORT 1.19.2's AveragePoolGrad "
            f"crashes; accelc rewrites pools with explicit pads only)"
        )
    if any(pads) and not a.get("count_include_pad", 0):
        raise AccelcError(
            f"{where}: padded average pooling with count_include_pad=0 cannot be trained on "
            f"ORT 1.19.2 (AveragePoolGrad crashes the process) and has no exact Conv form"
        )
    if a.get("ceil_mode", 0):
        for i in range(2):
            size = xs[2 + i] + pads[i] + pads[i + 2] - k[i]
            if size % strides[i]:
                raise AccelcError(f"{where}: ceil_mode=1 with partial windows cannot be trained on ORT 1.19.2")
    c = xs[1]
    wname = f"accelc.legalize.{n.name or n.output[0]}.avgpool_kernel".replace("/", "_")
    w = np.full((c, 1, k[0], k[1]), 1.0 / (k[0] * k[1]), dtype=np.float32)
    m.graph.initializer.append(numpy_helper.from_array(w, wname))
    conv = helper.make_node(
        "Conv",
        [n.input[0], wname],
        [n.output[0]],
        name=(n.name or "avgpool") + "_as_conv",
        group=c,
        kernel_shape=k,
        strides=strides,
        pads=pads,
    )
    note = f"AveragePool {k[0]}x{k[1]}/{strides[0]} as depthwise Conv (ORT 1.19.2 AveragePoolGrad crashes)"
    provenance.tag(conv, PASS, note=note)
    return [conv], (
        f"AveragePool '{n.name}' rewritten as a frozen depthwise Conv (ORT 1.19.2's AveragePoolGrad crashes with SIGFPE)"
    )


def _hard(n, shapes, m):
    """HardSigmoid as Clip(αx + β, 0, 1); HardSwish as x · that (α = 1/6, β = 1/2)."""
    a = _attrs(n)
    swish = n.op_type == "HardSwish"
    alpha, beta = (1.0 / 6.0, 0.5) if swish else (float(a.get("alpha", 0.2)), float(a.get("beta", 0.5)))
    base = (n.name or n.output[0]).replace("/", "_")
    x, y = n.input[0], n.output[0]
    t = [f"{base}/legal_{k}" for k in ("alpha", "beta", "zero", "one", "ax", "axb", "hsig")]
    nodes = [_const(t[0], alpha), _const(t[1], beta), _const(t[2], 0.0), _const(t[3], 1.0)]
    nodes += [
        helper.make_node("Mul", [x, t[0]], [t[4]], name=t[4]),
        helper.make_node("Add", [t[4], t[1]], [t[5]], name=t[5]),
        helper.make_node("Clip", [t[5], t[2], t[3]], [t[6] if swish else y], name=t[6]),
    ]
    if swish:
        nodes.append(helper.make_node("Mul", [x, t[6]], [y], name=f"{base}/legal_hswish"))
    for node in nodes:
        provenance.tag(node, PASS, note=f"{n.op_type} from Mul/Add/Clip (ORT 1.19.2 has no gradient for it)")
    return nodes, f"{n.op_type} '{n.name}' rewritten with Mul/Add/Clip (no ORT 1.19.2 gradient builder for it)"


def _layer_norm(n, shapes, m):
    if len(n.output) >= 3 and all(n.output[:3]):
        return None
    node = onnx.NodeProto()
    node.CopyFrom(n)
    base = (n.name or n.output[0]).replace("/", "_")
    outs = list(node.output) + [""] * (3 - len(node.output))
    outs = [o or f"{base}/legal_{k}" for o, k in zip(outs, ("y", "mean", "inv_std"))]
    del node.output[:]
    node.output.extend(outs)
    provenance.tag(node, PASS, note="Mean and InvStdDev outputs added (ORT 1.19.2's gradient builder reads them)")
    return [node], f"LayerNormalization '{n.name}': Mean and InvStdDev outputs added for ORT 1.19.2's gradient"


RULES = {"AveragePool": _average_pool, "HardSigmoid": _hard, "HardSwish": _hard, "LayerNormalization": _layer_norm}


def legalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Return a legalised copy of the forward model and notes on what changed."""
    if not any(n.op_type in RULES for n in model.graph.node):
        return model, []
    m = onnx.ModelProto()
    m.CopyFrom(model)
    shapes = infer_shapes(m, 2) if any(n.op_type == "AveragePool" for n in m.graph.node) else {}
    notes = []
    new_nodes = []
    for n in m.graph.node:
        rule = RULES.get(n.op_type)
        done = rule(n, shapes, m) if rule else None
        if done is None:
            new_nodes.append(n)
            continue
        nodes, note = done
        new_nodes.extend(nodes)
        notes.append(note)
    if not notes:
        return model, []
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    if m.ir_version < 10 and any(n.metadata_props for n in m.graph.node):
        m.ir_version = 10
    return m, notes
