"""Adaptive deep reuse kernels for one convolution (Ning, Guan, Shen, ICDE 2019).

The layer is seen as a GEMM on the unfolded input: rows ``X[M = N·Ho·Wo, K = C·kh·kw]`` (row order
n, oh, ow; column order c, i, j — torch's ``unfold`` and ``W.reshape(Co, K)``). Columns are cut
into ``G = ceil(K/L)`` chunks of length ``L`` (the last one zero-padded). Per chunk:

* **hash**: every row-chunk, centred by the per-channel mean of the layer input over the batch
  (``x̃ = x − μ_c``; zero padding of the convolution contributes ``0 − μ_c``), is projected on
  ``H`` random hyperplanes ``planes[g, :, h]``; bit h = projection > 0; the bucket is
  ``Σ_h bit_h·2^h``;
* **cluster** within the scope: ``image`` (rows of one image share clusters) or ``batch``;
* **forward**: centroid = mean of the members' *uncentred* row-chunks;
  ``Y[row] = Σ_g (C_g·W_g)[cluster_g(row)] + b``;
* **backward** (assignments fixed): ``Gs_g`` = per-cluster sums of dY rows;
  ``dW_g = C_gᵀ·Gs_g``; ``db = Σ dY`` (exact); ``dX`` either exact (the convolution's own input
  gradient, default) or per cluster: ``(Gs_g/count)·W_gᵀ`` broadcast to the members, folded back
  (col2im) — the true gradient of the clustered forward with assignments held fixed.

Two implementations share this contract: ``torch`` (plain torch ops, readable, the reference)
and ``native`` (C kernels from ``_reuse.c`` with OpenMP for the gather/scatter work, torch/oneDNN
for the small GEMMs and the exact input gradient). Clusters are numbered per chunk in a global
table: ``ids[n, g, p]`` indexes rows of ``centroids[T, L]`` (chunk g owns ``offsets[g] ..
offsets[g+1]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .spec import ConvGeom, ReuseSpec


@dataclass
class ReuseContext:
    """What the forward hands to the backward (assignments held fixed)."""

    ids: torch.Tensor  # int32 [N, G, P], global cluster index
    offsets: list  # G+1 ints
    centroids: torch.Tensor  # float32 [T, L]
    counts: torch.Tensor  # float32 [T]
    hw: tuple  # (H, W) of the input
    out_hw: tuple
    clusters: int | None = None  # clusters in use when the table has unused rows (cross-batch reuse)
    shared: bool = False  # clusters span images (the kernels may not split the work by image)

    @property
    def remain_ratio(self) -> float:
        n, g, p = self.ids.shape
        used = self.centroids.shape[0] if self.clusters is None else self.clusters
        return used / float(n * g * p)


# --------------------------------------------------------------------------- shared pieces
def _pad_conv_input(x: torch.Tensor, geom: ConvGeom) -> torch.Tensor:
    pt, pl, pb, pr = geom.pads
    if pt == pb and pl == pr:
        return x
    return F.pad(x, (pl, pr, pt, pb))


def _sym_pads(geom: ConvGeom) -> tuple:
    pt, pl, pb, pr = geom.pads
    return (pt, pl) if (pt == pb and pl == pr) else (0, 0)


def unfold_rows(x: torch.Tensor, geom: ConvGeom) -> torch.Tensor:
    """[N, C, H, W] -> [N, P, K] unfolded rows."""
    u = F.unfold(
        _pad_conv_input(x, geom),
        (geom.kh, geom.kw),
        dilation=geom.dilation,
        padding=_sym_pads(geom),
        stride=geom.stride,
    )
    return u.transpose(1, 2)


def channel_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(0, 2, 3))


def hash_buckets(
    x: torch.Tensor, planes: torch.Tensor, geom: ConvGeom, spec: ReuseSpec, mu: torch.Tensor | None = None
) -> torch.Tensor:
    """Bucket of every row-chunk: int32 [N, G, P], values in [0, 2^H).

    When L is a multiple of kh·kw a chunk is a group of whole input channels, and the projections
    are one grouped convolution (H outputs per chunk: H/Co of the layer's own FLOPs). Otherwise
    the rows are unfolded and projected with a matrix product.
    """
    G = spec.chunks(geom.K)
    H = spec.H
    mu = channel_mean(x) if mu is None else mu
    khw = geom.kh * geom.kw
    # centring: Σ_l plane_l·(x_l − μ_c(l)) = conv(x) − Σ_l plane_l·μ_c(l)
    mu_k = torch.zeros(G * spec.L, dtype=x.dtype, device=x.device)
    mu_k[: geom.K] = mu.repeat_interleave(khw)
    shift = torch.einsum("gl,glh->gh", mu_k.view(G, spec.L), planes).reshape(G * H)
    if spec.L % khw == 0:
        cg = spec.L // khw
        xp = x if G * cg == geom.C else F.pad(x, (0, 0, 0, 0, 0, G * cg - geom.C))
        filt = planes.permute(0, 2, 1).reshape(G * H, cg, geom.kh, geom.kw)
        proj = F.conv2d(
            _pad_conv_input(xp, geom),
            filt,
            -shift,
            stride=geom.stride,
            padding=_sym_pads(geom),
            dilation=geom.dilation,
            groups=G,
        )
        n = x.shape[0]
        proj = proj.reshape(n, G, H, -1)
    else:
        rows = unfold_rows(x, geom)
        n, p, k = rows.shape
        rows = F.pad(rows, (0, G * spec.L - k)).reshape(n, p, G, spec.L)
        proj = torch.einsum("npgl,glh->nghp", rows, planes) - shift.view(1, G, H, 1)
    weights = (2 ** torch.arange(H, device=x.device, dtype=torch.int32)).view(1, 1, H, 1)
    return ((proj > 0).to(torch.int32) * weights).sum(dim=2, dtype=torch.int32)


def _weight_chunks(w: torch.Tensor, G: int, L: int) -> torch.Tensor:
    """W [Co, C, kh, kw] -> [G, L, Co] (zero rows for the padding of the last chunk)."""
    co = w.shape[0]
    wk = w.reshape(co, -1)
    wk = F.pad(wk, (0, G * L - wk.shape[1]))
    return wk.t().reshape(G, L, co)


# --------------------------------------------------------------------------- torch reference
def cluster_torch(buckets: torch.Tensor, H: int, scope: str) -> tuple[torch.Tensor, list]:
    """Number the clusters of every chunk: ids int32 [N, G, P] (global), offsets [G+1].
    Within a chunk, clusters are ordered by (image, bucket) for scope image, by bucket for batch."""
    n, G, p = buckets.shape
    key = buckets.to(torch.int64)
    if scope == "image":
        key = key + (torch.arange(n, device=key.device) << H).view(n, 1, 1)
    ids = torch.empty_like(buckets)
    offsets = [0]
    for g in range(G):
        uniq, inv = torch.unique(key[:, g, :], return_inverse=True)
        ids[:, g, :] = (inv + offsets[-1]).to(torch.int32)
        offsets.append(offsets[-1] + int(uniq.numel()))
    return ids, offsets


def forward_torch(x, w, b, ids, offsets, geom: ConvGeom, spec: ReuseSpec):
    n, _, h, wd = x.shape
    G = spec.chunks(geom.K)
    ho, wo = geom.out_hw(h, wd)
    rows = unfold_rows(x, geom)  # [N, P, K]
    rows = F.pad(rows, (0, G * spec.L - geom.K)).reshape(n, ho * wo, G, spec.L)
    T = offsets[-1]
    flat_ids = ids.permute(0, 2, 1).reshape(-1).long()  # (n, p, g) order
    sums = torch.zeros(T, spec.L, dtype=x.dtype).index_add_(0, flat_ids, rows.reshape(-1, spec.L))
    counts = torch.zeros(T, dtype=x.dtype).index_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=x.dtype))
    centroids = sums / counts.clamp_min(1).unsqueeze(1)
    wg = _weight_chunks(w, G, spec.L)
    pm = torch.cat([centroids[offsets[g] : offsets[g + 1]] @ wg[g] for g in range(G)])  # [T, Co]
    y = pm[flat_ids].reshape(n, ho * wo, G, -1).sum(2)  # [N, P, Co]
    if b is not None:
        y = y + b
    y = y.transpose(1, 2).reshape(n, -1, ho, wo).contiguous()
    return y, ReuseContext(ids, list(offsets), centroids, counts, (h, wd), (ho, wo))


def backward_torch(dy, x, w, ctx: ReuseContext, geom: ConvGeom, spec: ReuseSpec):
    n, co, ho, wo = dy.shape
    G = spec.chunks(geom.K)
    T = ctx.offsets[-1]
    dyr = dy.reshape(n, co, ho * wo).transpose(1, 2)  # [N, P, Co]
    flat_ids = ctx.ids.permute(0, 2, 1).reshape(-1).long()
    gs = torch.zeros(T, co, dtype=dy.dtype).index_add_(
        0, flat_ids, dyr.unsqueeze(2).expand(n, ho * wo, G, co).reshape(-1, co)
    )
    dwg = torch.stack(
        [
            ctx.centroids[ctx.offsets[g] : ctx.offsets[g + 1]].t() @ gs[ctx.offsets[g] : ctx.offsets[g + 1]]
            for g in range(G)
        ]
    )  # [G, L, Co]
    dw = dwg.reshape(G * spec.L, co)[: geom.K].t().reshape(w.shape).contiguous()
    db = dy.sum(dim=(0, 2, 3))
    if spec.input_grad == "exact":
        dx = exact_input_grad(dy, x, w, geom)
    else:
        wg = _weight_chunks(w, G, spec.L)
        d = gs / ctx.counts.clamp_min(1).unsqueeze(1)
        dc = torch.cat([d[ctx.offsets[g] : ctx.offsets[g + 1]] @ wg[g].t() for g in range(G)])  # [T, L]
        rows = dc[flat_ids].reshape(n, ho * wo, G * spec.L)[:, :, : geom.K]
        dx = fold_rows(rows, x.shape, geom)
    return dx, dw, db


def fold_rows(rows: torch.Tensor, xshape, geom: ConvGeom) -> torch.Tensor:
    """Adjoint of unfold_rows: [N, P, K] -> [N, C, H, W] (col2im)."""
    n, c, h, w = xshape
    pt, pl, pb, pr = geom.pads
    full = F.fold(
        rows.transpose(1, 2), (h + pt + pb, w + pl + pr), (geom.kh, geom.kw), dilation=geom.dilation, stride=geom.stride
    )
    return full[:, :, pt : pt + h, pl : pl + w].contiguous()


def exact_input_grad(dy, x, w, geom: ConvGeom) -> torch.Tensor:
    """The convolution's own input gradient (oneDNN through torch)."""
    if _sym_pads(geom) != (0, 0) or geom.pads == (0, 0, 0, 0):
        dx, _, _ = torch.ops.aten.convolution_backward(
            dy,
            x,
            w,
            None,
            list(geom.stride),
            list(_sym_pads(geom)),
            list(geom.dilation),
            False,
            [0, 0],
            1,
            [True, False, False],
        )
        return dx
    xp = _pad_conv_input(x, geom)
    dxp, _, _ = torch.ops.aten.convolution_backward(
        dy, xp, w, None, list(geom.stride), [0, 0], list(geom.dilation), False, [0, 0], 1, [True, False, False]
    )
    pt, pl, _, _ = geom.pads
    return dxp[:, :, pt : pt + x.shape[2], pl : pl + x.shape[3]].contiguous()
