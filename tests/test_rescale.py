"""rescale pass: identity at s=1, the spatial scaling property, down/up round trip, response kept,
and a flatten->Gemm model trains through the switch."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import accelc
from accelc.passes.rescale.rewrite import (
    down_param,
    kernel_down_matrix,
    kernel_up_matrix,
    map_down_matrix,
    map_up_matrix,
    resample_kernel,
    small_size,
    up_param,
)
from accelc.zoo import export_zoo

from conftest import run_cli


def smooth_image(n=64, seed=0, fmax=2.5):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:n, 0:n] / n
    img = sum(
        rng.uniform(0.5, 1)
        * np.sin(2 * np.pi * (rng.uniform(0.5, fmax) * x + rng.uniform(0.5, fmax) * y) + rng.uniform(0, 6))
        for _ in range(4)
    )
    return torch.tensor(img, dtype=torch.float32)[None, None]


def smooth_kernel(k=7, seed=0):
    rng = np.random.default_rng(seed)
    u = np.arange(k) - (k - 1) / 2
    g = np.exp(-(u[:, None] ** 2 + u[None, :] ** 2) / (2 * (k / 4) ** 2))
    tilt = 1 + 0.3 * rng.standard_normal() * u[:, None] / k + 0.3 * rng.standard_normal() * u[None, :] / k
    return (g * tilt / (g * tilt).sum()).astype(np.float32)[None, None]


def down_img(x, s=2):
    return F.avg_pool2d(x, s)


def test_factor_one_is_identity(tmp_path):
    for k in (1, 3, 5, 7):
        assert np.allclose(kernel_down_matrix(k, 1), np.eye(k)) and np.allclose(kernel_up_matrix(k, 1), np.eye(k))
    assert np.allclose(map_down_matrix(8, 1), np.eye(8)) and np.allclose(map_up_matrix(8, 1), np.eye(8))
    export_zoo("largekernel", tmp_path / "m.onnx")
    rep = accelc.compile(
        tmp_path / "m.onnx",
        tmp_path / "a",
        passes=["rescale"],
        pass_options={"rescale": {"mode": "kernel", "factor": "1"}},
    )
    rec = [p for p in rep["passes"] if p["name"] == "rescale"][0]
    assert rec["modified"] is False and not (tmp_path / "a" / "stage-low").exists()


def test_spatial_scaling_property():
    """conv(down(x), down(k)) ≈ down(conv(x, k)) for smooth x: relative error below 3%."""
    x = smooth_image()
    for k in (5, 7, 9):
        w = smooth_kernel(k, seed=k)
        ks = small_size(k, 2)
        ws = resample_kernel(w, kernel_down_matrix(k, 2), kernel_down_matrix(k, 2))
        assert ws.shape[-1] == ks and abs(ws.sum() - w.sum()) < 1e-5  # response to a flat input kept
        full = down_img(F.conv2d(x, torch.from_numpy(w), padding=k // 2))
        low = F.conv2d(down_img(x), torch.from_numpy(ws), padding=ks // 2)
        inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))  # borders: padding differs
        err = (low - full)[inner].norm() / full[inner].norm()
        assert err < 0.03, (k, float(err))


def test_strided_layer_keeps_its_response():
    """The zoo's 7x7/2 pad 3 conv becomes 5x5/2 pad 2 at half resolution; responses agree within
    8% on a smooth image. (Strided sampling puts the two output grids half a full-resolution pixel
    apart, which is most of the remaining difference.)"""
    x = smooth_image(64, seed=3, fmax=1.2)
    w = smooth_kernel(7, seed=1)
    ws = resample_kernel(w, kernel_down_matrix(7, 2), kernel_down_matrix(7, 2))
    full = down_img(F.conv2d(x, torch.from_numpy(w), stride=2, padding=3))
    low = F.conv2d(down_img(x), torch.from_numpy(ws), stride=2, padding=2)
    assert full.shape == low.shape
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    err = (low - full)[inner].norm() / full[inner].norm()
    assert err < 0.08, float(err)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_down_then_up_returns_close_to_original(method):
    """Relative L2 error of the round trip for a smooth (Gaussian-like) kernel: measured 0.27/0.23/
    0.14/0.11 (bilinear) for k = 5/7/9/11 — a 5×5 kernel keeps only 3×3 taps at s = 2, so the
    error shrinks as kernels grow; the kernel's sum is kept exactly."""
    errs = {}
    for k in (5, 7, 9, 11):
        w = smooth_kernel(k, seed=k)
        spec = {"kind": "conv", "full": [1, 1, k, k]}
        back = up_param(down_param(w, spec, 2), spec, 2, method)
        assert back.shape == w.shape
        errs[k] = np.linalg.norm(back - w) / np.linalg.norm(w)
        assert errs[k] < 0.3, (k, method, errs[k])
        assert abs(back.sum() - w.sum()) < 1e-4 * abs(w.sum())
    assert errs[11] < 0.15 and errs[11] < errs[7] < errs[5] + 0.02
    # Gemm head over a smooth 8x8 map of 3 channels
    yy, xx = np.mgrid[0:8, 0:8] / 8
    fmap = np.stack([np.sin(2 * xx + c) + np.cos(3 * yy) for c in range(3)])
    wg = np.stack([fmap * (o + 1) for o in range(4)]).reshape(4, -1).astype(np.float32)
    spec = {"kind": "gemm", "chw": [3, 8, 8], "transB": True, "full": [4, 192]}
    small = down_param(wg, spec, 2)
    assert small.shape == (4, 48)
    back = up_param(small, spec, 2, method)
    assert np.linalg.norm(back - wg) / np.linalg.norm(wg) < 0.25


