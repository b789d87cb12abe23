"""Memory of training: the segmented executor's outputs are torch's (freed when dropped), ORT's
arena is shrunk after each run where a step's tensors are large, and artifacts loaded from a
directory do not hold the checkpoint's bytes. (Peak figures: benchmarks/memory.py.)"""

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from accelc.compiler.artifact_dir import load_artifacts
from accelc.compiler.errors import AccelcError
from accelc.runtime import session as S
from accelc.runtime.config import ExecConfig
from accelc.runtime.executor import SegmentedRunner
from accelc.runtime.kernels import KernelProvider, NodeKernel, store


class _Neg(NodeKernel):
    def run(self, env, bound):
        store(self.outputs[0], -env[self.inputs[0]], env, bound)


def _neg(node):
    return node.op_type == "Neg"


PROVIDER = KernelProvider("test-neg", ("torch",), _neg, lambda n, ctx: _Neg(n))


def _runner(model):
    owners = {k: PROVIDER for k, n in enumerate(model.graph.node) if _neg(n)}
    return SegmentedRunner(model, S.session_options(1), ["CPUExecutionProvider"], ExecConfig(), owners)


def _model():
    """x -> Relu -> Neg (a kernel) -> Abs -> y, and NonZero(Relu(x)) -> idx: the second segment's
    output ``y`` has the input's shape; ``idx``'s shape depends on the data."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, [2, None])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Neg", ["r"], ["n"]),
        helper.make_node("Abs", ["n"], ["a"]),
        helper.make_node("Identity", ["a"], ["y"]),
        helper.make_node("NonZero", ["n"], ["idx"]),
    ]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y, idx]), opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def test_segment_outputs_are_allocated_by_torch_after_the_first_run():
    runner = _runner(_model())
    rng = np.random.default_rng(0)
    for step in range(3):
        x = torch.from_numpy(rng.standard_normal((3, 4)).astype(np.float32))
        env = {}
        outs, _ = runner.run({"x": x}, env_out=env, run_options=S.run_options("cpu"))
        np.testing.assert_array_equal(outs["y"].numpy(), np.maximum(x.numpy(), 0))
        np.testing.assert_array_equal(outs["idx"].numpy(), np.stack(np.nonzero(np.maximum(x.numpy(), 0))))
    first = runner.segments[0]
    # the first segment's output shapes are known from its input shapes: torch allocates them now
    assert first["out_shapes"][((3, 4),)] == {"r": ((3, 4), torch.float32)}
    # the second segment's NonZero has a data-dependent shape: it fell back to ORT's allocation
    assert runner.segments[1].get("dynamic") is True


def test_outputs_of_other_input_shapes_are_learnt_separately():
    runner = _runner(_model())
    for n in (2, 5, 2):
        x = torch.ones(n, 4)
        outs, _ = runner.run({"x": x})
        assert outs["y"].shape == (n, 4)
    assert set(runner.segments[0]["out_shapes"]) == {((2, 4),), ((5, 4),)}


def test_the_arena_is_shrunk_only_for_large_steps():
    assert S.run_options("cpu", S.SHRINK_FROM_BYTES - 1) is None
    ro = S.run_options("cpu", S.SHRINK_FROM_BYTES)
    assert ro is not None and ro.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    assert S.run_options("cuda", 1 << 40) is None


def test_loaded_artifacts_read_the_checkpoint_when_used(small_art, tmp_path):
    import shutil

    d = tmp_path / "art"
    shutil.copytree(small_art, d)
    art, _ = load_artifacts(d)
    assert callable(art.checkpoint_source())  # not held in memory
    data = art.checkpoint
    assert data == (d / "checkpoint").read_bytes()
    assert art.copy().checkpoint_source() is art.checkpoint_source()  # copies do not read it
    sess = S.TrainingSession(art)
    assert not any(isinstance(v, bytes) and len(v) == len(data) for v in vars(sess).values())
    assert "read when used" in repr(art)  # showing the artifacts reads nothing
    import pickle

    assert pickle.loads(pickle.dumps(art)).checkpoint == data  # another process gets the bytes
    # the directory removed (or recompiled over) after loading: what was loaded is still read
    shutil.move(d, tmp_path / "moved")
    assert art.checkpoint == data
    # edited in place after loading: refused when read, never used
    (tmp_path / "moved" / "checkpoint").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(AccelcError, match="changed after the artifacts were loaded"):
        art.checkpoint


def test_in_memory_artifacts_keep_their_bytes(small_art):
    art, _ = load_artifacts(small_art)
    copy = art.copy()
    copy.checkpoint = b"abc"
    assert copy.checkpoint == b"abc" and art.checkpoint != b"abc"


def test_segmented_training_is_unchanged_by_preallocation(small_art):
    """A step with outputs torch allocated gives the gradients of one with ORT's."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 8).astype(np.int64)
    # convs on oneDNN between ORT segments (the rest left to ORT, so that there are segments)
    a = S.TrainingSession(small_art, ExecConfig(threads=1, kernels={"aten": "ort"}))
    assert a.runner is not None and a.runner.segments
    b = S.TrainingSession(small_art, ExecConfig(threads=1, kernels={"aten": "ort"}))
    for seg in b.runner.segments:
        seg["dynamic"] = True  # never preallocated
    for _ in range(2):
        la, ga, _ = a.compute_gradients(x, y)
        lb, gb, _ = b.compute_gradients(x, y)
    assert any(seg["out_shapes"] for seg in a.runner.segments)
    assert la == lb
    for k in ga:
        np.testing.assert_array_equal(ga[k], gb[k])
