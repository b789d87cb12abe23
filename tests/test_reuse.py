"""Adaptive deep reuse: kernels, exactness, the pass, the executor and the controller."""

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from accelc.passes.reuse import native as reuse_native
from accelc.passes.reuse.kernels import backward_torch, cluster_torch, forward_torch, hash_buckets
from accelc.passes.reuse.node import reuse_backward, reuse_forward
from accelc.passes.reuse.spec import ConvGeom, ReuseSpec, make_planes
from accelc.runtime.config import ExecConfig

from conftest import export_test_model, rel_err, run_cli

needs_native = pytest.mark.skipif(not reuse_native.available(), reason="no C compiler for the native kernels")
GEOMS = [
    ConvGeom(5, 7, 3, 3, (1, 1), (1, 1, 1, 1)),
    ConvGeom(6, 4, 3, 3, (2, 2), (0, 1, 1, 0)),
    ConvGeom(4, 5, 3, 2, (1, 2), (2, 1, 2, 1), (2, 1)),
]


def _conv(x, w, b, geom):
    pt, pl, pb, pr = geom.pads
    return F.conv2d(F.pad(x, (pl, pr, pt, pb)), w, b, stride=geom.stride, dilation=geom.dilation)


def _identity_ids(n, P, G):
    ids = torch.stack([torch.arange(n * P).view(n, P) + g * n * P for g in range(G)], 1).int()
    return ids, [g * n * P for g in range(G + 1)]


