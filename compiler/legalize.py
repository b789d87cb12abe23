"""Legalisation: rewrite forward-graph constructs that ORT Training 1.19.2 cannot train safely
into exact equivalents, before the gradient graph is built.

* ``AveragePool``: ORT 1.19.2's CPU ``AveragePoolGrad`` kills the process with SIGFPE
  (seen on this machine for a plain 4×4/4 pool). An average pool with ``count_include_pad=1``
  (or no padding) equals a depthwise convolution whose kernel is 1/(kh·kw) everywhere; that
  Conv (a frozen constant weight) trains through ORT's ConvGrad. Pools that cannot be expressed
  so (``count_include_pad=0`` with padding, ``ceil_mode=1`` with partial windows) are refused.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import provenance
from .errors import AccelcError
from .model import infer_shapes


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def legalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Return a legalised copy of the forward model and notes on what changed."""
    pools = [n for n in model.graph.node if n.op_type == "AveragePool"]
    if not pools:
        return model, []
    m = onnx.ModelProto()
    m.CopyFrom(model)
    shapes = infer_shapes(m, 2)
    notes = []
    new_nodes = []
    for n in m.graph.node:
        if n.op_type != "AveragePool":
            new_nodes.append(n)
            continue
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
        provenance.tag(
            conv,
            "legalize",
            note=f"AveragePool {k[0]}x{k[1]}/{strides[0]} as depthwise Conv (ORT 1.19.2 AveragePoolGrad crashes)",
        )
        new_nodes.append(conv)
        notes.append(
            f"AveragePool '{n.name}' rewritten as a frozen depthwise Conv (ORT 1.19.2's AveragePoolGrad "
            f"crashes with SIGFPE)"
        )
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    if m.ir_version < 10 and any(n.metadata_props for n in m.graph.node):
        m.ir_version = 10
    return m, notes
