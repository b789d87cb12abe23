"""rescale, progressive mode with ``--rescale-large-kernels shrink|pi``: a large kernel reads its
full-size weight resized in the graph at a size below full (the matrices, the compiled stages, their
loss and gradients against torch, a run)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import accelc
from accelc.compiler.artifact_dir import load_artifacts
from accelc.passes.rescale.progressive import image_down_matrix, kernel_resize_matrix
from accelc.passes.rescale.rewrite import kernel_down_matrix, small_size

from conftest import off_gradients


def test_the_resize_matrices():
    for k, s in [(7, 2.0), (5, 2.0), (7, 1.6), (9, 4.0)]:
        ks = small_size(k, s)
        d, off = image_down_matrix(k, s)
        assert d.shape[0] == ks and np.allclose(d.sum(axis=1), 1.0)  # a small pixel is an average
        assert d[:, 0].any() and d[:, -1].any() and off == (d.shape[1] - k) // 2  # the whole support
        p = kernel_resize_matrix(k, s, "pi")
        w = np.random.default_rng(k).standard_normal(k)
        wide = np.zeros(d.shape[1])
        wide[off : off + k] = w
        r = d.T @ (p @ w) - wide  # least squares: the residual is orthogonal to Dᵀ's columns
        assert p.shape == (ks, k) and np.abs(d @ r).max() < 1e-10
        shrink = kernel_resize_matrix(k, s, "shrink")
        assert np.array_equal(shrink, kernel_down_matrix(k, s)) and np.isclose((shrink @ np.ones(k)).sum(), k)


def test_only_centred_odd_kernels_are_resized():
    from onnx import helper

    from accelc.passes.rescale.progressive import _resizable

    def conv(**attrs):
        return helper.make_node("Conv", ["x", "w"], ["y"], **attrs)

    assert _resizable(conv(pads=[3, 2, 3, 2]), [7, 5], 5)
    assert not _resizable(conv(pads=[3, 2, 3, 2]), [7, 5], 7)  # below --rescale-min-kernel
    assert not _resizable(conv(pads=[0, 0, 0, 0], strides=[16, 16]), [17, 17], 5)  # patchify: no pads
    assert not _resizable(conv(pads=[2, 2, 3, 3]), [6, 6], 5)  # even
    assert not _resizable(conv(pads=[3, 2, 3, 2], dilations=[2, 2]), [7, 5], 5)
    assert not _resizable(conv(auto_pad="SAME_UPPER"), [7, 5], 5)


class Net(nn.Module):
    """a 7x5 conv (the large kernel), BN, ReLU, pool, a 3x3 conv, flatten -> Linear at 16x24."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, (7, 5), padding=(3, 2))
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 12, 10)
        self.resize = None  # (P_h, P_w) of a smaller stage

    def forward(self, x):
        w = self.c1.weight
        if self.resize is not None:
            ph, pw = (torch.from_numpy(p).to(w.dtype) for p in self.resize)
            w = ph @ w @ pw.T
        h = F.conv2d(x, w, self.c1.bias, padding=((w.shape[2] - 1) // 2, (w.shape[3] - 1) // 2))
        h = torch.relu(self.c2(F.max_pool2d(torch.relu(self.bn(h)), 2)))
        if tuple(h.shape[2:]) != (8, 12):
            h = F.adaptive_avg_pool2d(h, (8, 12))
        return self.fc(h.flatten(1))


@pytest.fixture(scope="module", params=["keep", "shrink", "pi"])
def big(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"big-{request.param}")
    torch.manual_seed(0)
    module = Net()
    accelc.export(module, torch.zeros(2, 1, 16, 24), d / "m.onnx")
    opts = {"mode": "progressive", "large_kernels": request.param}
    rep = accelc.compile(d / "m.onnx", d / "art", passes=["rescale"], pass_options={"rescale": opts})
    return SimpleNamespace(art=d / "art", module=module, how=request.param, report=rep)


@pytest.mark.parametrize("hw", [(8, 12), (8, 16)])
def test_a_large_kernel_is_resized_in_the_graph_and_trains_like_torch(big, hw):
    from accelc.runtime.session import TrainingSession

    root, _ = load_artifacts(big.art)
    (entry,) = root.plan
    assert entry["options"]["large_kernels"] == big.how
    assert [s["hw"] for s in entry["stages"]] == [[8, 12], [8, 16], [12, 16], [12, 20]]
    # the scales (2, 2) give 7x5 -> 5x3; (2, 1.5) 7x5 -> 5x5 (the W axis keeps its size); at 12 px
    # high, the radius 3 / 1.33 rounds up to 3: kept
    want = {"stage-8x12": [5, 3], "stage-8x16": [5, 5]} if big.how != "keep" else {}
    got = {s["dir"]: s["kernels"] for s in entry["stages"]}
    assert got == {
        s["dir"]: ({"c1.weight": {"from": [7, 5], "to": want[s["dir"]]}} if s["dir"] in want else {})
        for s in entry["stages"]
    }
    stage, _ = load_artifacts(big.art / f"stage-{hw[0]}x{hw[1]}")
    shapes = {i.name: [x.dim_value for x in i.type.tensor_type.shape.dim] for i in stage.eval.graph.input}
    assert shapes["c1.weight"] == [4, 1, 7, 5]  # the parameter keeps its full shape
    rec = next(p for p in big.report["passes"] if p["name"] == "rescale")
    assert (f"kernel 'c1.weight' 7x5 -> 5x3 ({big.how})" in json.dumps(rec["changes"])) == (big.how != "keep")

    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 1, *hw)).astype(np.float32)
    y = rng.integers(0, 10, 4).astype(np.int64)
    loss, grads, _ = TrainingSession(big.art / f"stage-{hw[0]}x{hw[1]}").compute_gradients(x, y)
    scale = (16 / hw[0], 24 / hw[1])
    small = want.get(f"stage-{hw[0]}x{hw[1]}", [7, 5])
    p = [np.eye(k) if ks == k else kernel_resize_matrix(k, s, big.how) for k, ks, s in zip([7, 5], small, scale)]

    def torch_grads(dtype):
        m = Net().to(dtype).train()
        m.load_state_dict(big.module.state_dict())
        m.resize = None if big.how == "keep" else p
        out = F.cross_entropy(m(torch.from_numpy(x).to(dtype)), torch.from_numpy(y))
        out.backward()
        return float(out), {k: q.grad.numpy() for k, q in m.named_parameters()}

    tloss, tgrads = torch_grads(torch.float32)
    assert abs(loss - tloss) <= 1e-4 * max(1.0, abs(tloss)), (loss, tloss)
    assert set(grads) == set(tgrads) and grads["c1.weight"].shape == (4, 1, 7, 5)
    bad = off_gradients(grads, tgrads, torch_grads(torch.float64)[1], 1e-4)
    assert not bad, bad


def test_a_ramped_run_with_resized_kernels(big, tmp_path):
    if big.how != "pi":
        pytest.skip("one run is enough: the modes differ in their constant matrices only")
    s = accelc.train(
        big.art, "synthetic", epochs=4, train_limit=128, batch_size=32, run_dir=tmp_path / "r", progress=False
    )
    assert [m["input_hw"] for m in s["history"]] == [[8, 12], [8, 12], [12, 16], [16, 24]]
    assert all(np.isfinite(m["train_loss"]) for m in s["history"])
