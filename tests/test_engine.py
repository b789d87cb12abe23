"""accelc's engine (every op on its ATen kernels) against the reference engine (``--kernel all=ort``:
the whole step on ORT Training's kernels) on every zoo model: no ORT segment in the step, loss and
every gradient on one batch judged against torch float64, and 3 AdamW steps."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import accelc
from accelc.runtime.config import ExecConfig
from accelc.runtime.session import TrainingSession
from accelc.zoo import ZOO, zoo_module

REF = ExecConfig(kernels={"all": "ort"})


def _batch(shape, n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *shape)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    out = {}
    for name in ZOO:
        module, shape = zoo_module(name)
        accelc.export(module, torch.zeros(2, *shape), d / f"{name}.onnx")
        accelc.compile(d / f"{name}.onnx", d / name)
        out[name] = (d / name, module, shape)
    return out


@pytest.mark.parametrize("name", ZOO)
def test_zoo_step_runs_without_ort_and_matches_the_reference(zoo, name):
    art, module, shape = zoo[name]
    ours, ref = TrainingSession(art), TrainingSession(art, REF)
    x, y = _batch(shape, 8)
    lo, go, _ = ours.compute_gradients(x, y)
    rep = ours.engine_report()
    assert rep["ort_segments"] == 0 and rep["fell_back"] == {} and rep["eval"] == "accelc", rep
    assert ref.runner is None  # the reference: one ORT session, nothing of accelc's
    lr_, gr, _ = ref.compute_gradients(x, y)
    assert abs(lo - lr_) <= 1e-5 * abs(lr_)
    # torch float64 on the same weights: ours no further from it than ORT's own float32 (x2), or
    # within 1e-4 of the largest gradient
    m = copy.deepcopy(module).double().train()
    m.load_state_dict({k: torch.from_numpy(v).double() for k, v in ref.param_arrays().items()}, strict=False)
    F.cross_entropy(m(torch.from_numpy(x).double()), torch.from_numpy(y)).backward()
    g64 = {k: p.grad.numpy() for k, p in m.named_parameters() if k in go}
    floor = 1e-4 * max(np.linalg.norm(g) for g in g64.values())
    for k, g in g64.items():
        ours_err = np.linalg.norm(go[k] - g)
        ort_err = np.linalg.norm(gr[k] - g)
        assert ours_err <= 2 * ort_err + floor + 1e-5 * np.linalg.norm(g), (k, ours_err, ort_err)
    # evaluation on the same kernels equals ORT's eval graph
    le, logits = ours.evaluate_batch(x, y)
    lre, rlogits = ref.evaluate_batch(x, y)
    assert abs(le - lre) <= 1e-5 * abs(lre) and np.allclose(logits, rlogits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_three_adamw_steps_track_the_reference(zoo, name):
    art, _, shape = zoo[name]
    ours, ref = TrainingSession(art), TrainingSession(art, REF)
    for step in range(3):
        x, y = _batch(shape, 16, seed=step)
        a, b = ours.train_step(x, y).loss, ref.train_step(x, y).loss
        assert abs(a - b) <= 1e-4 * abs(b), (step, a, b)
    pa, pb = ours.param_arrays(), ref.param_arrays()
    # BatchNorm running statistics included; AdamW's first steps move every weight by ~lr, so
    # float32 noise shows as at most a small fraction of lr
    worst = max(float(np.abs(pa[k] - pb[k]).max()) for k in pa)
    assert worst <= 1e-4, worst


def test_kernel_aten_ort_leaves_the_standard_ops_to_ort(zoo):
    art, _, shape = zoo["vgg"]
    s = TrainingSession(art, ExecConfig(kernels={"aten": "ort"}))
    rep = s.engine_report()
    assert rep["ort_segments"] > 0 and "BatchNormInternal" in rep["fell_back"] and rep["eval"] == "ort"
    s.train_step(*_batch(shape, 4))
    assert s.engine_report()["ort_ms_per_step"] > 0
