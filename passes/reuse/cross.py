"""Cluster reuse across batches (CR in the paper): a reused conv keeps its clusters from one batch
to the next.

Within a batch (scopes ``image`` and ``batch``) every step hashes its rows, numbers the buckets
and sums every row into its cluster's centroid. With ``cross_batch`` K ≥ 2 the layer keeps a
**cluster table** instead: one centroid per (chunk, H-bit code), built on a *refresh* batch and
reused by the next K − 1 batches.

* **refresh batch** (the first, then every K-th): the channel means that centre the hash are taken
  from this batch and kept; every row is hashed and summed into the centroid of its (chunk, code):
  the batch's clusters, shared by all its images;
* **reuse batch**: the rows are hashed with the *kept* means (the same hyperplanes and offsets, so
  a code means the same region of the input space as in the refresh batch); a row whose code has a
  centroid in the table uses it, and is not summed; only rows whose code is new to the table are
  summed, their centroids join the table. The centring means, the cluster numbering and most of
  the centroid sums are the work saved;
* both: the GEMM runs on the table's centroids (2^H per chunk, unused ones too — a small GEMM),
  the output is gathered per row, the backward is unchanged: dW = Σ_j C_jᵀ·Gs_j with the centroids
  the forward used (the exact gradient of the forward that ran), dX exact or per cluster.

"While they still fit": a table is rebuilt every K batches, and sooner when more than
``MAX_NEW`` of a batch's rows fall in codes the table has not seen (the activations moved). The
table lives in the node kernel of the variant that runs (one per layer and process); a switch
of variant, a new (L, H) or a resume starts from a refresh. Tables hold 2^H·G·L floats, so
cross-batch reuse needs H ≤ :data:`MAX_H`.

The portable ONNX functions are stateless: they cluster each batch afresh (the refresh batch's
computation with the batch's own means), so ``--kernel reuse=ort`` runs without CR.
"""

from __future__ import annotations

import time

import torch

from . import native
from .kernels import ReuseContext, _weight_chunks, hash_buckets, unfold_rows
from .spec import ConvGeom, ReuseSpec

MAX_H = 12  # a table of 2^12 centroids per chunk
MAX_NEW = 0.25  # a reuse batch with more of its rows in new codes rebuilds the table


class ClusterTable:
    """One layer's clusters kept across batches, and what they did (for the report)."""

    def __init__(self, every: int):
        self.every = int(every)
        self.centroids: torch.Tensor | None = None  # [G·2^H, L]
        self.valid: torch.Tensor | None = None  # bool [G·2^H]
        self.mu: torch.Tensor | None = None  # channel means of the refresh batch
        self.age = 0  # batches since the refresh
        self.key = None  # the shape and setting the table was built for
        self.stats = {"refresh": 0, "reuse": 0, "rows_kept": 0.0, "rows": 0.0}

    def reset(self) -> None:
        self.centroids = self.valid = self.mu = self.key = None
        self.age = 0


def _sums(x, todo, geom: ConvGeom, spec: ReuseSpec, table_rows: int, impl: str, out_hw):
    """Sums and counts of the rows whose ``todo`` id is ≥ 0 into their table rows."""
    sums = torch.zeros(table_rows, spec.L)
    counts = torch.zeros(table_rows)
    if impl == "native":
        import ctypes

        q = native._geom(geom, spec, x, out_hw)
        native.lib().reuse_sums(
            native._ptr(x), native._ptr(todo), ctypes.byref(q), 0, native._ptr(sums), native._ptr(counts),
            native._threads(),
        )  # fmt: skip
        return sums, counts
    n = x.shape[0]
    G = spec.chunks(geom.K)
    rows = unfold_rows(x, geom)  # [N, P, K]
    p = rows.shape[1]
    rows = torch.nn.functional.pad(rows, (0, G * spec.L - geom.K)).reshape(n, p, G, spec.L)
    ids = todo.permute(0, 2, 1).reshape(-1).long()  # [N·P·G] in (n, p, g) order
    keep = ids >= 0
    sums.index_add_(0, ids[keep], rows.reshape(-1, spec.L)[keep])
    counts.index_add_(0, ids[keep], torch.ones(int(keep.sum())))
    return sums, counts


