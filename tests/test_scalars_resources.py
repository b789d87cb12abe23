"""Issue 15, causes 5 (scalar parameters), 7 (memory of one training step, thread counts) and 12
(compile refuses what train cannot run). Hostile cases: one line, exit 2 / AccelcError, nothing
left behind."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import accelc
from accelc.compiler import resources
from accelc.compiler.errors import InvalidValue
from accelc.compiler.model import check_step_memory, load_model, step_memory_bytes
from accelc.runtime.config import ExecConfig
from accelc.runtime.session import TrainingSession

from conftest import ACCELC, assert_api_refused, assert_refused, off_gradients, run_cli


def _left_behind(out):
    return [f for f in os.listdir(out.parent) if f == out.name or f.startswith("." + out.name)]


# ----------------------------------------------------------------------------- cause 5: scalars
class ScalarNet(nn.Module):
    """0-d parameters used as a multiplier, a divisor and an offset, next to constant Clip bounds
    and a constant Pow exponent (which are not parameters and must stay frozen)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.temp = nn.Parameter(torch.tensor(3.0))
        self.shift = nn.Parameter(torch.tensor(0.5))
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        h = F.relu(self.c(x)) * self.scale
        h = torch.clamp(h, 0.0, 6.0).pow(2.0) / self.temp + self.shift
        return self.fc(h.flatten(1))


SCALARS = ("scale", "temp", "shift")


def _torch_grads(module, x, y, dtype):
    m = copy.deepcopy(module).train().to(dtype)
    loss = F.cross_entropy(m(torch.from_numpy(x).to(dtype)), torch.from_numpy(y))
    loss.backward()
    return float(loss.detach()), {k: p.grad.numpy() for k, p in m.named_parameters()}


@pytest.fixture(scope="module")
def scalar_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("scalar")
    torch.manual_seed(0)
    module = ScalarNet()
    path = accelc.export(module, torch.zeros(2, 1, 8, 8), d / "scalar.onnx")
    return module, path


@pytest.mark.cause(5)
@pytest.mark.parametrize("opt", [True, False], ids=["opt", "no-opt"])
def test_scalar_parameters_compile_and_match_torch(scalar_model, tmp_path, opt):
    module, path = scalar_model
    # with opt the pass's self-check feeds random parameters (0-d ones included) to ORT: it
    # failed with "Unable to handle object of type numpy.float32"
    report = accelc.compile(path, tmp_path / "art", opt=opt)
    assert set(SCALARS) <= set(report["model"]["params"]), report["model"]
    assert report["model"]["frozen"] == [] and report["warnings"] == [], report
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 4).astype(np.int64)
    sess = TrainingSession(tmp_path / "art")
    loss, grads, _ = sess.compute_gradients(x, y)
    tloss, t32 = _torch_grads(module, x, y, torch.float32)
    _, t64 = _torch_grads(module, x, y, torch.float64)
    assert abs(loss - tloss) <= 1e-4 * max(1.0, abs(tloss)), (loss, tloss)
    assert set(grads) == set(t32)
    assert not off_gradients(grads, t32, t64), off_gradients(grads, t32, t64)
    for k in SCALARS:
        assert grads[k].shape == () and grads[k] != 0, (k, grads[k])
    # one optimizer step moves every scalar; the state round-trips as 0-d arrays
    before = sess.param_arrays()
    sess.train_step(x, y)
    after = sess.param_arrays()
    assert all(after[k] != before[k] for k in SCALARS), {k: (before[k], after[k]) for k in SCALARS}
    state = sess.state_arrays()
    assert state["param/scale"].shape == () and state["optim/scale/exp_avg"].shape == ()
    other = TrainingSession(tmp_path / "art")
    other.load_state_arrays(state)
    assert all(other.param_arrays()[k] == after[k] for k in SCALARS)


@pytest.mark.cause(5)
def test_scalar_parameters_train_end_to_end(scalar_model, tmp_path):
    _, path = scalar_model
    accelc.compile(path, tmp_path / "art", validate_result=False)
    accelc.train(tmp_path / "art", "synthetic:64", epochs=1, batch_size=32, run_dir=tmp_path / "run", progress=False)
    (npz,) = sorted((tmp_path / "run").glob("*.npz"))
    arrays = np.load(npz)
    assert arrays["param/scale"].shape == () and float(arrays["param/scale"]) != 2.0
    assert float(arrays["param/shift"]) != 0.5 and float(arrays["param/temp"]) != 3.0