def _smooth_images(n, c, h, w, seed=0):
    """Smooth, post-ReLU-like activations (neighbouring rows alike, as in real feature maps)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, c, h // 4 + 1, w // 4 + 1, generator=g)
    x = F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    return torch.relu(x + 0.05 * torch.randn(n, c, h, w, generator=g)).contiguous()


@pytest.mark.parametrize("impl", ["torch", pytest.param("native", marks=needs_native)])
@pytest.mark.parametrize("geom", GEOMS, ids=["s1", "s2-asym", "dil"])
def test_remain_ratio_one_equals_conv(impl, geom):
    """Every row its own cluster: forward and every gradient equal the original conv (1e-4)."""
    torch.manual_seed(0)
    n, h, w = 2, 9, 8
    x = torch.randn(n, geom.C, h, w)
    wt = torch.randn(geom.Co, geom.C, geom.kh, geom.kw)
    b = torch.randn(geom.Co)
    ho, wo = geom.out_hw(h, w)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, wt, b))
    ref = _conv(xr, wr, br, geom)
    dy = torch.randn_like(ref)
    ref.backward(dy)
    for L in (geom.kh * geom.kw, 7):  # aligned chunks and a chunk length that does not divide K
        spec = ReuseSpec(L, 4, "image", "exact")
        ids, offs = _identity_ids(n, ho * wo, spec.chunks(geom.K))
        y, ctx = reuse_forward(x, wt, b, None, geom, spec, impl=impl, ids=ids, offsets=offs)
        assert ctx.remain_ratio == 1.0
        assert rel_err(y, ref.detach()) < 1e-5
        for ig in ("exact", "cluster"):
            dx, dw, db = reuse_backward(dy, x, wt, ctx, geom, ReuseSpec(L, 4, "image", ig), impl=impl)
            assert rel_err(dx, xr.grad) < 1e-4, ig
            assert rel_err(dw, wr.grad) < 1e-4, ig
            assert rel_err(db, br.grad) < 1e-5, ig


@needs_native
def test_many_hyperplanes_make_every_row_its_own_cluster():
    """H = 20 on a small input: hashing alone separates all rows; the layer is then the exact conv."""
    geom = GEOMS[0]
    torch.manual_seed(1)
    x, wt, b = torch.randn(2, 5, 9, 8), torch.randn(7, 5, 3, 3), torch.randn(7)
    spec = ReuseSpec(45, 20, "batch", "cluster")
    planes = torch.from_numpy(make_planes(1, 45, 20, 3))
    y, ctx = reuse_forward(x, wt, b, planes, geom, spec)
    assert ctx.remain_ratio == 1.0
    assert rel_err(y, _conv(x, wt, b, geom)) < 1e-5


@pytest.mark.parametrize("geom", GEOMS[:2], ids=["s1", "s2-asym"])
def test_gradients_match_finite_differences_of_the_clustered_forward(geom):
    """dW, dB and the per-cluster dX are the exact gradients of the reused forward with the
    cluster assignment held fixed (float64 central differences)."""
    torch.manual_seed(2)
    n, h, w = 2, 7, 6
    x = torch.randn(n, geom.C, h, w, dtype=torch.float64)
    wt = torch.randn(geom.Co, geom.C, geom.kh, geom.kw, dtype=torch.float64)
    b = torch.randn(geom.Co, dtype=torch.float64)
    spec = ReuseSpec(7, 3, "image", "cluster")
    planes = torch.from_numpy(make_planes(spec.chunks(geom.K), 7, 3, 0)).double()
    ids, offs = cluster_torch(hash_buckets(x, planes, geom, spec), spec.H, spec.scope)
    y, ctx = forward_torch(x, wt, b, ids, offs, geom, spec)
    assert ctx.remain_ratio < 0.8  # real clustering happens
    r = torch.randn_like(y)

    def loss(xx, ww, bb):
        return float((forward_torch(xx, ww, bb, ids, offs, geom, spec)[0] * r).sum())

    dx, dw, db = backward_torch(r, x, wt, ctx, geom, spec)
    eps = 1e-6
    rng = np.random.default_rng(0)
    for t, grad in ((x, dx), (wt, dw), (b, db)):
        for _ in range(6):
            i = tuple(int(rng.integers(0, s)) for s in t.shape)
            old = float(t[i])
            t[i] = old + eps
            lp = loss(x, wt, b)
            t[i] = old - eps
            lm = loss(x, wt, b)
            t[i] = old
            fd = (lp - lm) / (2 * eps)
            assert abs(fd - float(grad[i])) <= 1e-6 * max(1.0, abs(fd)), (t.shape, i, fd, float(grad[i]))


@pytest.mark.parametrize("impl", ["torch", pytest.param("native", marks=needs_native)])
def test_error_falls_as_H_grows(impl):
    geom = ConvGeom(16, 24, 3, 3, (1, 1), (1, 1, 1, 1))
    x = _smooth_images(4, 16, 16, 16)
    g = torch.Generator().manual_seed(5)
    wt, b = torch.randn(24, 16, 3, 3, generator=g), torch.zeros(24)
    ref = _conv(x, wt, b, geom)
    errs, remains = [], []
    for H in (1, 3, 6, 10, 16):
        spec = ReuseSpec(72, H, "image")
        planes = torch.from_numpy(make_planes(spec.chunks(geom.K), 72, H, 11))
        y, ctx = reuse_forward(x, wt, b, planes, geom, spec, impl=impl)
        errs.append(rel_err(y, ref))
        remains.append(ctx.remain_ratio)
    assert all(a > c for a, c in zip(errs, errs[1:])), errs
    assert all(a < c for a, c in zip(remains, remains[1:])), remains
    assert errs[0] > 0.2 and errs[-1] < errs[0] / 2


def test_centring_matters_for_post_relu_inputs():
    """Hashing through the origin puts post-ReLU rows in few buckets; centring spreads them."""
    geom = ConvGeom(16, 8, 3, 3, (1, 1), (1, 1, 1, 1))
    x = _smooth_images(2, 16, 16, 16) + 0.5  # all positive
    spec = ReuseSpec(144, 8, "image")
    planes = torch.from_numpy(make_planes(1, 144, 8, 0))
    centred = hash_buckets(x, planes, geom, spec)
    origin = hash_buckets(x, planes, geom, spec, mu=torch.zeros(16))
    assert len(torch.unique(centred)) > 2 * len(torch.unique(origin))


@needs_native
@pytest.mark.parametrize("scope", ["image", "batch"])
def test_native_kernels_equal_torch_reference(scope):
    geom = GEOMS[1]
    torch.manual_seed(3)
    x, wt, b = torch.randn(3, 6, 11, 10), torch.randn(4, 6, 3, 3), torch.randn(4)
    for L in (9, 10):
        spec = ReuseSpec(L, 4, scope, "cluster")
        planes = torch.from_numpy(make_planes(spec.chunks(geom.K), L, 4, 1))
        buckets = hash_buckets(x, planes, geom, spec)
        assert torch.equal(reuse_native.hash_buckets(x, planes, geom, spec), buckets)
        ids, offs = cluster_torch(buckets, 4, scope)
        y1, c1 = forward_torch(x, wt, b, ids, offs, geom, spec)
        y2, c2 = reuse_native.forward(x, wt, b, planes, geom, spec, buckets=buckets)
        assert c1.centroids.shape == c2.centroids.shape
        assert rel_err(y2, y1) < 1e-5
        dy = torch.randn_like(y1)
        for a, c in zip(backward_torch(dy, x, wt, c1, geom, spec), reuse_native.backward(dy, x, wt, c2, geom, spec)):
            assert rel_err(c, a) < 1e-5


# ----------------------------------------------------------------------------- the pass and the runtime
@pytest.fixture(scope="module")
def reuse_artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("reuse")
    export_test_model("cnn3-small", d / "m.onnx")
    r = run_cli("compile", d / "m.onnx", "--passes", "reuse", "--reuse-H", "6", "-o", d / "art")
    assert r.returncode == 0, r.stderr
    return d


def test_pass_rewrites_convs_into_one_tagged_node_each(reuse_artifacts):
    art = reuse_artifacts / "art"
    m = onnx.load(art / "training_model.onnx")
    reused = [n for n in m.graph.node if n.domain == "ai.accelc.reuse"]
    assert len(reused) == 4  # c2, c3: forward and backward
    assert not any(n.op_type in ("Conv", "ConvGrad") and n.name in {r.name for r in reused} for n in m.graph.node)
    for n in reused:
        props = {p.key: p.value for p in n.metadata_props}
        assert props["accelc.pass"] == "reuse" and json.loads(props["accelc.reuse.config"])["H"] == 6
    assert {f.name for f in m.functions} == {n.op_type for n in reused}
    assert any(t.name.endswith(".planes") for t in m.graph.initializer)
    ev = onnx.load(art / "eval_model.onnx")
    assert not any(n.domain == "ai.accelc.reuse" for n in ev.graph.node)  # evaluation stays exact
    plan = json.loads((art / "plan.json").read_text())["controllers"]
    assert plan[-1]["type"] == "reuse" and plan[-1]["options"]["strategy"] == "fixed"


def test_native_torch_and_portable_paths_agree(reuse_artifacts):
    """The same training step through accelc's native kernels, the torch kernels and the portable
    standard-op functions inside plain ORT: one loss, one set of gradients."""
    from accelc.runtime.session import TrainingSession

    rng = np.random.default_rng(0)
    shape = tuple(TrainingSession(reuse_artifacts / "art").info.input_shape[-3:])
    x = rng.standard_normal((16,) + shape).astype(np.float32)
    y = rng.integers(0, 10, 16)
    impls = ["torch", "ort"] + (["native"] if reuse_native.available() else [])
    # "ort": the whole graph inside ORT (the reuse nodes as their ONNX functions, ORT's own convs)
    configs = {i: ExecConfig(kernels={"reuse": i, "conv": "ort"} if i == "ort" else {"reuse": i}) for i in impls}
    out = {i: TrainingSession(reuse_artifacts / "art", configs[i]).compute_gradients(x, y) for i in impls}
    ref_loss, ref_g, _ = out["torch"]
    for i in impls[1:]:
        loss, g, _ = out[i]
        assert abs(loss - ref_loss) < 1e-4 * max(1, abs(ref_loss)), i
        for k in ref_g:
            assert rel_err(g[k], ref_g[k]) < 1e-3, (i, k)


@pytest.mark.slow
def test_reuse_off_variant_is_the_plain_graph(reuse_artifacts):
    from accelc.compiler.artifact_dir import load_artifacts
    from accelc.passes.reuse.rewrite import reuse_variant
    from accelc.runtime.session import TrainingSession

    art, _ = load_artifacts(reuse_artifacts / "art")
    off = reuse_variant(art, {})
    assert not any(n.domain == "ai.accelc.reuse" for n in off.training.graph.node)
    r = run_cli("compile", reuse_artifacts / "m.onnx", "-o", reuse_artifacts / "plain")
    assert r.returncode == 0, r.stderr
    rng = np.random.default_rng(1)
    shape = tuple(art.info.input_shape[-3:])
    x, y = rng.standard_normal((8,) + shape).astype(np.float32), rng.integers(0, 10, 8)
    a = TrainingSession(off).compute_gradients(x, y)
    b = TrainingSession(reuse_artifacts / "plain").compute_gradients(x, y)
    assert abs(a[0] - b[0]) < 1e-6
    for k in b[1]:
        assert rel_err(a[1][k], b[1][k]) < 1e-6


@pytest.mark.slow
def test_off_strategy_switches_and_reports(reuse_artifacts, tmp_path):
    r = run_cli(
        "compile",
        reuse_artifacts / "m.onnx",
        "--passes",
        "reuse",
        "--reuse-strategy",
        "off",
        "--reuse-plateau",
        "0.9",
        "--reuse-choose",
        "all",
        "-o",
        tmp_path / "art",
    )
    assert r.returncode == 0, r.stderr
    r = run_cli(
        "train",
        tmp_path / "art",
        "--data",
        "synthetic:600",
        "--epochs",
        "3",
        "--batch-size",
        "50",
        "-o",
        tmp_path / "run",
        "-q",
    )
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    rep = s["controllers"]["reuse"]
    assert [d["action"] for d in rep["switches"]] == ["off"] and rep["switches"][0]["epoch"] == 2
    e1, e3 = rep["epochs"][0], rep["epochs"][2]
    assert all(0 < v["remain_ratio"] < 1 and v["macs_saved"] > 0 for v in e1["layers"].values())
    assert all(v["remain_ratio"] is None and not v["reused"] for v in e3["layers"].values())
    assert s["final_test_acc"] > 0.15


@pytest.mark.slow
def test_bad_reuse_options_are_one_line_errors(reuse_artifacts, tmp_path):
    for args, msg in (
        (["--reuse-H", "40"], "1..20"),
        (["--reuse-layers", "nope"], "not a reusable layer"),
        (["--reuse-schedule", "12"], "L:H"),
    ):
        r = run_cli("compile", reuse_artifacts / "m.onnx", "--passes", "reuse", *args, "-o", tmp_path / "x")
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "x").exists()
