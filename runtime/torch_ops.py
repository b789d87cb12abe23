"""ONNX nodes computed with torch's kernels (oneDNN on CPU), for node kernels that run them
between ORT segments: the arithmetic of ONNX ``Conv`` and ORT Training's ``ConvGrad`` with ONNX's
attributes (asymmetric padding included). Generic: no pass is named here."""

from __future__ import annotations

import onnx
import torch
from onnx import helper


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
