"""The ``conv`` node kernel: Conv and ConvGrad nodes marked by the ``conv_onednn`` rule run on
oneDNN's convolution kernels (torch's ``conv2d`` / ``convolution_backward``), zero-copy, between
ORT segments. The same mathematics as ORT's kernels; ``--kernel conv=ort`` keeps ORT's."""

from __future__ import annotations

from ...runtime.torch_ops import ConvKernel as OneDNNConv

__all__ = ["OneDNNConv"]
