"""What a reused convolution is: its geometry, its reuse setting, its hyperplanes, and the names
under which the graph form carries them. Light (numpy only): the pass, the cost hook, the
algorithm and the kernels all build on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DOMAIN = "ai.accelc.reuse"  # the ONNX domain of the reuse nodes and their local functions
CONFIG_KEY = "accelc.reuse.config"  # node metadata: the layer's geometry and setting (JSON)
ORIGINAL_KEY = "accelc.reuse.original"  # node metadata: the replaced Conv/ConvGrad node (base64)
FORWARD_PREFIX = "ReuseConv_"
BACKWARD_PREFIX = "ReuseConvGrad_"
KERNEL_KEY = "reuse:"  # prefix of the reuse node kernels' statistics keys: "reuse:<layer>|forward"


@dataclass(frozen=True)
class ConvGeom:
    """Geometry of a 2-D convolution (group 1)."""

    C: int
    Co: int
    kh: int
    kw: int
    stride: tuple = (1, 1)
    pads: tuple = (0, 0, 0, 0)  # top, left, bottom, right (ONNX order: begin..., end...)
    dilation: tuple = (1, 1)

    @property
    def K(self) -> int:
        return self.C * self.kh * self.kw

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        pt, pl, pb, pr = self.pads
        ho = (h + pt + pb - self.dilation[0] * (self.kh - 1) - 1) // self.stride[0] + 1
        wo = (w + pl + pr - self.dilation[1] * (self.kw - 1) - 1) // self.stride[1] + 1
        return ho, wo


@dataclass(frozen=True)
class ReuseSpec:
    L: int
    H: int
    scope: str = "image"  # image | batch
    input_grad: str = "exact"  # exact | cluster

    def chunks(self, K: int) -> int:
        return -(-K // self.L)


def make_planes(G: int, L: int, H: int, seed: int) -> np.ndarray:
    """The fixed random hyperplanes of one layer: float32 [G, L, H], N(0, 1), from ``seed``."""
    return np.random.default_rng(seed).standard_normal((G, L, H)).astype(np.float32)


def geom_from_config(c: dict) -> ConvGeom:
    g = c["geom"]
    return ConvGeom(g["C"], g["Co"], g["kh"], g["kw"], tuple(g["stride"]), tuple(g["pads"]), tuple(g["dilation"]))


def layer_macs(cfg: dict, batch: int, remain: float | None) -> dict:
    """Multiply-adds per step of one conv layer (config as in the node metadata), exact (remain
    None) or reused at ``remain``."""
    geom = geom_from_config(cfg)
    ho, wo = geom.out_hw(*cfg["in_hw"])
    M, K, Co = batch * ho * wo, geom.K, geom.Co
    full = M * K * Co
    hashing = M * K * cfg["H"]
    if remain is None:
        return {"forward": full, "weight_grad": full, "input_grad": full, "total": 3 * full, "hash": hashing}
    fwd = remain * full + hashing  # centroid GEMM + hashing
    dw = remain * full
    dx = full if cfg["input_grad"] == "exact" else remain * full
    return {"forward": fwd, "weight_grad": dw, "input_grad": dx, "total": fwd + dw + dx, "hash": hashing}
