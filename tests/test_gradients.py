"""Compiled artifacts give torch autograd's loss and gradients on the same weights and batch."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import accelc
from accelc.runtime.config import ExecConfig
from accelc.runtime.session import TrainingSession
from accelc.zoo import ZOO, zoo_module

from conftest import off_gradients, rel_err


def torch_grads(module, x, y, dtype=torch.float32):
    module = copy.deepcopy(module).train().to(dtype)
    logits = module(torch.from_numpy(x).to(dtype))
    loss = F.cross_entropy(logits, torch.from_numpy(y))
    loss.backward()
    return float(loss), {k: p.grad.numpy() for k, p in module.named_parameters()}


def check_against_torch(module, onnx_path, art_dir, shape, batch=4, tol=1e-4):
    accelc.compile(onnx_path, art_dir)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *shape)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int64)
    # NCHW, the order of torch's float32 reference here: `auto` times both layouts and may take
    # NHWC under load, whose sums round on the other side of a ReLU kink at batch 2 (resnet18's
    # layers.3.bn2.weight then 5e-3 from float64); tests/test_engine.py judges NHWC against
    # torch channels_last
    sess = TrainingSession(art_dir, ExecConfig(layout="nchw"))
    loss, grads, _ = sess.compute_gradients(x, y)
    tloss, tgrads = torch_grads(module, x, y)
    assert abs(loss - tloss) <= tol * max(1.0, abs(tloss)), (loss, tloss)
    assert set(grads) == set(tgrads)
    errs = {k: rel_err(grads[k], tgrads[k]) for k in tgrads}
    # relative 1e-4; gradients that are zero in exact arithmetic (a conv bias right before
    # BatchNorm) are compared absolutely: |a-b| <= 1e-4 |b| + 1e-6; float64 judges where float32
    # itself is ill-conditioned (conftest.off_gradients)
    bad = off_gradients(grads, tgrads, torch_grads(module, x, y, torch.float64)[1], tol)
    assert not bad, bad
    return errs


@pytest.mark.parametrize("name", [n for n in ZOO if n != "resnet18"])
def test_zoo_gradients_match_torch(name, tmp_path):
    module, shape = zoo_module(name)
    path = tmp_path / f"{name}.onnx"
    accelc.export(module, torch.zeros(2, *shape), path)
    check_against_torch(module, path, tmp_path / "art", shape)


def test_resnet18_gradients_match_torch(tmp_path):
    module, shape = zoo_module("resnet18")
    path = tmp_path / "r18.onnx"
    accelc.export(module, torch.zeros(2, *shape), path)
    check_against_torch(module, path, tmp_path / "art", shape, batch=2)


def test_mixed_model_written_here(mixed_model, tmp_path):
    module, path = mixed_model
    errs = check_against_torch(module, path, tmp_path / "art", (3, 16, 16))
    # every kind of layer took part
    assert {"grouped.weight", "dw.weight", "bn2.weight", "fc.weight"} <= set(errs)


def test_export_keeps_batchnorm_and_running_stats(tmp_path):
    module, shape = zoo_module("vgg")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    path = accelc.export(module, torch.zeros(2, *shape), tmp_path / "v.onnx")
    import onnx

    m = onnx.load(str(path))
    assert sum(n.op_type == "BatchNormalization" for n in m.graph.node) == 6
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k