@pytest.mark.slow
def test_low_resolution_stage_and_switch_through_gemm_head(tmp_path):
    export_zoo("largekernel", tmp_path / "m.onnx")
    r = run_cli(
        "compile",
        tmp_path / "m.onnx",
        "-o",
        tmp_path / "a",
        "--passes",
        "rescale",
        "--rescale-mode",
        "kernel",
        "--rescale-switch",
        "epoch:1",
    )
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())["controllers"][0]
    assert plan["input_hw"] == [32, 32] and plan["params"]["c1.weight"]["small"] == [32, 1, 5, 5]
    assert plan["params"]["fc.weight"]["kind"] == "gemm"
    import onnx

    ev = onnx.load(str(tmp_path / "a" / "stage-low" / "eval_model.onnx"))
    assert [d.dim_value for d in ev.graph.input[0].type.tensor_type.shape.dim][2:] == [32, 32]
    r = run_cli(
        "train",
        tmp_path / "a",
        "--data",
        "synthetic:256",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "-o",
        tmp_path / "run",
    )
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["input_hw"] for m in lines] == [[32, 32], [64, 64]]
    assert lines[0]["decisions"][0]["action"] == "switch"
    assert all(np.isfinite(m["train_loss"]) for m in lines)
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["controllers"]["rescale"]["switch_epoch"] == 1


def test_head_over_a_map_s_does_not_divide(tmp_path):
    """largekernel at 56x56: final map 7x7, at 28x28 it is 3x3 (pooling rounds down); the head is
    resampled 7x7 -> 3x3 instead of refused."""
    export_zoo("largekernel", tmp_path / "m.onnx", input_shape=(1, 56, 56))
    rep = accelc.compile(
        tmp_path / "m.onnx", tmp_path / "a", passes=["rescale"], pass_options={"rescale": {"mode": "kernel"}}
    )
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())["controllers"][0]
    fc = plan["params"]["fc.weight"]
    assert fc["chw"][1:] == [7, 7] and fc["small_chw"][1:] == [3, 3]
    rec = [p for p in rep["passes"] if p["name"] == "rescale"][0]
    assert any("head over a 3x3 map (from 7x7)" in c["summary"] for c in rec["changes"]), rec["changes"]


