"""Round 3 (issue 32): real-model and hostile findings of sections 3 and 4, each as a test.

* A graph that computes a shape from ``x.shape`` (timm's split attention: Shape, Gather, Div,
  Unsqueeze, Concat into a Reshape) before an AveragePool compiles, trains, and is folded exactly.
* A planted native library in reuse's kernel cache is never loaded.
* ``Where`` with a 0-d float parameter trains (ORT's Where gradient does not sum over broadcast).
* An unreachable rendezvous is one line, not dozens of lines of C++ socket logs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from conftest import ACCELC, run_cli

IN_SHAPE = (3, 8, 8)


# ----------------------------------------------------------------------------- shape arithmetic
def _shape_arithmetic_model(path, split: str = "channels", size: int = 8):
    """Conv (8 channels) -> Relu -> a Reshape whose target is computed from the tensor's own
    shape (Shape, Gather, Div, Unsqueeze, Concat, Mul: ONNX's shape inference cannot follow the
    Div) -> ReduceSum -> AveragePool 2x2 -> Reshape to [N, -1] from Shape -> Gemm. ``split``:
    "channels" reshapes to [N, 2, C/2, H, W] and sums the 2 (timm's split attention; the Div is
    on the channels, the same at any input size); "space" reshapes to [N, C, H/2, 2, W/2, 2] and
    sums the 2s (the Div is on the input's size)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "conv.weight")
    feats = 4 * (size // 2) ** 2 if split == "channels" else 8 * (size // 4) ** 2
    fw = numpy_helper.from_array((rng.standard_normal((10, feats)) * 0.3).astype(np.float32), "fc.weight")

    def const(name, value):
        return helper.make_node(
            "Constant", [], [name], name=name, value=numpy_helper.from_array(np.array(value, np.int64), name)
        )

    def dims(*names):
        return [helper.make_node("Unsqueeze", [a, "ax0"], [a + "_u"], name="u_" + a) for a in names]

    if split == "channels":
        target = [
            helper.make_node("Div", ["ch", "two"], ["half"], name="div"),
            *dims("n", "half", "h", "w"),
            helper.make_node("Concat", ["n_u", "one", "half_u", "h_u", "w_u"], ["t0"], name="cat", axis=0),
            const("scale", [1, 2, 1, 1, 1]),  # the 2 of the split comes from a multiplication
            helper.make_node("Mul", ["t0", "scale"], ["target"], name="mul"),
        ]
        sum_axes = [1]
    else:
        target = [
            helper.make_node("Div", ["h", "two"], ["h2"], name="div_h"),
            helper.make_node("Div", ["w", "two"], ["w2"], name="div_w"),
            *dims("n", "ch", "h2", "w2"),
            helper.make_node(
                "Concat", ["n_u", "ch_u", "h2_u", "two_u", "w2_u", "two_u"], ["target"], name="cat", axis=0
            ),
        ]
        sum_axes = [3, 5]
    nodes = [
        const("i0", 0), const("i1", 1), const("i2", 2), const("i3", 3), const("two", 2), const("ax0", [0]),
        const("one", [1]), const("two_u", [2]), const("minus1", [-1]), const("sum_axes", sum_axes),
        helper.make_node("Conv", ["input", "conv.weight"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Shape", ["r"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "i0"], ["n"], name="g0"),
        helper.make_node("Gather", ["s", "i1"], ["ch"], name="g1"),
        helper.make_node("Gather", ["s", "i2"], ["h"], name="g2"),
        helper.make_node("Gather", ["s", "i3"], ["w"], name="g3"),
        *target,
        helper.make_node("Reshape", ["r", "target"], ["split"], name="reshape"),
        helper.make_node("ReduceSum", ["split", "sum_axes"], ["summed"], name="sum", keepdims=0),
        helper.make_node("AveragePool", ["summed"], ["pooled"], name="avd/AveragePool", kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Shape", ["pooled"], ["ps"], name="shape2"),
        helper.make_node("Gather", ["ps", "i0"], ["pn"], name="g4"),
        helper.make_node("Unsqueeze", ["pn", "ax0"], ["pn_u"], name="u_pn"),
        helper.make_node("Concat", ["pn_u", "minus1"], ["flat_shape"], name="cat2", axis=0),
        helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight"], ["output"], name="fc", transB=1),
    ]  # fmt: skip
    g = helper.make_graph(
        nodes,
        "shape_arithmetic",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 10])],
        [w, fw],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(m)
    path.write_bytes(m.SerializeToString())
    return m


def _torch_reference(weights: dict, x, y, split: str):
    """The same model in torch: (loss, {parameter: gradient})."""
    p = {k: torch.tensor(v, requires_grad=True) for k, v in weights.items()}
    r = F.relu(F.conv2d(torch.from_numpy(x), p["conv.weight"], padding=1))
    n, c, h, w = r.shape
    if split == "channels":
        s = r.reshape(n, 2, c // 2, h, w).sum(1)
    else:
        s = r.reshape(n, c, h // 2, 2, w // 2, 2).sum((3, 5))
    out = F.avg_pool2d(s, 2).reshape(n, -1) @ p["fc.weight"].t()
    loss = F.cross_entropy(out, torch.from_numpy(y))
    loss.backward()
    return float(loss), {k: t.grad.numpy() for k, t in p.items()}


def _ort_outputs(model: onnx.ModelProto, x, name: str = "output"):
    """The value of tensor ``name`` (the output, or one inside the graph) on ORT."""
    import onnxruntime as ort

    if name not in {o.name for o in model.graph.output}:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        model = m
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run([name], {"input": x})[0]


def _at_size(model: onnx.ModelProto, size: int) -> onnx.ModelProto:
    """The "channels" model with an input of ``size`` x ``size`` (and a Gemm to fit)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for d in m.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_value = size
    fc = next(t for t in m.graph.initializer if t.name == "fc.weight")
    w = np.random.default_rng(size).standard_normal((10, 4 * (size // 2) ** 2)).astype(np.float32)
    fc.CopyFrom(numpy_helper.from_array(w, "fc.weight"))
    return m


def _static_shapes(model: onnx.ModelProto) -> dict:
    """The shapes accelc's passes see (ONNX's shape inference with data propagation, batch 2)."""
    from accelc.compiler.model import infer_shapes

    return infer_shapes(model, 2)


def test_channel_arithmetic_is_folded_exactly_at_every_batch_and_input_size(tmp_path):
    """The channels' Div folds to the constant it is at any size; the batch and the sizes stay
    computed (the rescale pass changes the input size), and ONNX's shape inference follows."""
    from accelc.compiler.legalize import fold_shape_arithmetic

    m = _shape_arithmetic_model(tmp_path / "m.onnx", "channels")
    folded, note = fold_shape_arithmetic(m)
    assert note and "every batch and input size" in note
    assert not [n for n in folded.graph.node if n.op_type == "Div"]
    assert "pooled" not in _static_shapes(m) and _static_shapes(folded)["pooled"] == (2, 4, 4, 4)
    for batch in (1, 3):  # at another input size the folded graph computes what the original does
        x = np.random.default_rng(batch).standard_normal((batch, 3, 16, 16)).astype(np.float32)
        a = _ort_outputs(_at_size(m, 16), x, "pooled")
        assert a.shape == (batch, 4, 8, 8) and np.array_equal(a, _ort_outputs(_at_size(folded, 16), x, "pooled"))
        assert np.array_equal(_ort_outputs(_at_size(m, 16), x), _ort_outputs(_at_size(folded, 16), x))
    for batch in (1, 2, 3, 7):  # the batch stays dynamic: the same values as the original at any batch
        x = np.random.default_rng(batch).standard_normal((batch, *IN_SHAPE)).astype(np.float32)
        assert np.array_equal(_ort_outputs(m, x), _ort_outputs(folded, x))


def test_size_arithmetic_is_folded_at_the_input_size_when_a_pool_needs_it(tmp_path):
    from accelc.compiler.legalize import fold_shape_arithmetic, legalize

    m = _shape_arithmetic_model(tmp_path / "m.onnx", "space")
    assert "pooled" not in _static_shapes(fold_shape_arithmetic(m)[0])  # the sizes' Div stays: H/2 at any H
    legal, notes = legalize(m)
    assert any("at the input size 8x8" in n for n in notes), notes
    assert any("AveragePool 'avd/AveragePool' rewritten" in n for n in notes), notes
    assert not [n for n in legal.graph.node if n.op_type in ("Shape", "Div", "AveragePool")]
    for batch in (1, 2, 3, 7):
        x = np.random.default_rng(batch).standard_normal((batch, *IN_SHAPE)).astype(np.float32)
        np.testing.assert_allclose(_ort_outputs(m, x), _ort_outputs(legal, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("split", ["channels", "space"])
def test_average_pool_after_shape_arithmetic_compiles_and_matches_torch(tmp_path, split):
    import accelc
    from accelc.runtime.session import TrainingSession

    m = _shape_arithmetic_model(tmp_path / "m.onnx", split)
    report = accelc.compile(tmp_path / "m.onnx", tmp_path / "art")
    assert any("folded to" in f for f in report["fixups"]), report["fixups"]
    assert any("AveragePool 'avd/AveragePool' rewritten" in f for f in report["fixups"]), report["fixups"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, *IN_SHAPE)).astype(np.float32)
    y = rng.integers(0, 10, 4).astype(np.int64)
    loss, grads, _ = TrainingSession(tmp_path / "art").compute_gradients(x, y)
    weights = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    t_loss, t_grads = _torch_reference(weights, x, y, split)
    assert abs(loss - t_loss) < 1e-5
    for k, g in t_grads.items():
        assert np.linalg.norm(grads[k] - g) <= 1e-5 * np.linalg.norm(g) + 1e-7, k


@pytest.mark.slow
def test_shape_arithmetic_model_trains_with_skip(tmp_path):
    import accelc

    _shape_arithmetic_model(tmp_path / "m.onnx")
    accelc.compile(tmp_path / "m.onnx", tmp_path / "art", passes="skip")
    r = run_cli(
        "train", tmp_path / "art", "--data", "synthetic:64", "--epochs", "1", "--batch-size", "16",
        "-o", tmp_path / "run",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())


# ----------------------------------------------------------------------------- planted native library
PLANTED_C = r"""
#include <fcntl.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) {
    int fd = open(MARKER, O_CREAT | O_WRONLY, 0600);
    if (fd >= 0) close(fd);
}
"""

needs_cc = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")


def _planted_library(tmp_path):
    """A shared library that, once loaded, creates the file ``tmp_path/executed``."""
    src = tmp_path / "planted.c"
    src.write_text(PLANTED_C)
    out = tmp_path / "planted.so"
    cc = shutil.which("cc") or shutil.which("gcc")
    marker = tmp_path / "executed"
    subprocess.run(
        [cc, "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(out), str(src)], check=True, capture_output=True
    )
    return out, marker


def _load_reuse_kernels(cache):
    """Load the reuse kernels in a fresh process with ``cache`` as the kernel cache."""
    code = "from accelc.passes.reuse import native; import sys; sys.exit(0 if native.available() else 5)"
    env = {**os.environ, "ACCELC_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@needs_cc
@pytest.mark.slow
def test_a_library_planted_over_the_cached_kernels_is_not_executed(tmp_path):
    cache = tmp_path / "cache"
    r = _load_reuse_kernels(cache)  # builds the kernels (and whatever records them)
    assert r.returncode == 0, r.stderr
    (built,) = cache.glob("reuse-*.so")
    planted, marker = _planted_library(tmp_path)
    shutil.copyfile(planted, built)  # an attacker (or a corrupted disk) swaps the bytes
    r = _load_reuse_kernels(cache)
    assert not marker.exists(), "the planted library was executed"
    assert r.returncode == 0, r.stderr  # rebuilt: the fast kernels still work
    assert hashlib.sha256(built.read_bytes()).hexdigest() != hashlib.sha256(planted.read_bytes()).hexdigest()


@needs_cc
@pytest.mark.slow
def test_a_kernel_cache_others_can_write_is_not_trusted(tmp_path):
    scratch = tmp_path / "scratch"
    assert _load_reuse_kernels(scratch).returncode == 0  # learn the library's name (keyed by source and CPU)
    (name,) = [p.name for p in scratch.glob("reuse-*.so")]
    planted, marker = _planted_library(tmp_path)
    cache = tmp_path / "shared"
    cache.mkdir()
    shutil.copyfile(planted, cache / name)
    digest = hashlib.sha256(planted.read_bytes()).hexdigest()
    (cache / (name + ".sha256")).write_text(digest + "\n")  # a forged record beside it
    os.chmod(cache, 0o777)  # anyone could have put them there
    r = _load_reuse_kernels(cache)
    assert not marker.exists(), "a library from a world-writable cache was executed"
    assert r.returncode == 0, r.stderr  # built privately for the process instead


@needs_cc
@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown")
def test_a_cached_library_owned_by_another_user_is_not_executed(tmp_path):
    cache = tmp_path / "cache"
    assert _load_reuse_kernels(cache).returncode == 0
    (built,) = cache.glob("reuse-*.so")
    planted, marker = _planted_library(tmp_path)
    shutil.copyfile(planted, built)
    (cache / (built.name + ".sha256")).write_text(hashlib.sha256(planted.read_bytes()).hexdigest() + "\n")
    os.chown(built, 65534, 65534)
    r = _load_reuse_kernels(cache)
    assert not marker.exists(), "a library owned by another user was executed"
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- Where with a 0-d parameter
def _where_model(path, threshold_initialiser: bool = False):
    """Conv -> Where(c > 0, c, alpha) with alpha a 0-d float initialiser (a learnt fill value)
    -> GlobalAveragePool -> Gemm. The threshold 0 is a Constant node, or (``threshold_initialiser``)
    a 0-d float initialiser too."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "conv.weight"),
        numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "fc.weight"),
        numpy_helper.from_array(np.array(0.1, np.float32), "alpha"),
    ]
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "threshold")
    nodes = [
        helper.make_node("Conv", ["input", "conv.weight"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Greater", ["c", "threshold"], ["pos"], name="gt"),
        helper.make_node("Where", ["pos", "c", "alpha"], ["r"], name="where"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc.weight"], ["output"], name="fc", transB=1),
    ]
    if threshold_initialiser:
        inits.append(zero)
    else:
        nodes.insert(0, helper.make_node("Constant", [], ["threshold"], name="threshold", value=zero))
    g = helper.make_graph(
        nodes,
        "where",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path.write_bytes(m.SerializeToString())
    return {t.name: numpy_helper.to_array(t) for t in inits}


def test_a_comparison_threshold_initialiser_is_a_constant_not_a_parameter(tmp_path):
    """A float initialiser read only by Greater gets no gradient (ORT refuses to build one)."""
    from accelc.compiler.model import load_model

    _where_model(tmp_path / "m.onnx", threshold_initialiser=True)
    info = load_model(tmp_path / "m.onnx")
    assert "threshold" in info.frozen and "threshold" not in info.params
    assert "alpha" in info.params
    assert not any("threshold" in w for w in info.warnings)


def test_where_with_a_0d_parameter_trains_with_torch_gradients(tmp_path):
    import accelc
    from accelc.runtime.session import TrainingSession

    w = _where_model(tmp_path / "m.onnx")
    report = accelc.compile(tmp_path / "m.onnx", tmp_path / "art")
    assert "alpha" in report["model"]["params"]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 4).astype(np.int64)
    loss, grads, _ = TrainingSession(tmp_path / "art").compute_gradients(x, y)
    p = {k: torch.tensor(w[k], requires_grad=True) for k in ("conv.weight", "fc.weight", "alpha")}
    c = F.conv2d(torch.from_numpy(x), p["conv.weight"], padding=1)
    out = torch.where(c > 0, c, p["alpha"]).mean((2, 3)) @ p["fc.weight"].t()
    t_loss = F.cross_entropy(out, torch.from_numpy(y))
    t_loss.backward()
    assert abs(loss - float(t_loss)) < 1e-5
    assert np.shape(grads["alpha"]) == ()
    for k, t in p.items():
        assert np.allclose(grads[k], t.grad.numpy(), rtol=1e-4, atol=1e-6), k


@pytest.mark.slow
def test_where_with_a_0d_parameter_trains_from_the_cli(tmp_path):
    import accelc

    _where_model(tmp_path / "m.onnx")
    accelc.compile(tmp_path / "m.onnx", tmp_path / "art")
    r = run_cli(
        "train", tmp_path / "art", "--data", "synthetic:64", "--epochs", "1", "--batch-size", "16",
        "-o", tmp_path / "run",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- unreachable rendezvous
@pytest.mark.slow
def test_an_unreachable_rendezvous_is_one_line(tmp_path):
    import accelc
    from accelc.runtime.distributed import free_port

    _where_model(tmp_path / "m.onnx")
    accelc.compile(tmp_path / "m.onnx", tmp_path / "art")
    port = free_port()  # nothing listens there: rank 0 never comes
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    r = subprocess.run(
        ACCELC + ["train", str(tmp_path / "art"), "--data", "synthetic:64", "--epochs", "1", "--batch-size", "16",
                  "-o", str(tmp_path / "run"), "--dist-timeout", "1"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0
    assert r.stderr.startswith("accelc: error:") and r.stderr.count("\n") == 1, r.stderr
    assert "could not join" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_rescale_rebuilds_the_low_resolution_stage_from_the_model_as_given(tmp_path):
    """A graph whose sizes were folded at the full input size (its pool needs them) is rescaled from
    the model as exported: the low-resolution stage folds its own sizes, and the run trains through
    the switch (it was refused: 'at 1/2 resolution the shapes do not fit', on timm's resnest)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    import accelc

    class SpaceSplit(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 5, padding=2)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            n, c, hh, ww = h.shape
            h = h.reshape(n, c, hh // 2, 2, ww // 2, 2).sum((3, 5))  # sizes computed from the shape
            h = F.avg_pool2d(h, 2)
            return self.fc(h.mean((2, 3)))

    torch.manual_seed(0)
    accelc.export(SpaceSplit(), torch.zeros(2, 3, 16, 16), tmp_path / "m.onnx")
    report = accelc.compile(tmp_path / "m.onnx", tmp_path / "art", passes=["rescale"])
    assert any("at the input size 16x16" in f for f in report["fixups"]), report["fixups"]
    s = accelc.train(tmp_path / "art", "synthetic:32", epochs=2, batch_size=8, run_dir=tmp_path / "run", progress=False)
    assert s["epochs"] == 2
    assert json.loads((tmp_path / "run" / "checkpoint.json").read_text())["variant"]["rescale"].endswith("full")
