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
        d = image_down_matrix(k, s)
        assert d.shape == (ks, k) and np.allclose(d.sum(axis=1), 1.0)  # a pixel is an average
        p = kernel_resize_matrix(k, s, "pi")
        w = np.random.default_rng(k).standard_normal(k)
        r = d.T @ (p @ w) - w  # least squares: the residual of D^T w' = w is orthogonal to D^T's columns
        assert np.abs(d @ r).max() < 1e-10
        assert np.isclose((p @ np.ones(k)).sum(), k)  # a flat kernel keeps its sum
        assert np.array_equal(kernel_resize_matrix(k, s, "shrink"), kernel_down_matrix(k, s))


class Net(nn.Module):
    """a 5x5 conv (the large kernel), BN, ReLU, pool, a 3x3 conv, flatten -> Linear at 16x16."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 5, padding=2)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)
        self.resize = None  # (P_h, P_w) of the small stage

    def forward(self, x):
        w = self.c1.weight
        if self.resize is not None:
            ph, pw = (torch.from_numpy(p).to(w.dtype) for p in self.resize)
            w = ph @ w @ pw.T
        h = F.conv2d(x, w, self.c1.bias, padding=(w.shape[-1] - 1) // 2)
        h = torch.relu(self.c2(F.max_pool2d(torch.relu(self.bn(h)), 2)))
        if h.shape[-1] != 8:
            h = F.adaptive_avg_pool2d(h, (8, 8))
        return self.fc(h.flatten(1))


@pytest.fixture(scope="module", params=["shrink", "pi"])
def big(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"big-{request.param}")
    torch.manual_seed(0)
    module = Net()
    accelc.export(module, torch.zeros(2, 1, 16, 16), d / "m.onnx")
    opts = {"mode": "progressive", "large_kernels": request.param}
    rep = accelc.compile(d / "m.onnx", d / "art", passes=["rescale"], pass_options={"rescale": opts})
    return SimpleNamespace(art=d / "art", module=module, how=request.param, report=rep)


def test_a_large_kernel_is_resized_in_the_graph_and_trains_like_torch(big):
    from accelc.runtime.session import TrainingSession

    root, _ = load_artifacts(big.art)
    (entry,) = root.plan
    assert entry["options"]["large_kernels"] == big.how
    # at 8x8 (scale 2) the 5x5 kernel reads as 3x3; at 12x12 its radius 2 / 1.33 rounds up to 2: kept
    assert {s["dir"]: s["kernels"] for s in entry["stages"]} == {
        "stage-8x8": {"c1.weight": {"from": [5, 5], "to": [3, 3]}},
        "stage-12x12": {},
    }
    stage, _ = load_artifacts(big.art / "stage-8x8")
    shapes = {i.name: [x.dim_value for x in i.type.tensor_type.shape.dim] for i in stage.eval.graph.input}
    assert shapes["c1.weight"] == [4, 1, 5, 5]  # the parameter keeps its full shape
    rec = next(p for p in big.report["passes"] if p["name"] == "rescale")
    assert f"kernel 'c1.weight' 5x5 -> 3x3 ({big.how})" in json.dumps(rec["changes"])

    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 4).astype(np.int64)
    loss, grads, _ = TrainingSession(big.art / "stage-8x8").compute_gradients(x, y)
    p = kernel_resize_matrix(5, 2.0, big.how)

    def torch_grads(dtype):
        m = Net().to(dtype).train()
        m.load_state_dict(big.module.state_dict())
        m.resize = (p, p)
        out = F.cross_entropy(m(torch.from_numpy(x).to(dtype)), torch.from_numpy(y))
        out.backward()
        return float(out), {k: q.grad.numpy() for k, q in m.named_parameters()}

    tloss, tgrads = torch_grads(torch.float32)
    assert abs(loss - tloss) <= 1e-4 * max(1.0, abs(tloss)), (loss, tloss)
    assert set(grads) == set(tgrads) and grads["c1.weight"].shape == (4, 1, 5, 5)
    bad = off_gradients(grads, tgrads, torch_grads(torch.float64)[1], 1e-4)
    assert not bad, bad


def test_a_ramped_run_with_resized_kernels(big, tmp_path):
    s = accelc.train(
        big.art, "synthetic", epochs=4, train_limit=256, batch_size=32, run_dir=tmp_path / "r", progress=False
    )
    sizes = [m["input_hw"] for m in s["history"]]
    assert sizes == [[8, 8], [8, 8], [12, 12], [16, 16]], sizes
    assert all(np.isfinite(m["train_loss"]) for m in s["history"])
