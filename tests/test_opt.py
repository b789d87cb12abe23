"""opt pass: ReluGrad rewrite is exact (loss and gradients equal the unrewritten graph to 1e-5)."""

import numpy as np
import onnx
import pytest

import accelc
from accelc.runtime.config import ExecConfig
from accelc.runtime.session import TrainingSession

from conftest import export_test_model


@pytest.mark.parametrize("name", ["vgg", "resnet", "mixed"])
def test_relu_grad_rewrite_is_exact(name, tmp_path):
    m, shape = export_test_model(name, tmp_path / "m.onnx")
    plain = accelc.compile(tmp_path / "m.onnx", tmp_path / "plain", opt=False)
    rep = accelc.compile(tmp_path / "m.onnx", tmp_path / "opt")
    assert [p["name"] for p in rep["passes"]] == ["opt"] and not plain["passes"]
    g = onnx.load(str(tmp_path / "opt" / "training_model.onnx")).graph
    assert not any(n.op_type == "ReluGrad" for n in g.node)
    tagged = [
        n
        for n in g.node
        if any(p.key == "accelc.pass" and p.value == "opt" for p in n.metadata_props)
        and n.op_type in ("Greater", "Cast", "Mul")
    ]
    relu_changes = [c for c in rep["passes"][0]["changes"] if "ReluGrad" in c["summary"]]
    assert len(tagged) == 3 * len(relu_changes) > 0
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, *shape)).astype(np.float32)
    y = rng.integers(0, 10, 8).astype(np.int64)
    la, ga, _ = TrainingSession(tmp_path / "plain").compute_gradients(x, y)
    lb, gb, _ = TrainingSession(tmp_path / "opt", ExecConfig(kernels={"conv": "ort"})).compute_gradients(x, y)
    assert abs(la - lb) <= 1e-5 * abs(la)
    for k in ga:
        assert np.linalg.norm(ga[k] - gb[k]) <= 1e-5 * np.linalg.norm(ga[k]) + 1e-8, k


@pytest.mark.parametrize("name", ["vgg", "mixed"])
def test_conv_onednn_runs_the_same_mathematics(name, tmp_path):
    """Convs marked by conv_onednn run on oneDNN under accelc's runtime (grouped, depthwise, strided
    convs in "mixed"). Every such node, given the tensors it saw in a real step, equals ORT's own
    Conv/ConvGrad kernel on the same inputs (1e-5), and the loss equals the all-ORT run's.
    (Whole-step gradients are not compared elementwise: a value within 1e-6 of a ReLU kink may
    flip its mask under last-bit differences, which is not an error of either kernel.)"""
    import onnxruntime as ort
    from onnx import helper

    m, shape = export_test_model(name, tmp_path / "m.onnx")
    accelc.compile(tmp_path / "m.onnx", tmp_path / "opt")
    g = onnx.load(str(tmp_path / "opt" / "training_model.onnx")).graph
    marked = [n for n in g.node if any(p.key == "accelc.exec" and p.value == "onednn" for p in n.metadata_props)]
    assert {n.op_type for n in marked} == {"Conv", "ConvGrad"}
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, *shape)).astype(np.float32)
    y = rng.integers(0, 10, 8).astype(np.int64)
    fast = TrainingSession(tmp_path / "opt")
    assert fast.runner is not None and fast.exec.impl("conv") == "onednn"
    env = {}
    la, _, _ = TrainingSession(tmp_path / "opt", ExecConfig(kernels={"conv": "ort"})).compute_gradients(x, y)
    lb, _, _ = fast.compute_gradients(x, y, env_out=env)
    assert abs(la - lb) <= 1e-5 * abs(la)
    # the marked nodes run in opt's conv kernel (the runtime's aten kernels run the rest)
    natives = [
        item for kind, item in fast.runner.order if kind == "kernel" and item.node.name in {n.name for n in marked}
    ]
    assert len(natives) == len(marked)
    assert {type(k).__name__ for k in natives} == {"ConvKernel"}
    for nd in natives:
        node = onnx.NodeProto()
        node.CopyFrom(nd.node)
        del node.metadata_props[:]
        outs = [o for o in node.output if o and o in env]
        ins = [i for i in node.input if i]
        graph = helper.make_graph(
            [node],
            "one",
            [helper.make_tensor_value_info(i, 1, None) for i in ins],
            [helper.make_tensor_value_info(o, 1, None) for o in outs],
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        )
        model.ir_version = 10
        so = ort.SessionOptions()
        so.log_severity_level = 3
        ref = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
            outs, {i: env[i].numpy() for i in ins}
        )
        for o, r in zip(outs, ref):
            got = env[o].numpy()
            assert np.linalg.norm(got - r) <= 1e-5 * np.linalg.norm(r) + 1e-7, (nd.node.name, o)


def test_bool_tensors_cross_segment_boundaries(tmp_path):
    """Dropout between oneDNN convs: its bool mask leaves one ORT segment (DLPack gives uint8) and
    is read by DropoutGrad in another."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )
    accelc.export(net, torch.zeros(2, 1, 8, 8), tmp_path / "d.onnx")
    accelc.compile(tmp_path / "d.onnx", tmp_path / "art")
    # the convs on oneDNN, the rest (Dropout and its mask included) on ORT: a bool mask crosses
    s = TrainingSession(tmp_path / "art", ExecConfig(kernels={"aten": "ort"}))
    assert s.runner is not None
    rng = np.random.default_rng(0)
    loss, grads, _ = s.compute_gradients(
        rng.standard_normal((4, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 4).astype(np.int64)
    )
    assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads.values())
    assert any(seg["bool"] for seg in s.runner.segments)  # a mask did cross a boundary
