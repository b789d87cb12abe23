"""Adaptive deep reuse as a portable ONNX reference path (standard ops, opset 17).

The mathematics is that of :mod:`accelc.passes.reuse.kernels` (read it for the contract); here
each reused convolution becomes two ONNX *local functions* (``onnx.FunctionProto``) built only
from default-domain ops, so a plain ``onnxruntime.InferenceSession`` runs them (ORT inlines local
functions) and Netron shows one node per layer:

* ``ReuseConv_<layer>(X, W, B, planes) -> (Y, ids, centroids, counts)``
* ``ReuseConvGrad_<layer>(dY, X, W, ids, centroids, counts) -> (dX, dW, dB)``

Layout inside the bodies (``G`` chunks of length ``L``, ``M = N·P`` rows, ``P = Ho·Wo``):

* **unfold**: a grouped ``Conv`` (group = C) with one-hot filters ``E[K, 1, kh, kw]`` gives the
  rows in channel order ``c·kh·kw + i·kw + j`` (torch's ``unfold``); ``Pad`` to ``G·L`` channels,
  then ``Reshape``/``Transpose`` to ``[G, M, L]`` (row order n, oh, ow);
* **hash**: the centred rows ``x̃ = x − μ_c`` (μ = per-channel mean over N, H, W; the
  convolution's zero padding contributes ``0 − μ_c``, the padded K columns 0) projected on
  ``planes[G, L, H]`` as ``rows·planes − μ_k·planes`` (one ``MatMul`` of the rows, as the torch
  reference does), ``Greater(·, 0)``, bucket = ``Σ_h bit_h·2^h``;
* **cluster**: key = ``n·2^H + bucket`` (scope ``image``) or ``bucket`` (scope ``batch``); every
  chunk owns a dense table of ``T = S·2^H`` clusters (S = N or 1), empty buckets stay zero.
  ``ids[g, m] = g·T + key`` (int64 ``[G, N·P]``) indexes the flattened ``[G·T, ·]`` tables;
* **tables**: a scatter-add of the *uncentred* row-chunks and of ones gives the sums and
  ``counts [G, T]``; ``centroids [G, T, L] = sums / max(count, 1)``. The scatter is
  ``ScatterElements(reduction="add")`` by default: ORT 1.19.2's CPU ``ScatterND(reduction="add")``
  splits the updates over intra-op threads without atomics, so duplicate indices (every cluster
  with two members) race when ``intra_op_num_threads > 1``; ``scatter="nd"`` selects it anyway;
* **forward**: ``Y = Σ_g gather(centroids_g · W_g) + B``;
* **backward** (assignments fixed): ``Gs`` = per-cluster sums of dY rows (scatter-add);
  ``dW_g = centroids_gᵀ · Gs_g``; ``dB = ΣdY``; ``dX`` exact (``ConvTranspose`` of dY with W,
  ``output_padding`` from the static input size) or ``cluster``: ``(Gs/count) · W_gᵀ`` gathered
  back to the member rows and folded with a ``ConvTranspose`` of the one-hot filters (col2im).

Product order: ``gather(C·W) = gather(C)·W`` (and likewise ``Cᵀ·Gs = gather(C)ᵀ·dY`` and the
cluster input gradient). With dense tables the per-table products cost ``T·L·Co`` and the per-row
ones ``M·L·Co``; ``product="auto"`` takes the table products when ``2^H ≤ P`` (then ``T ≤ M``
whatever N) and the per-row products otherwise. Both are the same mathematics.
"""

from __future__ import annotations

import base64
import re

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...compiler import provenance
from ...compiler.errors import AccelcError
from .spec import BACKWARD_PREFIX, DOMAIN, FORWARD_PREFIX, ORIGINAL_KEY, ConvGeom, ReuseSpec

OPSET = 17
IR_VERSION = 10
PRODUCTS = ("auto", "table", "rows")
SCATTERS = ("elements", "nd")

FORWARD_INPUTS = ("X", "W", "B", "planes")
FORWARD_OUTPUTS = ("Y", "ids", "centroids", "counts")
BACKWARD_INPUTS = ("dY", "X", "W", "ids", "centroids", "counts")
BACKWARD_OUTPUTS = ("dX", "dW", "dB")


def safe_name(layer: str) -> str:
    return re.sub(r"[^0-9A-Za-z]", "_", layer)


