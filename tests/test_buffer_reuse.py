"""The engine's buffer reuse (docs/engine.md#buffer-reuse): a kernel writes its output over an input
that dies there, bit-equal to the out-of-place result, and never over memory anything else still
reads (a view, a feed, a constant, a graph output, a bound buffer, repeated inputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper
from test_aten import model as _model

import accelc
from accelc.runtime.config import ExecConfig
from accelc.runtime.executor import SegmentedRunner, claimed, prepared
from accelc.runtime.session import TrainingSession, session_options
from accelc.zoo import zoo_module

MS = "com.microsoft"
N = helper.make_node


def _run(nodes, feeds: dict, outputs: list, inits: dict | None = None, bound=None, env_out=None):
    """(ORT's outputs, the runner's outputs, the runner, the feeds as the runner got them)."""
    import onnxruntime as ort

    inits = {"one": np.float32(1.0), **(inits or {})}
    m = _model(nodes, feeds, outputs, inits)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(outputs, feeds)
    cfg = ExecConfig()
    m2 = prepared(m, cfg)
    runner = SegmentedRunner(m2, session_options(), ["CPUExecutionProvider"], cfg, claimed(m2, cfg))
    assert runner.segments == []
    fed = {k: torch.from_numpy(v.copy()) for k, v in feeds.items()}
    got, _ = runner.run(dict(fed), bound, env_out)
    return ref, [got[o].numpy() for o in outputs], runner, fed


def _in_place(runner, op: str | None = None) -> int:
    return sum(k.in_place for k in runner.kernels.values() if op is None or k.node.op_type == op)


def _f32(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _fresh(*names):
    """Each feed times one: a tensor of the step (dies where its last reader runs), bit-equal."""
    return [N("Mul", [n, "one"], [n + "_"]) for n in names]


CASES = {
    "Relu": ([N("Relu", ["a_"], ["y"])], "ab"),
    "ReluGrad into dY": ([N("Relu", ["b"], ["rb"]), N("ReluGrad", ["a_", "rb"], ["y"], domain=MS)], "ab"),
    "ReluGrad into Y": ([N("Relu", ["b_"], ["rb"]), N("ReluGrad", ["a", "rb"], ["y"], domain=MS)], "ab"),
    "Add": ([N("Add", ["a_", "b"], ["y"])], "ab"),
    "Add into the second": ([N("Add", ["a", "b_"], ["y"])], "ab"),
    "Add of a broadcast bias": ([N("Add", ["a_", "bias"], ["y"])], "a"),
    "Sub": ([N("Sub", ["a", "b_"], ["y"])], "ab"),
    "Mul": ([N("Mul", ["a_", "b"], ["y"])], "ab"),
    "Div": ([N("Div", ["a_", "b"], ["y"])], "ab"),
    "Sum of three": ([N("Sum", ["a", "b_", "c"], ["y"])], "abc"),
    "Sum into the first": ([N("Sum", ["a_", "b", "c"], ["y"])], "abc"),
    "Clip": ([N("Clip", ["a_", "lo", "hi"], ["y"])], "a"),
    "Neg": ([N("Neg", ["a_"], ["y"])], "a"),
    "Sigmoid": ([N("Sigmoid", ["a_"], ["y"])], "a"),
    "SigmoidGrad": ([N("Sigmoid", ["b"], ["s"]), N("SigmoidGrad", ["a_", "s"], ["y"], domain=MS)], "ab"),
}


@pytest.mark.parametrize("case", CASES)
def test_in_place_kernels_are_bit_equal_to_ort(case):
    nodes, names = CASES[case]
    feeds = {n: _f32(2, 3, 4, 5, seed=i) for i, n in enumerate(names)}
    made = {n.output[0] for n in nodes}
    fresh = sorted({i[:-1] for n in nodes for i in n.input if i.endswith("_") and i not in made})
    inits = {"bias": _f32(3, 1, 1, seed=9), "lo": np.float32(-0.5), "hi": np.float32(0.5)}
    ref, got, runner, _ = _run(_fresh(*fresh) + nodes, feeds, ["y"], inits)
    # bit-equal to the same kernel writing a new tensor (the run with every tensor kept), and to
    # ORT's kernel to its rounding (bit-equal but for the sigmoid's polynomial)
    assert _in_place(runner, nodes[-1].op_type) == 1, case
    out_of_place, _ = runner.run({k: torch.from_numpy(v.copy()) for k, v in feeds.items()}, None, {})
    assert _in_place(runner, nodes[-1].op_type) == 1
    np.testing.assert_array_equal(got[0], out_of_place["y"].numpy())
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6, atol=1e-7)
    if "Sigmoid" not in case:
        np.testing.assert_array_equal(got[0], ref[0])


def test_no_reuse_while_a_view_of_the_memory_is_still_read():
    """a_ dies at the ReLU, but its reshaped view is read after it: the ReLU writes a new tensor."""
    nodes = _fresh("a") + [
        N("Reshape", ["a_", "shape"], ["r"]),
        N("Relu", ["a_"], ["y"]),
        N("Add", ["r", "b"], ["z"]),
    ]
    feeds = {"a": _f32(2, 60), "b": _f32(2, 60, seed=1)}
    ref, got, runner, _ = _run(nodes, feeds, ["y", "z"], {"shape": np.array([2, 60], np.int64)})
    for r, g in zip(ref, got):
        np.testing.assert_array_equal(g, r)
    assert _in_place(runner, "Relu") == 0
    # the Add is the last reader of r, but torch still counts a_ (r's base) on that memory: checked
    # when the Add runs, it writes a new tensor too
    assert _in_place(runner, "Add") == 0


def test_feeds_constants_graph_outputs_and_repeated_inputs_are_never_written():
    a, b = _f32(2, 3, 4, 5), _f32(2, 3, 4, 5, seed=1)
    nodes = _fresh("b") + [
        N("Relu", ["a"], ["ra"]),  # a feed
        N("Add", ["b_", "k"], ["bk"]),  # b_ is also a graph output
        N("Sum", ["ra", "ra", "bk"], ["y"]),  # ra read twice by one node; bk added last
    ]
    ref, got, runner, fed = _run(nodes, {"a": a, "b": b}, ["y", "b_"], {"k": _f32(2, 3, 4, 5, seed=2)})
    for r, g in zip(ref, got):
        np.testing.assert_array_equal(g, r)
    np.testing.assert_array_equal(fed["a"].numpy(), a)
    np.testing.assert_array_equal(got[1], b)
    assert _in_place(runner) == 0
    k = next(k for k in runner.kernels.values() if k.node.op_type == "Add")
    np.testing.assert_array_equal(runner.constants["k"].numpy(), _f32(2, 3, 4, 5, seed=2))
    assert k.donate == ()


def test_a_bound_buffer_is_not_overwritten_and_env_out_keeps_every_tensor():
    a = _f32(2, 3, 4, 5)
    nodes = _fresh("a") + [N("Relu", ["a_"], ["y"])]
    buf = torch.empty(2, 3, 4, 5)
    ref, got, runner, _ = _run(nodes, {"a": a}, ["y"], bound={"a_": buf})
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(buf.numpy(), a)  # the caller's buffer still holds a_
    assert _in_place(runner) == 0
    env: dict = {}
    ref, got, runner, _ = _run(nodes, {"a": a}, ["y"], env_out=env)
    np.testing.assert_array_equal(env["a_"].numpy(), a)
    assert _in_place(runner) == 0
    # and without either, the ReLU takes a_'s buffer
    ref, got, runner, _ = _run(nodes, {"a": a}, ["y"])
    np.testing.assert_array_equal(got[0], ref[0])
    assert _in_place(runner) == 1


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_zoo_resnet_step_is_bit_equal_with_and_without_reuse(tmp_path, layout):
    """The residual adds, their gradients' sums and the ReLU gradients in place: the same loss
    and gradients, bit for bit, as the step with every kernel writing a new tensor."""
    module, shape = zoo_module("resnet")
    accelc.export(module, torch.zeros(2, *shape), tmp_path / "m.onnx")
    accelc.compile(tmp_path / "m.onnx", tmp_path / "art")
    s = TrainingSession(tmp_path / "art", ExecConfig(layout=layout))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, *shape)).astype(np.float32), rng.integers(0, 10, 4)
    r_off = s._forward_backward(x, y, env_out={})  # the caller keeps every tensor: nothing reused
    g_off = {k: v.clone() for k, v in s.grads.items()}
    assert s.runner.report()["in_place_per_step"] == 0
    r_on = s._forward_backward(x, y)
    assert r_on.loss == r_off.loss
    for k, g in s.grads.items():
        assert torch.equal(g, g_off[k]), k
    assert s.runner.report()["in_place_per_step"] > 0
    assert s.runner.donated > 0
    from accelc.runtime.train.summary import engine_line

    assert "written over a dead input" in engine_line(s.engine_report())


def test_sum_whose_later_input_broadcasts_to_a_larger_shape():
    """Sum(a, b, c) with c larger than a + b: no input can take the result, and the later add
    broadcasts (it is not done in place)."""
    feeds = {"a": _f32(1, 3, 4, 5), "b": _f32(1, 3, 4, 5, seed=1), "c": _f32(2, 3, 4, 5, seed=2)}
    ref, got, runner, _ = _run(_fresh("a") + [N("Sum", ["a_", "b", "c"], ["y"])], feeds, ["y"])
    np.testing.assert_array_equal(got[0], ref[0])
    assert got[0].shape == (2, 3, 4, 5) and _in_place(runner, "Sum") == 0


def test_comparisons_keep_their_bool_result_when_an_input_dies_there():
    """Greater's float input dies at it: its bool result is not written into the float buffer."""
    feeds = {"a": _f32(2, 3, 4, 5), "b": _f32(2, 3, 4, 5, seed=1)}
    nodes = _fresh("a") + [N("Greater", ["a_", "b"], ["g"]), N("Where", ["g", "a", "b"], ["y"])]
    ref, got, runner, _ = _run(nodes, feeds, ["y"])
    np.testing.assert_array_equal(got[0], ref[0])
    assert _in_place(runner) == 0


