"""The cost hook of the reuse nodes (what ``accelc inspect`` and the compile report count).

Compile-time bound: the remain ratio is known only while training (the reuse algorithm reports
the measured one), so the forward's centroid GEMM is counted at remain ratio 1, plus hashing; the
backward is counted like the ConvGrad it replaces."""

from __future__ import annotations

import json

from ...compiler.cost import conv_grad_flops, conv_macs, numel
from ...compiler.graph import TrainingGraph
from .spec import BACKWARD_PREFIX, CONFIG_KEY, DOMAIN, FORWARD_PREFIX


def is_reuse_node(node) -> bool:
    return node.domain == DOMAIN and node.op.startswith((FORWARD_PREFIX, BACKWARD_PREFIX))


def reuse_flops(tg: TrainingGraph, node) -> float:
    if node.op.startswith(BACKWARD_PREFIX):
        return conv_grad_flops(tg, node)
    ins = [t.name for t in node.inputs]
    out = node.outputs[0].name
    macs = conv_macs(tg, ins[1], out)
    flops = 2.0 * macs + numel(tg.shape(out))
    text = tg.tags.get(node.name, {}).get(CONFIG_KEY)
    cfg = json.loads(text) if text else {}
    if cfg and tg.shape(ins[1]):
        flops += 2.0 * macs / tg.shape(ins[1])[0] * cfg.get("H", 0)
    return flops
