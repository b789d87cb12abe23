"""The ONNX reference path of adaptive deep reuse (accelc.passes.reuse.onnx_form) against the torch
reference (accelc.passes.reuse.kernels) run on the same cluster assignments."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from accelc.passes.reuse.kernels import backward_torch, cluster_torch, forward_torch, hash_buckets
from accelc.passes.reuse.onnx_form import (
    IR_VERSION,
    OPSET,
    backward_name,
    build_reuse_functions,
    forward_name,
    safe_name,
)
from accelc.passes.reuse.spec import DOMAIN, ConvGeom, ReuseSpec, make_planes


def reference_model(
    geom: ConvGeom,
    spec: ReuseSpec,
    in_hw: tuple,
    N: int | None = None,
    *,
    layer: str = "conv",
    domain: str = DOMAIN,
    product: str = "auto",
    scatter: str = "elements",
) -> onnx.ModelProto:
    """A graph with one forward and one backward call: inputs X, W, B, planes, dY; outputs Y, dX,
    dW, dB, ids (int64 [G, N·P], ``g·T + key`` with ``T = S·2^H``). ``N=None``: dynamic batch."""
    fwd, bwd = build_reuse_functions(layer, geom, spec, in_hw, domain, product=product, scatter=scatter)
    h, w = in_hw
    ho, wo = geom.out_hw(h, w)
    G = spec.chunks(geom.K)
    n = N if N is not None else "N"
    f32 = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("X", f32, [n, geom.C, h, w]),
        helper.make_tensor_value_info("W", f32, [geom.Co, geom.C, geom.kh, geom.kw]),
        helper.make_tensor_value_info("B", f32, [geom.Co]),
        helper.make_tensor_value_info("planes", f32, [G, spec.L, spec.H]),
        helper.make_tensor_value_info("dY", f32, [n, geom.Co, ho, wo]),
    ]
    outputs = [
        helper.make_tensor_value_info("Y", f32, [n, geom.Co, ho, wo]),
        helper.make_tensor_value_info("dX", f32, [n, geom.C, h, w]),
        helper.make_tensor_value_info("dW", f32, [geom.Co, geom.C, geom.kh, geom.kw]),
        helper.make_tensor_value_info("dB", f32, [geom.Co]),
        helper.make_tensor_value_info("ids", TensorProto.INT64, [G, N * ho * wo if N is not None else "NP"]),
    ]
    nodes = [
        helper.make_node(
            fwd.name, ["X", "W", "B", "planes"], ["Y", "ids", "centroids", "counts"], name=layer, domain=domain
        ),
        helper.make_node(
            bwd.name,
            ["dY", "X", "W", "ids", "centroids", "counts"],
            ["dX", "dW", "dB"],
            name=f"{layer}.grad",
            domain=domain,
        ),
    ]
    graph = helper.make_graph(nodes, f"reuse_reference_{safe_name(layer)}", inputs, outputs)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(domain, 1)],
        functions=[fwd, bwd],
        producer_name="accelc-tests",
    )
    model.ir_version = IR_VERSION
    return model


def _session(model, threads=2):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _inputs(geom, spec, in_hw, N, seed):
    rng = np.random.default_rng(seed)
    ho, wo = geom.out_hw(*in_hw)
    return dict(
        X=(rng.standard_normal((N, geom.C, *in_hw)) + 0.5).astype(np.float32),
        W=rng.standard_normal((geom.Co, geom.C, geom.kh, geom.kw)).astype(np.float32),
        B=rng.standard_normal(geom.Co).astype(np.float32),
        planes=make_planes(spec.chunks(geom.K), spec.L, spec.H, seed + 1),
        dY=rng.standard_normal((N, geom.Co, ho, wo)).astype(np.float32),
    )


def _run(geom, spec, in_hw, N=2, seed=0, threads=2, **kw):
    feed = _inputs(geom, spec, in_hw, N, seed)
    sess = _session(reference_model(geom, spec, in_hw, **kw), threads)
    names = [o.name for o in sess.get_outputs()]
    return feed, dict(zip(names, sess.run(None, feed)))


def _keys(ids, geom, spec, in_hw, N):
    """Per-chunk cluster keys [G, N·P] from the global ids (g·T + key), checked for range."""
    G = spec.chunks(geom.K)
    P = int(np.prod(geom.out_hw(*in_hw)))
    T = (N if spec.scope == "image" else 1) << spec.H
    assert ids.shape == (G, N * P) and ids.dtype == np.int64
    key = ids - np.arange(G, dtype=np.int64)[:, None] * T
    assert key.min() >= 0 and key.max() < T
    if spec.scope == "image":
        np.testing.assert_array_equal(key >> spec.H, np.broadcast_to(np.arange(N * P) // P, key.shape))
    return key


def _torch_on_same_clusters(feed, out, geom, spec, in_hw):
    """forward_torch/backward_torch on the assignments recovered from the ONNX ids."""
    N = feed["X"].shape[0]
    G = spec.chunks(geom.K)
    key = _keys(out["ids"], geom, spec, in_hw, N)
    bucket = (key & ((1 << spec.H) - 1)).reshape(G, N, -1).transpose(1, 0, 2)  # [N, G, P]
    buckets = torch.from_numpy(np.ascontiguousarray(bucket)).to(torch.int32)
    x, w, b, dy = (torch.from_numpy(feed[k]) for k in ("X", "W", "B", "dY"))
    ref_buckets = hash_buckets(x, torch.from_numpy(feed["planes"]), geom, spec)
    agree = float((ref_buckets == buckets).float().mean())
    assert agree >= 0.99, f"only {agree:.4f} of the buckets agree with hash_buckets"
    ids, offsets = cluster_torch(buckets, spec.H, spec.scope)
    y, ctx = forward_torch(x, w, b, ids, offsets, geom, spec)
    dx, dw, db = backward_torch(dy, x, w, ctx, geom, spec)
    return dict(Y=y, dX=dx, dW=dw, dB=db), ctx


def _close(a, b, what, rtol=1e-4):
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    scale = max(float(np.abs(b).max()), 1e-12)
    err = float(np.abs(a - b).max()) / scale
    assert err <= rtol, f"{what}: max error {err:.2e} of the largest magnitude"


C, CO, HW = 5, 7, (9, 8)
CASES = {
    # name: geometry, spec
    "s1_pad1_L9_image_exact": (ConvGeom(C, CO, 3, 3, pads=(1, 1, 1, 1)), ReuseSpec(L=9, H=4)),
    "s2_asym_L7_batch_cluster": (
        ConvGeom(C, CO, 3, 3, stride=(2, 2), pads=(1, 0, 2, 1)),
        ReuseSpec(L=7, H=3, scope="batch", input_grad="cluster"),
    ),
    "s2_asym_L4_image_cluster": (
        ConvGeom(C, CO, 3, 3, stride=(2, 2), pads=(0, 1, 1, 2)),
        ReuseSpec(L=4, H=3, scope="image", input_grad="cluster"),
    ),
    "s2_asym_L10_batch_exact": (
        ConvGeom(C, CO, 3, 3, stride=(2, 2), pads=(1, 0, 2, 1)),
        ReuseSpec(L=10, H=5, scope="batch", input_grad="exact"),
    ),
    "dil_s21_L6_image_cluster": (
        ConvGeom(C, CO, 3, 3, stride=(2, 1), pads=(0, 2, 1, 0), dilation=(2, 1)),
        ReuseSpec(L=6, H=4, scope="image", input_grad="cluster"),
    ),
    "nopad_L45_batch_exact": (ConvGeom(C, CO, 3, 3), ReuseSpec(L=45, H=6, scope="batch")),
}


@pytest.mark.parametrize("product", ["table", "rows"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_reference_on_same_clusters(case, product):
    geom, spec = CASES[case]
    feed, out = _run(geom, spec, HW, N=2, seed=len(case), product=product)
    ref, ctx = _torch_on_same_clusters(feed, out, geom, spec, HW)
    assert ctx.remain_ratio < 1.0  # real clustering happened
    for k in ("Y", "dX", "dW", "dB"):
        _close(out[k], ref[k].numpy(), f"{case}/{product}/{k}")


def test_dynamic_batch_and_scatternd_single_thread():
    geom, spec = CASES["s2_asym_L4_image_cluster"]
    for N in (1, 3):
        feed, out = _run(geom, spec, HW, N=N, seed=7 + N, threads=1, scatter="nd")
        ref, _ = _torch_on_same_clusters(feed, out, geom, spec, HW)
        for k in ("Y", "dX", "dW", "dB"):
            _close(out[k], ref[k].numpy(), f"N={N}/{k}")


def test_static_batch_model():
    geom, spec = CASES["s2_asym_L7_batch_cluster"]
    feed = _inputs(geom, spec, HW, 2, 11)
    model = reference_model(geom, spec, HW, N=2)
    out = dict(zip(["Y", "dX", "dW", "dB", "ids"], _session(model).run(None, feed)))
    ref, _ = _torch_on_same_clusters(feed, out, geom, spec, HW)
    for k in ("Y", "dX", "dW", "dB"):
        _close(out[k], ref[k].numpy(), k)


@pytest.mark.parametrize("scope,input_grad", [("batch", "exact"), ("image", "cluster")])
def test_large_h_every_row_its_own_cluster_is_the_convolution(scope, input_grad):
    geom = ConvGeom(2, 3, 3, 3, stride=(1, 2))
    spec = ReuseSpec(L=9, H=20, scope=scope, input_grad=input_grad)
    in_hw = (5, 7)
    N = 2
    feed, out = _run(geom, spec, in_hw, N=N, seed=5)
    key = _keys(out["ids"], geom, spec, in_hw, N)
    for g in range(key.shape[0]):
        assert np.unique(key[g]).size == key.shape[1], f"chunk {g}: rows share a cluster"
    x = torch.from_numpy(feed["X"]).requires_grad_(True)
    w = torch.from_numpy(feed["W"]).requires_grad_(True)
    y = F.conv2d(x, w, torch.from_numpy(feed["B"]), stride=geom.stride)
    y.backward(torch.from_numpy(feed["dY"]))
    _close(out["Y"], y.detach().numpy(), "Y")
    _close(out["dX"], x.grad.numpy(), "dX")
    _close(out["dW"], w.grad.numpy(), "dW")
    _close(out["dB"], feed["dY"].sum(axis=(0, 2, 3)), "dB")


def test_functions_structure():
    geom, spec = CASES["s2_asym_L7_batch_cluster"]
    fwd, bwd = build_reuse_functions("features.0/conv", geom, spec, HW)
    assert fwd.name == forward_name("features.0/conv") == "ReuseConv_features_0_conv"
    assert bwd.name == backward_name("features.0/conv") == "ReuseConvGrad_features_0_conv"
    assert fwd.domain == bwd.domain == DOMAIN
    assert list(fwd.input) == ["X", "W", "B", "planes"]
    assert list(fwd.output) == ["Y", "ids", "centroids", "counts"]
    assert list(bwd.input) == ["dY", "X", "W", "ids", "centroids", "counts"]
    assert list(bwd.output) == ["dX", "dW", "dB"]
    for f in (fwd, bwd):
        names = [n.name for n in f.node]
        assert all(names) and len(set(names)) == len(names)
        assert all(n.domain in ("", "ai.onnx") for n in f.node)
        assert [(o.domain, o.version) for o in f.opset_import] == [("", 17)]
    model = reference_model(geom, spec, HW, layer="features.0/conv")
    assert model.ir_version == 10
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 17), (DOMAIN, 1)}
    assert [n.op_type for n in model.graph.node] == [fwd.name, bwd.name]
    onnx.checker.check_model(model, full_check=True)
