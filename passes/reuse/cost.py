"""The cost hook of the reuse nodes (what ``accelc inspect`` and the compile report count).

How many clusters a reused conv finds is known only while training (the reuse algorithm reports
the measured remain ratio, clusters / rows). At compile time a node is counted

* **expected**: at the remain ratio expected if the H-bit hash codes of a chunk's rows were spread
  uniformly over the 2^H buckets: n rows per scope (an image's Ho·Wo rows, or the batch's) fill
  B(1 − (1 − 1/B)^n) of the B = 2^H buckets on average. Real activations are correlated and
  cluster more (measured: 0.11 on VGG's features.3 where this gives 0.31), so it errs towards
  more FLOPs;
* **bound**: at the largest remain ratio possible, min(1, 2^H / n) (a chunk cannot have more
  clusters than buckets or rows).

Forward: hashing (G·L·H multiply-adds per row), centroid sums, the centroid GEMM at the remain
ratio, the per-row sum over chunks, the bias. Backward: per-cluster dY sums, dW from centroids at
the remain ratio, dX exact (the conv's own) or per cluster, dB. The multiply-adds are
:func:`~accelc.passes.reuse.spec.layer_macs`'s, the algorithm's accounting, at 2 FLOPs each.
"""

from __future__ import annotations

import json
import math

from ...compiler.cost import conv_grad_flops, numel
from ...compiler.graph import TrainingGraph
from .spec import BACKWARD_PREFIX, CONFIG_KEY, DOMAIN, FORWARD_PREFIX, geom_from_config, layer_macs


def is_reuse_node(node) -> bool:
    return node.domain == DOMAIN and node.op.startswith((FORWARD_PREFIX, BACKWARD_PREFIX))


def cross_batch(cfg: dict) -> bool:
    """Whether the layer keeps its clusters across batches (CR: the GEMMs run on the whole table)."""
    return int(cfg.get("cross_batch", 0) or 0) >= 2


def rows_per_scope(cfg: dict, batch: int) -> int:
    """Rows that share clusters: an image's output positions (scope image) or the batch's (scope
    batch, and clusters kept across batches, which span the batch whatever the scope)."""
    ho, wo = geom_from_config(cfg).out_hw(*cfg["in_hw"])
    return ho * wo * (batch if cfg.get("scope") == "batch" or cross_batch(cfg) else 1)


def expected_remain(cfg: dict, batch: int) -> float:
    """Expected clusters / rows if the rows' H-bit codes were uniform over the 2^H buckets; with
    clusters kept across batches, the table's rows (the GEMMs run on all 2^H per chunk)."""
    if cross_batch(cfg):
        return bound_remain(cfg, batch)
    n, buckets = rows_per_scope(cfg, batch), 2.0 ** int(cfg["H"])
    if n <= 0:
        return 1.0
    # B(1 - (1 - 1/B)^n) / n, written with log1p/expm1 for large B
    return float(min(1.0, -buckets * math.expm1(n * math.log1p(-1.0 / buckets)) / n))


def bound_remain(cfg: dict, batch: int) -> float:
    """The largest possible clusters / rows: min(1, 2^H / rows per scope)."""
    n = rows_per_scope(cfg, batch)
    return 1.0 if n <= 0 else float(min(1.0, 2.0 ** int(cfg["H"]) / n))


def modelled_macs(cfg: dict, batch: int) -> float:
    """The layer's multiply-adds per step as the cost model counts them (at the expected remain
    ratio): what a measured remain ratio is compared against."""
    return layer_macs(cfg, batch, expected_remain(cfg, batch))["total"]


def _config(tg: TrainingGraph, node) -> dict:
    text = tg.tags.get(node.name, {}).get(CONFIG_KEY)
    return json.loads(text) if text else {}


def reuse_flops(tg: TrainingGraph, node) -> dict | float:
    """{"flops": expected, "flops_bound": bound, "note": ...} of one reuse node."""
    cfg = _config(tg, node)
    backward = node.op.startswith(BACKWARD_PREFIX)
    x = tg.shape(node.inputs[1 if backward else 0].name)
    if not cfg or not x:  # no setting recorded: count it like the conv it replaces
        if backward:
            return conv_grad_flops(tg, node)
        return 2.0 * numel(tg.shape(node.outputs[0].name)) * numel(tg.shape(node.inputs[1].name)[1:])
    batch = int(x[0])
    geom = geom_from_config(cfg)
    ho, wo = geom.out_hw(*cfg["in_hw"])
    rows, co, G = batch * ho * wo, geom.Co, int(cfg["G"])
    out = {}
    for key, remain in (("flops", expected_remain(cfg, batch)), ("flops_bound", bound_remain(cfg, batch))):
        m = layer_macs(cfg, batch, remain)
        if backward:
            # per-cluster dY sums, dW from centroids, dX (exact or per cluster, then col2im), dB
            extra = rows * G * co + rows * co + (rows * geom.K if cfg["input_grad"] == "cluster" else 0)
            out[key] = 2.0 * (m["weight_grad"] + m["input_grad"]) + extra
        else:
            # hashing + centroid GEMM (layer_macs' forward), centroid sums, per-row sum over chunks, bias
            out[key] = 2.0 * m["forward"] + rows * geom.K + rows * G * co + rows * co
    if cross_batch(cfg):
        out["note"] = (
            f"reuse {cfg.get('layer', '?')}: clusters kept across {int(cfg['cross_batch'])} batches, the GEMMs on "
            f"the whole table: remain ratio {bound_remain(cfg, batch):.2f} ({2 ** int(cfg['H'])} codes per chunk, "
            f"{rows_per_scope(cfg, batch)} rows per batch)"
        )
        return out
    out["note"] = (
        f"reuse {cfg.get('layer', '?')}: remain ratio {expected_remain(cfg, batch):.2f} expected "
        f"(uniform {cfg['H']}-bit codes, {rows_per_scope(cfg, batch)} rows per {cfg.get('scope', 'image')}), "
        f"at most {bound_remain(cfg, batch):.2f}"
    )
    return out