def forward_name(layer: str) -> str:
    return f"{FORWARD_PREFIX}{safe_name(layer)}"


def backward_name(layer: str) -> str:
    return f"{BACKWARD_PREFIX}{safe_name(layer)}"


def table_products(spec: ReuseSpec, P: int, product: str = "auto") -> bool:
    """True: products on the dense cluster tables; False: on the gathered rows."""
    if product not in PRODUCTS:
        raise ValueError(f"product must be one of {PRODUCTS}, not {product!r}")
    if product == "auto":
        return (1 << spec.H) <= P
    return product == "table"


def onehot_filters(geom: ConvGeom) -> np.ndarray:
    """E[K, 1, kh, kw]: output channel c·kh·kw + i·kw + j of a group-C conv picks tap (i, j)."""
    khw = geom.kh * geom.kw
    e = np.zeros((geom.K, 1, geom.kh, geom.kw), np.float32)
    for c in range(geom.C):
        for i in range(geom.kh):
            for j in range(geom.kw):
                e[c * khw + i * geom.kw + j, 0, i, j] = 1.0
    return e


def _output_padding(geom: ConvGeom, in_hw) -> list:
    """ConvTranspose output_padding so that the result has exactly the conv input's size."""
    pt, pl, pb, pr = geom.pads
    out = []
    for size, p0, p1, k, s, d in (
        (in_hw[0], pt, pb, geom.kh, geom.stride[0], geom.dilation[0]),
        (in_hw[1], pl, pr, geom.kw, geom.stride[1], geom.dilation[1]),
    ):
        span = size + p0 + p1 - d * (k - 1) - 1
        if span < 0:
            raise ValueError(f"input {tuple(in_hw)} smaller than the kernel extent")
        out.append(span % s)
    return out


