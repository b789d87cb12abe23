"""The ``conv`` node kernel: Conv and ConvGrad nodes marked by the ``conv_onednn`` rule run on
oneDNN's convolution kernels (torch's ``conv2d`` / ``convolution_backward``), zero-copy, between
ORT segments. The same mathematics as ORT's kernels; ``--kernel conv=ort`` keeps ORT's."""

from __future__ import annotations

import onnx
import torch
from onnx import helper

from ...runtime.kernels import NodeKernel, store


class OneDNNConv(NodeKernel):
    """A Conv (X, W[, B] -> Y) or ConvGrad (dY, X, W -> dX, dW, dB) node on oneDNN."""

    def __init__(self, node: onnx.NodeProto):
        super().__init__(node)
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        self.backward = node.op_type == "ConvGrad"
        pads = list(a.get("pads", [0, 0, 0, 0]))
        self.stride = list(a.get("strides", [1, 1]))
        self.dilation = list(a.get("dilations", [1, 1]))
        self.group = int(a.get("group", 1))
        self.sym = pads[0] == pads[2] and pads[1] == pads[3]
        self.pads = pads
        self.padding = [pads[0], pads[1]] if self.sym else [0, 0]

    def _in(self, x):
        if self.sym:
            return x
        pt, pl, pb, pr = self.pads
        return torch.nn.functional.pad(x, (pl, pr, pt, pb))

    def run(self, env: dict, bound: dict) -> None:
        if not self.backward:
            x, w = env[self.inputs[0]], env[self.inputs[1]]
            b = env[self.inputs[2]] if len(self.inputs) > 2 and self.inputs[2] else None
            y = torch.nn.functional.conv2d(self._in(x), w, b, self.stride, self.padding, self.dilation, self.group)
            store(self.outputs[0], y, env, bound)
            return None
        dy, x, w = env[self.inputs[0]], env[self.inputs[1]], env[self.inputs[2]]
        mask = [bool(i < len(self.outputs) and self.outputs[i] and self.wanted[i]) for i in range(3)]
        dx, dw, db = torch.ops.aten.convolution_backward(
            dy,
            self._in(x),
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
        for i, t in enumerate((dx, dw, db)):
            if mask[i]:
                store(self.outputs[i], t, env, bound)
        return None