def _clip_model(path, declared=None):
    """Conv -> Mul by a 0-d scale -> Clip with 0-d initialiser bounds -> GAP -> Gemm, by hand."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "conv.weight"),
        numpy_helper.from_array(np.array(1.5, np.float32), "scale"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
        numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "fc.weight"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv.weight"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c", "scale"], ["s"], name="mul"),
        helper.make_node("Clip", ["s", "lo", "hi"], ["r"], name="clip"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc.weight"], ["output"], name="fc", transB=1),
    ]
    g = helper.make_graph(
        nodes,
        "clip",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    if declared is not None:
        m.metadata_props.add(key="accelc.trainable", value=json.dumps(declared))
    onnx.save(m, str(path))
    return path


@pytest.mark.cause(5)
@pytest.mark.parametrize("declared", [None, ["conv.weight", "scale", "fc.weight"]], ids=["heuristic", "declared"])
def test_constant_scalars_stay_frozen(tmp_path, declared):
    path = _clip_model(tmp_path / "clip.onnx", declared)
    report = accelc.compile(path, tmp_path / "art")  # validated, opt self-check included
    assert report["model"]["params"] == ["conv.weight", "scale", "fc.weight"], report["model"]
    assert sorted(report["model"]["frozen"]) == ["hi", "lo"]
    assert not any("lo" in w or "hi" in w for w in report["warnings"]), report["warnings"]
    sess = TrainingSession(tmp_path / "art")
    x = np.random.default_rng(1).standard_normal((2, 1, 8, 8)).astype(np.float32)
    _, grads, _ = sess.compute_gradients(x, np.array([0, 2]))
    assert set(grads) == {"conv.weight", "scale", "fc.weight"} and grads["scale"].shape == ()
    sess.train_step(x, np.array([0, 2]))
    p = sess.param_arrays()
    assert p["lo"] == 0.0 and p["hi"] == 6.0 and p["scale"] != 1.5


class PowExponent(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 10)
        self.p = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.fc((F.relu(self.c(x)) + 0.1).pow(self.p).flatten(1))


class ClampBounds(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 10)
        self.lo, self.hi = nn.Parameter(torch.tensor(0.1)), nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.fc(torch.clamp(self.c(x), min=self.lo, max=self.hi).flatten(1))


@pytest.mark.cause(5)
@pytest.mark.parametrize(
    "cls,needle",
    [
        (PowExponent, "the exponent of Pow '/Pow' is computed from parameter 'p'"),
        (ClampBounds, "the min bound of Clip '/Clip' is computed from parameter 'lo'"),
    ],
    ids=["pow_exponent", "clip_bound"],
)
def test_parameters_ort_cannot_differentiate_are_refused_by_name(tmp_path, cls, needle):
    """torch trains a Pow exponent and tensor clamp bounds; ORT Training 1.19.2 has no gradient
    for either: one line naming the parameter and a rewrite that trains, not ORT's internals."""
    torch.manual_seed(0)
    path = accelc.export(cls(), torch.zeros(2, 1, 8, 8), tmp_path / "m.onnx")
    out = tmp_path / "art"
    msg = assert_api_refused(lambda: accelc.compile(path, out, validate_result=False), needle)
    assert "torch." in msg and "CUDA" not in msg, msg
    assert not _left_behind(out)


# ----------------------------------------------------------------------------- cause 7: resources
def _big(path, hw, batch="N"):
    """input [N, 1, hw, hw] -> Conv(4 ch, 3x3) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(10):
    a 600-byte model whose validation step alone needs 2 x 4.3 GB of activations at 12000."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "conv.weight"),
        numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "fc.weight"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv.weight"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc.weight"], ["output"], name="fc", transB=1),
    ]
    g = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, hw, hw])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, 10])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


@pytest.mark.cause(7)
def test_step_memory_estimate_counts_activations_and_parameters(tmp_path):
    info = load_model(_big(tmp_path / "m.onnx", 100))
    # activations at batch b: input b*1*100*100, conv and relu b*4*100*100 each, pool b*4, flatten
    # b*4, logits b*10; x2 (kept for backward + their gradients); parameters (36 + 40) x4; float32
    acts = 9 * 100 * 100 + 4 + 4 + 10
    assert step_memory_bytes(info, 1) == 4 * (2 * acts + 4 * 76)
    assert step_memory_bytes(info, 64) == 4 * (2 * 64 * acts + 4 * 76)
    assert check_step_memory(info, 2, limit_gb=1) == step_memory_bytes(info, 2)
    msg = assert_api_refused(lambda: check_step_memory(info, 64, limit_gb=0.01), "needs about", InvalidValue)
    assert "at batch 64 (input [64, 1, 100, 100])" in msg and "--memory-limit" in msg, msg


@pytest.mark.cause(7)
def test_12000_input_is_refused_before_allocating(tmp_path, monkeypatch):
    """The issue's case, on a machine of any size: the limit is 80% of 8 GB available."""
    monkeypatch.setattr(resources, "available_bytes", lambda: 8 << 30)
    out = tmp_path / "art"
    msg = assert_api_refused(lambda: accelc.compile(_big(tmp_path / "m.onnx", 12000), out), "needs about")
    assert "validating the model at batch 2 (input [2, 1, 12000, 12000]) needs about 19.3 GB" in msg, msg
    assert "limit of 6.4 GB" in msg, msg
    assert not _left_behind(out)


