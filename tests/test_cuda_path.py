"""The CUDA path on machines without a GPU: ``--device cuda`` runs the whole step on accelc's kernels
(torch's, cuDNN/cuBLAS) with no ORT Training CUDA build, so what can be checked here is checked
here: the refusals (no GPU; ops without a CUDA kernel, named, before anything is put on a GPU),
which providers claim nodes on CUDA, and where kernels put their constants (torch's ``meta``
device stands in for the GPU). benchmarks/cuda_check.py runs the step itself on a GPU machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper, numpy_helper

from accelc.compiler.errors import AccelcError
from accelc.runtime.aten_ops import build
from accelc.runtime.config import ExecConfig
from accelc.runtime.executor import claimed, coverage
from accelc.runtime.kernels import BuildContext, on_device, providers
from accelc.runtime.session import TrainingSession
from tests.conftest import run_cli


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_device_cuda_without_a_gpu_is_one_line(small_art, tmp_path):
    with pytest.raises(AccelcError, match=r"^--device cuda needs a CUDA GPU that torch can use"):
        TrainingSession(small_art, ExecConfig(device="cuda"))
    r = run_cli("train", small_art, "--device", "cuda", "--epochs", "1", "-o", tmp_path / "run")
    assert r.returncode == 2 and "--device cuda needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run" / "summary.json").exists()


def test_on_cuda_the_standard_ops_and_convs_are_claimed_and_cpu_only_kernels_are_not(small_art):
    from accelc.compiler.artifact_dir import load_artifacts
    from accelc.compiler.lowering import lower_training_model

    art, _ = load_artifacts(small_art)
    lowered, _ = lower_training_model(art.training, art.info.output_name)
    cuda = ExecConfig(device="cuda")
    assert coverage(lowered, cuda)["fell_back"] == {}  # every node of the step has a CUDA kernel
    assert coverage(art.eval, cuda)["fell_back"] == {}
    on_cuda = {n for n, p in providers().items() if cuda.impl(n) != "ort"}
    assert {"aten", "conv"} <= on_cuda and all(not providers()[n].cpu_only for n in on_cuda)
    assert claimed(lowered, ExecConfig(device="cuda", kernels={"all": "ort"})) == {}


def _fake_gpu(monkeypatch):
    """torch says a GPU is there. None is: on this CPU-only torch a tensor put on it raises torch's
    own error, not the AccelcError the tests expect, so the refusal must come first."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_ops_without_a_cuda_kernel_are_refused_by_name_before_the_gpu_is_touched(small_art, monkeypatch):
    _fake_gpu(monkeypatch)
    with pytest.raises(AccelcError) as ei:
        TrainingSession(small_art, ExecConfig(device="cuda", kernels={"all": "ort"}))
    msg = str(ei.value)
    assert msg.startswith("--device cuda: no CUDA kernel for ") and "\n" not in msg
    for op in ("ConvGrad", "MaxPool", "SoftmaxCrossEntropyLoss"):
        assert op in msg, msg
    assert "train these artifacts with --device cpu" in msg


def test_a_method_kernel_that_runs_on_cpu_only_is_named_on_cuda(tmp_path, monkeypatch):
    import accelc
    from accelc.zoo import export_zoo

    export_zoo("cnn3-small", tmp_path / "m.onnx")
    accelc.compile(tmp_path / "m.onnx", tmp_path / "art", passes=["reuse"])
    _fake_gpu(monkeypatch)
    with pytest.raises(AccelcError, match=r"^--device cuda: no CUDA kernel for .*Reuse"):
        TrainingSession(tmp_path / "art", ExecConfig(device="cuda"))


def test_constants_go_to_the_graph_device_and_shape_arithmetic_stays_on_the_cpu():
    f = on_device(torch.ones(2, 3), "meta")
    i = on_device(torch.tensor([4, -1]), "meta")
    assert f.device.type == "meta" and i.device.type == "cpu"
    assert on_device(torch.ones(2), "cpu").device.type == "cpu"
    for value, want in ((np.ones((2, 2), np.float32), "meta"), (np.array([1, 2], np.int64), "cpu")):
        node = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(value))
        k = build(node, BuildContext({}, "aten", "meta"))
        out = k.fn(k)
        assert out.device.type == want and tuple(out.shape) == value.shape
    node = helper.make_node("Constant", [], ["c"], value_floats=[1.0, 2.0])
    k = build(node, BuildContext({}, "aten", "meta"))
    assert k.fn(k).device.type == "meta"


def test_inspect_says_whether_the_artifacts_train_on_cuda(small_art, tmp_path):
    import accelc
    from accelc.zoo import export_zoo

    view = accelc.inspect(small_art)
    assert view["engine"]["cuda"] == {"no_cuda_kernel": {}}
    r = run_cli("inspect", small_art)
    assert r.returncode == 0 and "--device cuda: every node has a CUDA kernel" in r.stdout
    export_zoo("cnn3-small", tmp_path / "m.onnx")
    accelc.compile(tmp_path / "m.onnx", tmp_path / "art", passes=["reuse"])
    no_cuda = accelc.inspect(tmp_path / "art")["engine"]["cuda"]["no_cuda_kernel"]
    assert no_cuda and all("Reuse" in op for op in no_cuda), no_cuda
    r = run_cli("inspect", tmp_path / "art")
    assert "--device cuda: refused, no CUDA kernel for ReuseConv" in r.stdout, r.stdout
