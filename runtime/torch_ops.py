"""ONNX nodes computed with torch's kernels (oneDNN on CPU), for node kernels that run them
between ORT segments: the arithmetic of ONNX ``Conv`` and ORT Training's ``ConvGrad`` with ONNX's
attributes (asymmetric padding included). Generic: no pass is named here."""

from __future__ import annotations

import onnx
import torch
from onnx import helper

from .kernels import FRESH, NodeKernel, store


class Conv2d:
    """An ONNX 2-D Conv/ConvGrad node's attributes, and its forward and backward in torch."""

    def __init__(self, node: onnx.NodeProto):
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        self.pads = list(a.get("pads", [0, 0, 0, 0]))
        self.stride = list(a.get("strides", [1, 1]))
        self.dilation = list(a.get("dilations", [1, 1]))
        self.group = int(a.get("group", 1))
        p = self.pads
        self.sym = p[0] == p[2] and p[1] == p[3]
        self.padding = [p[0], p[1]] if self.sym else [0, 0]  # torch pads symmetrically; else padded first

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        if self.sym:
            return x
        pt, pl, pb, pr = self.pads
        return torch.nn.functional.pad(x, (pl, pr, pt, pb))

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return torch.nn.functional.conv2d(self.pad(x), w, b, self.stride, self.padding, self.dilation, self.group)

    def backward(self, dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mask: list[bool]) -> tuple:
        """(dX, dW, dB) of ``mask``'s wanted outputs (None for the others)."""
        dx, dw, db = torch.ops.aten.convolution_backward(
            dy,
            self.pad(x),
            w,
            [w.shape[0]] if mask[2] else None,
            self.stride,
            self.padding,
            self.dilation,
            False,
            [0, 0],
            self.group,
            mask,
        )
        if mask[0] and not self.sym:
            pt, pl = self.pads[0], self.pads[1]
            dx = dx[:, :, pt : pt + x.shape[2], pl : pl + x.shape[3]]
        return dx, dw, db


class ConvKernel(NodeKernel):
    """A 2-D Conv (X, W[, B] -> Y) or ConvGrad (dY, X, W -> dX, dW, dB) node on oneDNN, zero-copy.
    oneDNN computes in the layout of its input (NCHW in, NCHW out; NHWC in, NHWC out)."""

    any_layout = True
    stateless = True
    memory = FRESH

    def __init__(self, node: onnx.NodeProto):
        super().__init__(node)
        self.backward = node.op_type == "ConvGrad"
        self.conv = Conv2d(node)

    def run(self, env: dict, bound: dict) -> None:
        if not self.backward:
            x, w = env[self.inputs[0]], env[self.inputs[1]]
            b = env[self.inputs[2]] if len(self.inputs) > 2 and self.inputs[2] else None
            store(self.outputs[0], self.conv.forward(x, w, b), env, bound)
            return None
        dy, x, w = env[self.inputs[0]], env[self.inputs[1]], env[self.inputs[2]]
        mask = [bool(i < len(self.outputs) and self.outputs[i] and self.wanted[i]) for i in range(3)]
        for i, t in enumerate(self.conv.backward(dy, x, w, mask)):
            if mask[i]:  # dW and dB are new tensors (dX a slice where padding was asymmetric)
                store(self.outputs[i], t, env, bound, fresh=i > 0)
        return None