class _Body:
    """Collects the nodes of one function body; every node gets ``<prefix>/<name>``."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list = []
        self._used: set = set()

    def _uniq(self, name: str) -> str:
        base, k = name, 1
        while name in self._used:
            k += 1
            name = f"{base}_{k}"
        self._used.add(name)
        return name

    def op(self, op_type, inputs, name, n_out=1, **attrs):
        name = self._uniq(name)
        outs = [name] if n_out == 1 else [f"{name}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"{self.prefix}/{name}", **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, name, value, dtype=None):
        arr = np.asarray(value, dtype=dtype)
        name = self._uniq(name)
        self.nodes.append(
            helper.make_node(
                "Constant", [], [name], name=f"{self.prefix}/{name}", value=numpy_helper.from_array(arr, name)
            )
        )
        return name

    def ints(self, name, values):
        return self.const(name, np.asarray(values, np.int64))

    def out(self, internal: str, public: str):
        """Bind an internal value to the function output ``public`` (Identity)."""
        return self.op("Identity", [internal], public)


class _Layer:
    """Static numbers of one reused convolution."""

    def __init__(self, layer, geom: ConvGeom, spec: ReuseSpec, in_hw, product, scatter):
        if spec.scope not in ("image", "batch"):
            raise ValueError(f"scope must be image or batch, not {spec.scope!r}")
        if spec.input_grad not in ("exact", "cluster"):
            raise ValueError(f"input_grad must be exact or cluster, not {spec.input_grad!r}")
        if spec.L < 1 or spec.H < 1 or spec.H > 40:
            raise ValueError("need L >= 1 and 1 <= H <= 40")
        self.layer, self.geom, self.spec = layer, geom, spec
        self.in_hw = (int(in_hw[0]), int(in_hw[1]))
        self.Ho, self.Wo = geom.out_hw(*self.in_hw)
        if self.Ho < 1 or self.Wo < 1:
            raise ValueError(f"empty convolution output for input {self.in_hw}")
        self.P = self.Ho * self.Wo
        self.K = geom.K
        self.G = spec.chunks(self.K)
        self.L = spec.L
        self.GL = self.G * self.L
        self.Co = geom.Co
        self.nb = 1 << spec.H
        self.table = table_products(spec, self.P, product)
        if scatter not in SCATTERS:
            raise ValueError(f"scatter must be one of {SCATTERS}, not {scatter!r}")
        self.scatter = scatter
        self.conv_attrs = dict(
            strides=list(geom.stride),
            pads=list(geom.pads),
            dilations=list(geom.dilation),
            kernel_shape=[geom.kh, geom.kw],
        )


def _unfold(b: _Body, ly: _Layer, x: str, e: str, tag: str) -> str:
    """[N, C, H, W] -> rows [G, M, L] (K padded to G·L with zeros)."""
    u = b.op("Conv", [x, e], f"unfold_{tag}", group=ly.geom.C, **ly.conv_attrs)  # [N, K, Ho, Wo]
    if ly.GL != ly.K:
        u = b.op(
            "Pad", [u, b.ints(f"padK_{tag}_pads", [0, 0, 0, 0, 0, ly.GL - ly.K, 0, 0])], f"padK_{tag}", mode="constant"
        )
    u = b.op("Reshape", [u, b.ints(f"rows_{tag}_shape4", [0, ly.G, ly.L, ly.P])], f"rows_{tag}_split")
    u = b.op("Transpose", [u], f"rows_{tag}_gnpl", perm=[1, 0, 3, 2])  # [G, N, P, L]
    return b.op("Reshape", [u, b.ints(f"rows_{tag}_shape3", [ly.G, -1, ly.L])], f"rows_{tag}")


def _weight_chunks(b: _Body, ly: _Layer, w: str) -> str:
    """W [Co, C, kh, kw] -> [G, L, Co] (zero rows for the padding of the last chunk)."""
    wk = b.op("Reshape", [w, b.ints("wk_shape", [ly.Co, ly.K])], "wk")
    if ly.GL != ly.K:
        wk = b.op("Pad", [wk, b.ints("wk_pads", [0, 0, 0, ly.GL - ly.K])], "wk_padK", mode="constant")
    wk = b.op("Reshape", [wk, b.ints("wg_split_shape", [ly.Co, ly.G, ly.L])], "wg_split")
    return b.op("Transpose", [wk], "wg", perm=[1, 2, 0])


def _zeros(b: _Body, name: str, dims: list) -> str:
    """ConstantOfShape(Concat(dims)) with float 0; ``dims`` are int64 [1] value names."""
    shape = dims[0] if len(dims) == 1 else b.op("Concat", dims, f"{name}_shape", axis=0)
    return b.op("ConstantOfShape", [shape], name, value=numpy_helper.from_array(np.zeros(1, np.float32)))


def _scatter_add(b: _Body, ly: _Layer, name: str, zeros: str, ids: str, updates: str, width) -> str:
    """``zeros[ids[g, m]] += updates[g, m]`` on a flattened table ``[G·T]`` (width None, updates
    ``[G, M]``) or ``[G·T, width]`` (updates ``[G, M, width]``); duplicates accumulate."""
    if ly.scatter == "nd":
        idx = b.op("Unsqueeze", [ids, b.ints(f"{name}_axis_last", [-1])], f"{name}_index")  # [G, M, 1]
        return b.op("ScatterND", [zeros, idx, updates], name, reduction="add")
    if width is None:
        idx = b.op("Reshape", [ids, b.ints(f"{name}_flat", [-1])], f"{name}_index")  # [G·M]
        upd = b.op("Reshape", [updates, b.ints(f"{name}_upd_flat", [-1])], f"{name}_updates")
    else:
        idx = b.op("Reshape", [ids, b.ints(f"{name}_col", [-1, 1])], f"{name}_index_col")
        idx = b.op("Expand", [idx, b.ints(f"{name}_width", [1, width])], f"{name}_index")  # [G·M, width]
        upd = b.op("Reshape", [updates, b.ints(f"{name}_upd_rows", [-1, width])], f"{name}_updates")
    return b.op("ScatterElements", [zeros, idx, upd], name, axis=0, reduction="add")


def _forward(ly: _Layer, domain: str) -> onnx.FunctionProto:
    b = _Body(ly.layer)
    G, L, H, P = ly.G, ly.L, ly.spec.H, ly.P
    x, w, bias, planes = FORWARD_INPUTS
    e = b.const("onehot_filters", onehot_filters(ly.geom))

    rows = _unfold(b, ly, x, e, "x")  # [G, M, L], uncentred (padding positions are 0)

    # hash of the centred rows x̃ = x − μ_c (padding: 0 − μ_c; padded K columns: 0):
    # x̃·planes = x·planes − μ_k·planes, μ_k = per-channel mean repeated kh·kw times
    mu = b.op("ReduceMean", [x], "channel_mean", axes=[0, 2, 3], keepdims=0)  # [C]
    mu = b.op("Unsqueeze", [mu, b.ints("mu_axis1", [1])], "channel_mean_col")  # [C, 1]
    mu = b.op("Expand", [mu, b.ints("mu_taps", [1, ly.geom.kh * ly.geom.kw])], "mean_per_tap")  # [C, khw]
    mu = b.op("Reshape", [mu, b.ints("mu_k_shape", [ly.K])], "mean_k")
    if ly.GL != ly.K:
        mu = b.op("Pad", [mu, b.ints("mu_pads", [0, ly.GL - ly.K])], "mean_k_padK", mode="constant")
    mu = b.op("Reshape", [mu, b.ints("mu_chunks_shape", [G, 1, L])], "mean_chunks")  # [G, 1, L]
    shift = b.op("MatMul", [mu, planes], "mean_projection")  # [G, 1, H]

    # hash: bucket[g, m] = Σ_h [proj > 0]·2^h
    proj = b.op("MatMul", [rows, planes], "project_rows")  # [G, M, H]
    proj = b.op("Sub", [proj, shift], "project")
    pos = b.op("Greater", [proj, b.const("zero_f", np.float32(0))], "bit")
    bits = b.op("Cast", [pos], "bit_i64", to=TensorProto.INT64)
    weighted = b.op("Mul", [bits, b.ints("pow2", 1 << np.arange(H, dtype=np.int64))], "bit_weight")
    bucket = b.op("ReduceSum", [weighted, b.ints("axis_h", [2])], "bucket", keepdims=0)  # [G, M]

    # cluster key and the global index into the flattened [G·T, ·] tables
    n = b.op("Shape", [x], "batch_n", start=0, end=1)  # [1]
    if ly.spec.scope == "image":
        m = b.op("Mul", [n, b.ints("P", [P])], "rows_m")
        m0 = b.op("Squeeze", [m, b.ints("axis0_sq", [0])], "rows_m_scalar")
        r = b.op("Range", [b.const("zero_i", np.int64(0)), m0, b.const("one_i", np.int64(1))], "row_index")
        img = b.op("Div", [r, b.const("P_scalar", np.int64(P))], "row_image")
        key = b.op(
            "Add", [bucket, b.op("Mul", [img, b.const("nb_scalar", np.int64(ly.nb))], "image_key")], "cluster_key"
        )
        t = b.op("Mul", [n, b.ints("nb", [ly.nb])], "table_size")  # [1] = N·2^H
        off = b.op("Mul", [b.ints("chunk_index", np.arange(G).reshape(G, 1)), t], "chunk_offset")
    else:
        key = bucket
        t = b.ints("table_size", [ly.nb])
        off = b.ints("chunk_offset", (np.arange(G) * ly.nb).reshape(G, 1))
    ids = b.op("Add", [key, off], "cluster_id")  # [G, M] int64
    gt = b.op("Mul", [t, b.ints("G", [G])], "tables_size")  # [1] = G·T

    # dense per-chunk tables: sums of uncentred row-chunks and member counts
    ones = b.op(
        "ConstantOfShape",
        [b.op("Shape", [ids], "ids_shape")],
        "ones",
        value=numpy_helper.from_array(np.ones(1, np.float32)),
    )
    counts = _scatter_add(b, ly, "cluster_counts", _zeros(b, "counts_zero", [gt]), ids, ones, None)  # [G·T]
    sums = _scatter_add(b, ly, "cluster_sums", _zeros(b, "sums_zero", [gt, b.ints("L", [L])]), ids, rows, L)  # [G·T, L]
    cnt1 = b.op("Max", [counts, b.const("one_f", np.float32(1))], "counts_clamped")
    cen = b.op("Div", [sums, b.op("Unsqueeze", [cnt1, b.ints("axis1", [1])], "counts_col")], "centroid_flat")

    # Y = Σ_g gather(C_g · W_g) + B
    wg = _weight_chunks(b, ly, w)  # [G, L, Co]
    if ly.table:
        cen3 = b.op("Reshape", [cen, b.ints("tables3_L", [G, -1, L])], "centroid_tables")
        pm = b.op("MatMul", [cen3, wg], "partial_products")  # [G, T, Co]
        pm = b.op("Reshape", [pm, b.ints("flat_Co", [-1, ly.Co])], "partial_products_flat")
        yg = b.op("Gather", [pm, ids], "gather_products", axis=0)  # [G, M, Co]
    else:
        cr = b.op("Gather", [cen, ids], "gather_centroids", axis=0)  # [G, M, L]
        yg = b.op("MatMul", [cr, wg], "row_products")  # [G, M, Co]
    yr = b.op("ReduceSum", [yg, b.ints("axis_g", [0])], "sum_chunks", keepdims=0)  # [M, Co]
    yr = b.op("Add", [yr, bias], "add_bias")
    yr = b.op("Reshape", [yr, b.ints("y_nhwc_shape", [-1, ly.Ho, ly.Wo, ly.Co])], "y_nhwc")
    b.op("Transpose", [yr], "Y", perm=[0, 3, 1, 2])
    b.out(ids, "ids")
    b.op("Reshape", [cen, b.ints("centroids_shape", [G, -1, L])], "centroids")
    b.op("Reshape", [counts, b.ints("counts_shape", [G, -1])], "counts")
    return helper.make_function(
        domain,
        forward_name(ly.layer),
        list(FORWARD_INPUTS),
        list(FORWARD_OUTPUTS),
        b.nodes,
        [helper.make_opsetid("", OPSET)],
        doc_string=f"adaptive deep reuse forward of {ly.layer}: L={L} H={H} "
        f"scope={ly.spec.scope} G={G} table={ly.table}",
    )


def _backward(ly: _Layer, domain: str) -> onnx.FunctionProto:
    b = _Body(ly.layer + ".grad")
    G, L, Co, geom = ly.G, ly.L, ly.Co, ly.geom
    dy, x, w, ids, cen, counts = BACKWARD_INPUTS

    dyr = b.op("Transpose", [dy], "dy_nhwc", perm=[0, 2, 3, 1])
    dyr = b.op("Reshape", [dyr, b.ints("dy_rows_shape", [-1, Co])], "dy_rows")  # [M, Co]
    cnt_flat = b.op("Reshape", [counts, b.ints("flat", [-1])], "counts_flat")  # [G·T]
    gt = b.op("Shape", [cnt_flat], "tables_size")  # [1] = G·T
    dy_g = b.op("Expand", [dyr, b.ints("expand_g", [G, 1, 1])], "dy_rows_per_chunk")  # [G, M, Co]
    gs = _scatter_add(
        b, ly, "cluster_dy_sums", _zeros(b, "gs_zero", [gt, b.ints("Co", [Co])]), ids, dy_g, Co
    )  # [G·T, Co]
    wg = _weight_chunks(b, ly, w) if ly.spec.input_grad == "cluster" else None

    # dW_g = C_gᵀ · Gs_g
    if ly.table:
        ct = b.op("Transpose", [cen], "centroids_t", perm=[0, 2, 1])  # [G, L, T]
        gs3 = b.op("Reshape", [gs, b.ints("tables3_Co", [G, -1, Co])], "gs_tables")
        dwg = b.op("MatMul", [ct, gs3], "dw_chunks")  # [G, L, Co]
    else:
        cen_flat = b.op("Reshape", [cen, b.ints("flat_L", [-1, L])], "centroid_flat")
        cr = b.op("Gather", [cen_flat, ids], "gather_centroids", axis=0)  # [G, M, L]
        crt = b.op("Transpose", [cr], "gather_centroids_t", perm=[0, 2, 1])  # [G, L, M]
        dwg = b.op("MatMul", [crt, dyr], "dw_chunks")  # [G, L, Co]
    dwk = b.op("Reshape", [dwg, b.ints("dw_gl_shape", [ly.GL, Co])], "dw_gl")
    if ly.GL != ly.K:
        dwk = b.op(
            "Slice",
            [dwk, b.ints("trimK_start", [0]), b.ints("trimK_end", [ly.K]), b.ints("trimK_axis", [0])],
            "dw_trimK",
        )
    dwk = b.op("Transpose", [dwk], "dw_t", perm=[1, 0])  # [Co, K]
    b.op("Reshape", [dwk, b.ints("w_shape", [Co, geom.C, geom.kh, geom.kw])], "dW")

    b.op("ReduceSum", [dy, b.ints("axes_nhw", [0, 2, 3])], "dB", keepdims=0)

    op = _output_padding(geom, ly.in_hw)
    if ly.spec.input_grad == "exact":
        b.op("ConvTranspose", [dy, w], "dX", output_padding=op, **ly.conv_attrs)
    else:
        cnt1 = b.op("Max", [cnt_flat, b.const("one_f", np.float32(1))], "counts_clamped")
        d = b.op("Div", [gs, b.op("Unsqueeze", [cnt1, b.ints("axis1", [1])], "counts_col")], "cluster_dy_mean")
        wgt = b.op("Transpose", [wg], "wg_t", perm=[0, 2, 1])  # [G, Co, L]
        if ly.table:
            d3 = b.op("Reshape", [d, b.ints("tables3_Co_d", [G, -1, Co])], "dy_mean_tables")
            dc = b.op("MatMul", [d3, wgt], "cluster_row_grads")  # [G, T, L]
            dc = b.op("Reshape", [dc, b.ints("flat_L_d", [-1, L])], "cluster_row_grads_flat")
            dr = b.op("Gather", [dc, ids], "gather_row_grads", axis=0)  # [G, M, L]
        else:
            dg = b.op("Gather", [d, ids], "gather_dy_mean", axis=0)  # [G, M, Co]
            dr = b.op("MatMul", [dg, wgt], "row_grads")  # [G, M, L]
        dr = b.op("Reshape", [dr, b.ints("row_grads_split_shape", [G, -1, ly.P, L])], "row_grads_split")
        dr = b.op("Transpose", [dr], "row_grads_nglp", perm=[1, 0, 3, 2])  # [N, G, L, P]
        dr = b.op("Reshape", [dr, b.ints("row_grads_nchw_shape", [0, ly.GL, ly.Ho, ly.Wo])], "row_grads_nchw")
        if ly.GL != ly.K:
            dr = b.op(
                "Slice",
                [dr, b.ints("trimKr_start", [0]), b.ints("trimKr_end", [ly.K]), b.ints("trimKr_axis", [1])],
                "row_grads_trimK",
            )
        e = b.const("onehot_filters", onehot_filters(geom))
        b.op("ConvTranspose", [dr, e], "dX", group=geom.C, output_padding=op, **ly.conv_attrs)
    return helper.make_function(
        domain,
        backward_name(ly.layer),
        list(BACKWARD_INPUTS),
        list(BACKWARD_OUTPUTS),
        b.nodes,
        [helper.make_opsetid("", OPSET)],
        doc_string=f"adaptive deep reuse backward of {ly.layer}: input_grad={ly.spec.input_grad} table={ly.table}",
    )


def build_reuse_functions(
    layer: str,
    geom: ConvGeom,
    spec: ReuseSpec,
    in_hw: tuple,
    domain: str = DOMAIN,
    *,
    product: str = "auto",
    scatter: str = "elements",
) -> tuple[onnx.FunctionProto, onnx.FunctionProto]:
    """The forward and backward local functions of one reused convolution (constants baked in).

    ``in_hw`` is the fixed input size (H, W); the batch size stays dynamic. ``product`` picks where
    the small GEMMs run: on the dense cluster tables (``table``), on the gathered rows (``rows``)
    or whichever is cheaper from the static sizes (``auto``). ``scatter`` picks the accumulation:
    ``ScatterElements(reduction="add")`` (default) or ``ScatterND(reduction="add")`` — the latter
    races on duplicate indices in ORT 1.19.2's CPU kernel when intra-op threads > 1 (no atomics),
    so use ``nd`` only with one intra-op thread or an EP whose kernel accumulates atomically."""
    ly = _Layer(layer, geom, spec, in_hw, product, scatter)
    return _forward(ly, domain), _backward(ly, domain)


def strip(model: onnx.ModelProto) -> onnx.ModelProto:
    """The training graph with every reuse node put back to the Conv/ConvGrad it replaced (other
    passes' rewrites, e.g. skip's instrumentation, stay)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = set()
    for n in m.graph.node:
        if n.domain == DOMAIN:
            orig = provenance.props(n).get(ORIGINAL_KEY)
            if not orig:
                raise AccelcError(f"reuse node '{n.name}' carries no original node; recompile")
            names.add(n.op_type)
            n.CopyFrom(onnx.NodeProto.FromString(base64.b64decode(orig)))
    keep_f = [f for f in m.functions if not (f.domain == DOMAIN and f.name in names)]
    del m.functions[:]
    m.functions.extend(keep_f)
    keep_i = [t for t in m.graph.initializer if not t.name.startswith("accelc.reuse.")]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep_i)
    keep_o = [o for o in m.opset_import if o.domain != DOMAIN]
    del m.opset_import[:]
    m.opset_import.extend(keep_o)
    return m
