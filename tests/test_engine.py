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
from accelc.runtime.torch_engine import TorchSession
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


def _torch_grads(module, params: dict, x, y, dtype, layout: str) -> dict:
    """torch's gradients of ``module`` at ``params`` on one batch, in ``dtype`` and ``layout``."""
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    m = copy.deepcopy(module).to(dtype).train().to(memory_format=fmt)
    m.load_state_dict({k: torch.from_numpy(v).to(dtype) for k, v in params.items()}, strict=False)
    F.cross_entropy(m(torch.from_numpy(x).to(dtype).contiguous(memory_format=fmt)), torch.from_numpy(y)).backward()
    return {k: p.grad.double().numpy() for k, p in m.named_parameters()}


ACTIVATION_OPS = {"Conv", "BatchNormInternal", "Relu", "MaxPool", "ReluGrad", "BatchNormalizationGrad", "Add"}


def _nhwc_activations(session, x, y) -> tuple[int, int]:
    """(image activations of one step held NHWC, image activations in all): the first output of
    every convolution, BatchNorm, ReLU, pooling, residual add and their gradients, 4-D with more
    than one channel and pixel (where NCHW and NHWC differ)."""
    env: dict = {}
    session._forward_backward(x, y, env)
    names = [k.outputs[0] for k in session.runner.kernels.values() if k.node.op_type in ACTIVATION_OPS]
    acts = [env[n] for n in names if n in env and env[n].dim() == 4 and min(env[n].shape[1:]) > 1]
    nhwc = [t for t in acts if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()]
    return len(nhwc), len(acts)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_step_runs_without_ort_and_matches_the_reference(zoo, name, layout):
    art, module, shape = zoo[name]
    ours, ref = TrainingSession(art, ExecConfig(layout=layout)), TrainingSession(art, REF)
    x, y = _batch(shape, 8)
    lo, go, _ = ours.compute_gradients(x, y)
    rep = ours.engine_report()
    assert rep["ort_segments"] == 0 and rep["fell_back"] == {} and rep["eval"] == "accelc", rep
    assert rep["layout"]["layout"] == layout
    nhwc, acts = _nhwc_activations(ours, x, y)
    # NHWC from the first convolution to the flatten before the head: every image activation
    assert (nhwc == acts > 0) if layout == "nhwc" else nhwc == 0, (nhwc, acts)
    assert ref.runner is None  # the reference: one ORT session, nothing of accelc's
    lr_, gr, _ = ref.compute_gradients(x, y)
    assert abs(lo - lr_) <= 1e-5 * abs(lr_)
    # torch float64 on the same weights: ours no further from it than float32 itself (x2: ORT's,
    # or torch's in the same layout), or within 1e-4 of the largest gradient. (A ReLU input within
    # float32 rounding of 0 lands on either side of the kink by the order of a sum: on one batch
    # here, torch channels_last float32 and accelc NHWC are both 5e-3 from float64, bit-equal.)
    g64, g32 = (_torch_grads(module, ref.param_arrays(), x, y, dt, layout) for dt in (torch.float64, torch.float32))
    floor = 1e-4 * max(np.linalg.norm(g) for g in g64.values())
    for k, g in g64.items():
        ours_err = np.linalg.norm(go[k] - g)
        f32_err = max(np.linalg.norm(gr[k] - g), np.linalg.norm(g32[k] - g))
        assert ours_err <= 2 * f32_err + floor + 1e-5 * np.linalg.norm(g), (k, ours_err, f32_err)
    # evaluation on the same kernels equals ORT's eval graph
    le, logits = ours.evaluate_batch(x, y)
    lre, rlogits = ref.evaluate_batch(x, y)
    assert abs(le - lre) <= 1e-5 * abs(lre) and np.allclose(logits, rlogits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_three_adamw_steps_track_the_reference(zoo, name, layout):
    """NCHW against ORT's kernels; NHWC against torch channels_last float32 (the same kernels in the
    same layout), with the loss against ORT's too. A ReLU input within float32 rounding of 0 takes
    either side of the kink by the order of a sum, and AdamW's first steps move a weight whose
    gradient flips from 0 by a whole lr: a layout's own float32 is the reference for its steps."""
    art, module, shape = zoo[name]
    ours, ref = TrainingSession(art, ExecConfig(layout=layout)), TrainingSession(art, REF)
    same = None
    if layout == "nhwc":
        m = copy.deepcopy(module).train().to(memory_format=torch.channels_last)
        m.load_state_dict({k: torch.from_numpy(v) for k, v in ref.param_arrays().items()}, strict=False)
        same = TorchSession(m, ours.hyper, ours.lr)
    for step in range(3):
        x, y = _batch(shape, 16, seed=step)
        a, b = ours.train_step(x, y).loss, ref.train_step(x, y).loss
        assert abs(a - b) <= 1e-4 * abs(b), (step, a, b)
        if same is not None:
            xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            assert abs(a - same.train_step(xt, y).loss) <= 1e-5 * abs(a), step
    pa, pb = ours.param_arrays(), (ref if same is None else same).param_arrays()
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