def test_no_reuse_of_a_tensor_dense_in_both_layouts_with_channels_last_strides():
    """A 1×1 map in channels_last strides (a convolution's NHWC output at 1×1) is dense in NCHW
    order too: a new tensor gets NCHW's strides, and the convolution after it chooses its layout
    from them, so a donated one is not written over (the kernel-level rule)."""
    from types import SimpleNamespace

    from accelc.runtime import aten_elementwise as ew

    x = torch.empty(4, 6, 1, 1, memory_format=torch.channels_last).copy_(torch.from_numpy(_f32(4, 6, 1, 1)))
    assert x.is_contiguous() and x.stride() != (6, 1, 1, 1)
    k = SimpleNamespace(free=(True,), in_place=0)
    y = ew.relu(k, x)
    assert k.in_place == 0 and y is not x and y.stride() == torch.relu(x).stride()
    plain = torch.from_numpy(_f32(4, 6, 1, 1))  # NCHW's own strides: written over
    assert ew.relu(k, plain) is plain and k.in_place == 1


def test_a_bound_buffer_that_is_not_a_graph_output_stops_reuse_for_the_run():
    """The static plan knows graph outputs only: a caller's buffer under another name (here read
    through an Identity by the last reader) turns reuse off for that run."""
    a = _f32(2, 3, 4, 5)
    nodes = _fresh("a") + [N("Identity", ["a_"], ["i"]), N("Relu", ["i"], ["y"])]
    buf = torch.empty(2, 3, 4, 5)
    ref, got, runner, _ = _run(nodes, {"a": a}, ["y"], bound={"a_": buf})
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(buf.numpy(), a)
    assert _in_place(runner) == 0