def forward(x, w, b, planes, geom: ConvGeom, spec: ReuseSpec, table: ClusterTable, impl: str = "native", prof=None):
    """The reused conv with the cluster table (see the module text). Returns (y, ReuseContext)."""
    t = time.perf_counter()
    x = x.contiguous()
    n, _, h, wd = x.shape
    ho, wo = geom.out_hw(h, wd)
    G = spec.chunks(geom.K)
    B = 1 << spec.H
    key = (tuple(x.shape[1:]), spec.L, spec.H, G)
    refresh = table.centroids is None or table.key != key or table.age + 1 >= table.every
    mu = x.mean(dim=(0, 2, 3)) if refresh else table.mu
    if impl == "native" and spec.L % (geom.kh * geom.kw) == 0:
        buckets = hash_buckets(x, planes, geom, spec, mu=mu)  # one grouped oneDNN conv
    elif impl == "native":
        buckets = native.hash_buckets(x, planes, geom, spec, mu=mu)
    else:
        buckets = hash_buckets(x, planes, geom, spec, mu=mu)
    keys = (buckets + (torch.arange(G, dtype=torch.int32) * B).view(1, G, 1)).contiguous()  # [N, G, P]
    t = native._tick(prof, "hash_conv", t)
    counts = torch.bincount(keys.reshape(-1), minlength=G * B).to(torch.float32)
    if not refresh:
        new = ~table.valid[keys.long()]
        share_new = float(new.float().mean())
        if share_new > MAX_NEW:  # the activations moved away from the table: build it again
            refresh = True
            mu = x.mean(dim=(0, 2, 3))
            buckets = hash_buckets(x, planes, geom, spec, mu=mu)
            keys = (buckets + (torch.arange(G, dtype=torch.int32) * B).view(1, G, 1)).contiguous()
            counts = torch.bincount(keys.reshape(-1), minlength=G * B).to(torch.float32)
    if refresh:
        todo = keys
        centroids = torch.zeros(G * B, spec.L)
        valid = torch.zeros(G * B, dtype=torch.bool)
    else:
        todo = torch.where(new, keys, torch.full_like(keys, -1)).contiguous()
        centroids, valid = table.centroids, table.valid
    t = native._tick(prof, "compact", t)
    sums, got = _sums(x, todo, geom, spec, G * B, impl, (ho, wo))
    fresh = got > 0
    if bool(fresh.any()):
        centroids = centroids.clone()
        centroids[fresh] = sums[fresh] / got[fresh].unsqueeze(1)
        valid = valid | fresh
    t = native._tick(prof, "sums", t)
    wg = _weight_chunks(w, G, spec.L)
    pm = torch.empty(G * B, w.shape[0])
    for g in range(G):
        torch.mm(centroids[g * B : (g + 1) * B], wg[g], out=pm[g * B : (g + 1) * B])
    t = native._tick(prof, "gemm", t)
    if impl == "native":
        y = torch.empty(n, w.shape[0], ho, wo)
        bias = b.contiguous() if b is not None else None
        native.lib().reuse_gather_out(
            native._ptr(pm), native._ptr(keys), native._ptr(bias) if bias is not None else None, n, G, ho * wo,
            w.shape[0], native._ptr(y), native._threads(),
        )  # fmt: skip
    else:
        flat = keys.permute(0, 2, 1).reshape(-1).long()
        y = pm[flat].reshape(n, ho * wo, G, -1).sum(2)
        if b is not None:
            y = y + b
        y = y.transpose(1, 2).reshape(n, -1, ho, wo).contiguous()
    native._tick(prof, "gather", t)
    # the table for the next batch; the stats say what this one did
    rows = float(keys.numel())
    if refresh:
        table.stats["refresh"] += 1
        table.age = 0
    else:
        table.stats["reuse"] += 1
        table.stats["rows_kept"] += rows * (1.0 - share_new)
        table.age += 1
    table.stats["rows"] += rows
    table.centroids, table.valid, table.mu, table.key = centroids, valid, mu, key
    used = int((counts > 0).sum())
    offsets = [g * B for g in range(G + 1)]
    ctx = ReuseContext(keys, offsets, centroids, counts, (h, wd), (ho, wo), clusters=used, shared=True)
    return y, ctx
