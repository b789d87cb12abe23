"""The ``conv`` node kernel: Conv and ConvGrad nodes marked by the ``conv_onednn`` rule run on
oneDNN's convolution kernels (torch's ``conv2d`` / ``convolution_backward``), zero-copy, between
ORT segments. The same mathematics as ORT's kernels; ``--kernel conv=ort`` keeps ORT's."""

from __future__ import annotations

import onnx

from ...runtime.kernels import NodeKernel, store
from ...runtime.torch_ops import Conv2d


class OneDNNConv(NodeKernel):
    """A Conv (X, W[, B] -> Y) or ConvGrad (dY, X, W -> dX, dW, dB) node on oneDNN."""

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
            if mask[i]:
                store(self.outputs[i], t, env, bound)
        return None