def test_head_resampling_between_any_sizes():
    """Area weights down, interpolation up: both keep the weights' sum (every column sums to 1), so
    a flat feature map (the low-resolution map is the mean of the positions it covers) gets the same
    Gemm output at both sizes; at n = s*m the matrices are the block sums of before."""
    for n, s in ((8, 2), (12, 3), (6, 1)):
        block = np.kron(np.eye(n // s), np.ones((1, s)))
        assert np.allclose(map_down_matrix(n, s), block) and np.allclose(map_down_matrix(n, s, n // s), block)
        assert np.allclose(map_up_matrix(n, s), map_up_matrix(n, s, m=n // s))
    rng = np.random.default_rng(0)
    for n, m in ((7, 3), (3, 1), (9, 4), (5, 2)):
        d, u = map_down_matrix(n, 2, m), map_up_matrix(n, 2, "bilinear", m)
        assert d.shape == (m, n) and u.shape == (n, m)
        assert np.allclose(d.sum(axis=0), 1) and np.allclose(u.sum(axis=0), 1) and (d >= 0).all()
        spec = {"kind": "gemm", "chw": [3, n, n], "small_chw": [3, m, m], "transB": True, "full": [4, 3 * n * n]}
        w = rng.standard_normal((4, 3 * n * n)).astype(np.float32)
        small = down_param(w, spec, 2)
        assert small.shape == (4, 3 * m * m)
        back = up_param(small, spec, 2, "bilinear")
        assert back.shape == w.shape
        assert np.allclose(back.reshape(4, 3, -1).sum(-1), w.reshape(4, 3, -1).sum(-1), atol=1e-4)
        flat = np.repeat(rng.standard_normal(3), n * n).astype(np.float32)  # one value per channel
        flat_low = np.repeat(flat[:: n * n], m * m)
        assert np.allclose(small @ flat_low, w @ flat, atol=1e-4)
        assert np.allclose(back @ flat, w @ flat, atol=1e-4)
        # a smooth map: the low-resolution map is its area mean; the outputs stay close
        yy, xx = np.mgrid[0:n, 0:n] / n
        fmap = np.stack([1 + 0.3 * np.sin(2 * xx + c) * np.cos(yy) for c in range(3)])
        mean = d / d.sum(axis=1, keepdims=True)
        low = np.einsum("ph,chw,qw->cpq", mean, fmap, mean)
        wp = np.abs(w)  # positive weights: the comparison is not a difference of large terms
        sp = down_param(wp, spec, 2)
        assert np.allclose(sp @ low.ravel(), wp @ fmap.ravel(), rtol=0.05)


def test_quick_start_vgg_at_28_rescales_and_trains(tmp_path):
    """The quick start's VGG (28x28: final map 3x3, 1x1 at 14x14) compiles with rescale and
    trains through the switch."""
    from accelc.runtime.spec import TrainSpec
    from accelc.runtime.train import train

    export_zoo("vgg", tmp_path / "vgg.onnx")
    accelc.compile(
        tmp_path / "vgg.onnx",
        tmp_path / "a",
        passes=["rescale"],
        pass_options={"rescale": {"mode": "kernel", "switch": "epoch:1"}},
    )
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())["controllers"][0]
    assert plan["input_hw"] == [14, 14]
    assert plan["params"]["fc1.weight"]["chw"] == [128, 3, 3] and plan["params"]["fc1.weight"]["small_chw"] == [
        128,
        1,
        1,
    ]
    run = TrainSpec(
        artifacts=tmp_path / "a",
        data="synthetic:128",
        epochs=2,
        batch_size=32,
        run_dir=tmp_path / "run",
        progress=False,
    )
    s = train(run)
    assert [m["input_hw"] for m in s["history"]] == [[14, 14], [28, 28]]
    assert [m["variant"] for m in s["history"]] == ["rescale:low(s=2)", "rescale:full"]
    assert all(np.isfinite(m["train_loss"]) for m in s["history"])


def test_refusals_give_advice_that_works(tmp_path):
    from conftest import assert_api_refused

    export_zoo("vgg", tmp_path / "vgg.onnx")

    def comp(path, factor, out):
        return accelc.compile(
            path, out, passes=["rescale"], pass_options={"rescale": {"mode": "kernel", "factor": str(factor)}}
        )

    msg = assert_api_refused(lambda: comp(tmp_path / "vgg.onnx", 3, tmp_path / "a3"), "not divisible by s=3")
    assert "--rescale-factor 2," in msg and "--input-shape 1,30,30" in msg, msg
    assert not (tmp_path / "a3").exists()
    # a factor that divides 28 but leaves the last pool a map smaller than its window: refused, not crashed
    assert_api_refused(lambda: comp(tmp_path / "vgg.onnx", 4, tmp_path / "a4"), "smaller than its window")
    # the advice: --rescale-factor 2 (the test above), or the model exported at 30x30 for s=3
    export_zoo("vgg", tmp_path / "vgg30.onnx", input_shape=(1, 30, 30))
    comp(tmp_path / "vgg30.onnx", 3, tmp_path / "a30")
    plan = json.loads((tmp_path / "a30" / "plan.json").read_text())["controllers"][0]
    assert plan["input_hw"] == [10, 10]


def test_switch_rules():
    from accelc.passes.rescale.algorithm import Rescale

    class Base:
        stages = {"stage-low": None}

    def ctrl(rule):
        return Rescale(Base(), {"stage": "stage-low", "params": {}, "options": {"switch": rule, "factor": 2}})

    c = ctrl("epoch:2")
    assert c._due(1, {"test_loss": 1.0}, 6) is None and c._due(2, {"test_loss": 1.0}, 6)
    c = ctrl("fraction:0.5")
    assert c._due(2, {"test_loss": 1.0}, 6) is None and c._due(3, {"test_loss": 1.0}, 6)
    c = ctrl("plateau:2")
    losses = [1.0, 0.8, 0.79999, 0.81, 0.7]
    due = [c._due(e + 1, {"test_loss": l}, 10) for e, l in enumerate(losses)]
    assert due[:3] == [None, None, None] and due[3] and "did not improve" in due[3]


def test_a_legalised_average_pool_trains_through_the_switch_resumes_and_exports(tmp_path):
    """An AveragePool accelc rewrites as a constant depthwise Conv (ORT 1.19.2 cannot train it) stays
    a constant in the low-resolution stage too: the run trains, switches, resumes and exports (the
    stage once held it as a parameter the full-size session lacked; found by the coverage suite
    on timm's resnet10t)."""
    import onnxruntime as ort
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(1, 8, 5, padding=2)
            self.c2 = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            h = F.avg_pool2d(torch.relu(self.c1(x)), 2)
            return self.fc(F.adaptive_avg_pool2d(torch.relu(self.c2(h)), 1).flatten(1))

    torch.manual_seed(0)
    accelc.export(Net(), torch.zeros(2, 1, 16, 16), tmp_path / "m.onnx")
    kernel = {
        "rescale": {"mode": "kernel"}
    }  # the stage of the seed's mode (progressive: tests/test_rescale_progressive.py)
    rep = accelc.compile(tmp_path / "m.onnx", tmp_path / "art", passes=["rescale"], pass_options=kernel)
    assert any("AveragePool" in n for n in rep["fixups"])
    kw = {"batch_size": 8, "run_dir": tmp_path / "run", "progress": False}
    accelc.train(tmp_path / "art", "synthetic:32", epochs=1, **kw)
    s = accelc.train(tmp_path / "art", "synthetic:32", epochs=3, resume=True, allow_change=["epochs"], **kw)
    assert s["epochs"] == 3
    out = accelc.export_run(tmp_path / "run", tmp_path / "model.onnx")
    x = np.zeros((2, 1, 16, 16), np.float32)
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.isfinite(sess.run(None, {out["input"]["name"]: x})[0]).all()