@pytest.mark.cause(7)
def test_huge_input_is_refused_at_the_default_memory_limit(tmp_path):
    """No machine has the memory: refused by the default limit (80% of what is available)."""
    out = tmp_path / "art"
    assert_api_refused(lambda: accelc.compile(_big(tmp_path / "m.onnx", 200_000), out), "TB of memory")
    assert not _left_behind(out)


@pytest.mark.cause(7)
@pytest.mark.slow
def test_cli_refuses_12000_input_in_little_memory_and_time(tmp_path):
    """`accelc compile` of the 12000x12000 model: one line, exit 2, and the peak memory of the
    whole process tree (the CLI and its validation child) stays under 500 MB."""
    hw = 12000
    if step_memory_bytes(load_model(_big(tmp_path / "probe.onnx", hw)), 2) <= resources.memory_limit():
        hw = 60000  # a machine with the memory for 12000x12000 would validate it: go past it
    path, out = _big(tmp_path / "m.onnx", hw), tmp_path / "art"
    probe = (
        "import resource, subprocess, sys, time, json; t = time.perf_counter();"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
        "print(json.dumps([r.returncode, r.stdout, r.stderr, time.perf_counter() - t,"
        " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe, *ACCELC, "compile", str(path), "-o", str(out)], capture_output=True, text=True
    )
    rc, stdout, stderr, seconds, maxrss_kb = json.loads(res.stdout)
    assert_refused(subprocess.CompletedProcess([], rc, stdout, stderr), "needs about", out=out)
    assert maxrss_kb < 500 * 1024, f"peak RSS {maxrss_kb / 1024:.0f} MB"
    assert seconds < 60, seconds  # ~3 s measured; generous for a loaded machine


@pytest.mark.cause(7)
@pytest.mark.parametrize("threads", [100_000, 0, -1, True, 2.5, "4"])
def test_threads_beyond_the_machine_or_malformed_are_refused(tmp_path, threads):
    assert_api_refused(lambda: ExecConfig(threads=threads), "--threads must", InvalidValue)
    run = tmp_path / "run"
    assert_api_refused(lambda: accelc.train(tmp_path / "no-art", threads=threads, run_dir=run), "--threads must")
    assert not run.exists()


@pytest.mark.cause(7)
def test_threads_within_the_machine_bound_are_accepted():
    assert ExecConfig(threads=resources.max_threads()).threads == resources.max_threads()
    assert ExecConfig(threads=None).threads is None


@pytest.mark.cause(7)
@pytest.mark.slow
def test_cli_train_refuses_too_many_threads(tmp_path, scalar_model):
    _, path = scalar_model
    accelc.compile(path, tmp_path / "art", validate_result=False)
    out = tmp_path / "run"
    r = run_cli("train", tmp_path / "art", "--threads", "100000", "-o", out, timeout=120)
    assert_refused(r, "--threads must be in 1..", out=out)


# ----------------------------------------------------------------------------- cause 12: non-image inputs
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(20, 16), nn.Linear(16, 10)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv1d(2, 4, 3, padding=1), nn.Linear(4 * 16, 10)

    def forward(self, x):
        return self.fc(F.relu(self.c(x)).flatten(1))


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv3d(1, 2, 3, padding=1), nn.Linear(2 * 4 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(F.relu(self.c(x)).flatten(1))


@pytest.mark.cause(12)
@pytest.mark.parametrize(
    "cls,shape,shown",
    [(MLP, (20,), "[N, 20]"), (Conv1dNet, (2, 16), "[N, 2, 16]"), (Conv3dNet, (1, 4, 4, 4), "[N, 1, 4, 4, 4]")],
    ids=["mlp", "conv1d", "conv3d"],
)
def test_non_image_models_are_refused_at_compile(tmp_path, cls, shape, shown):
    """They compiled, then `train` failed with 'not enough values to unpack'."""
    torch.manual_seed(0)
    path = accelc.export(cls(), torch.zeros(2, *shape), tmp_path / "m.onnx")
    out = tmp_path / "art"
    for validate in (False, True):
        msg = assert_api_refused(lambda: accelc.compile(path, out, validate_result=validate), "[N, C, H, W]")
        assert f"this model's input 'input' is {shown}" in msg, msg
        assert not _left_behind(out)
    assert_api_refused(lambda: accelc.inspect(path), "[N, C, H, W]")


@pytest.mark.cause(12)
@pytest.mark.slow
def test_cli_compile_refuses_an_mlp_in_one_line(tmp_path):
    torch.manual_seed(0)
    path = accelc.export(MLP(), torch.zeros(2, 20), tmp_path / "m.onnx")
    out = tmp_path / "art"
    r = run_cli("compile", path, "-o", out, timeout=120)
    assert_refused(
        r, "accelc trains image models with an input [N, C, H, W]; this model's input 'input' is [N, 20]", out
    )
