"""A fifth method touches one folder: a toy method defined here, outside accelc, without editing
any of accelc's files. It has a pass with one option, a custom node with its own kernel in the
executor, and a run-time algorithm that switches variant after epoch 1; it composes with skip and
trains."""

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

import accelc
from accelc.compiler import pass_api, provenance
from accelc.compiler.artifact_dir import load_artifacts
from accelc.compiler.errors import AccelcError
from accelc.compiler.export import export_zoo
from accelc.runtime import algorithm, kernels
from accelc.runtime.session import TrainingSession

DOMAIN = "ai.toy"
OP = "ToyRelu"


def _to_toy(model: onnx.ModelProto, min_channels: int, shapes: dict) -> int:
    """Forward Relus on tensors with >= min_channels channels become ai.toy::ToyRelu (an ONNX
    local function whose body is Relu, so plain ORT runs it too)."""
    n = 0
    for node in model.graph.node:
        if node.op_type == "Relu" and "_Grad/" not in node.name:
            shape = shapes.get(node.input[0], ())
            if len(shape) > 1 and shape[1] >= min_channels:
                node.op_type, node.domain = OP, DOMAIN
                provenance.tag(node, "toy", note="Relu run by the toy kernel")
                n += 1
    if n:
        body = [helper.make_node("Relu", ["X"], ["Y"])]
        model.functions.append(helper.make_function(DOMAIN, OP, ["X"], ["Y"], body, [helper.make_opsetid("", 17)]))
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return n


def _strip(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for node in m.graph.node:
        if node.domain == DOMAIN:
            node.op_type, node.domain = "Relu", ""
    keep = [f for f in m.functions if f.domain != DOMAIN]
    del m.functions[:]
    m.functions.extend(keep)
    return m


def _channels(value):
    v = int(value)
    if v < 1:
        raise ValueError("must be >= 1")
    return v


class ToyPass(pass_api.Pass):
    name = "toy"
    summary = "forward Relus run by a toy kernel"
    paper = "tests/test_extension.py"
    rank = 25  # after reuse, before skip
    options = {"min_channels": pass_api.Option(1, "only Relus on at least this many channels", _channels)}

    def run(self, art, options):
        from accelc.compiler.graph import training_graph

        shapes = training_graph(art).shapes
        n = _to_toy(art.training, options["min_channels"], shapes)
        if n:
            art.plan.append({"type": "toy"})
        return pass_api.PassResult(art, bool(n), [{"summary": f"{n} Relu(s) -> {OP}"}])


class ToyAlgorithm(algorithm.Algorithm):
    name = "toy"
    rank = ToyPass.rank

    def __init__(self, root, spec):
        super().__init__(root, spec)
        self.on = True

    def decision(self):
        return self.on

    def transform(self, art):
        if self.on:
            return art
        out = art.copy()
        out.training = _strip(art.training)
        return out

    def describe(self):
        return "" if self.on else "toy:off"

    def on_epoch_end(self, state, epoch, metrics):
        self.logger.log_metrics({"toy": {"kernel_calls": ToyKernel.calls}})
        if self.on and epoch >= 1:
            self.on = False
            self.decide(epoch, "off", "epoch 1 done: plain Relu from epoch 2")

    def state_dict(self):
        return {"log": self.log, "on": self.on}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.on = state["on"]


class ToyKernel(kernels.NodeKernel):
    calls = 0

    def run(self, env, bound):
        ToyKernel.calls += 1
        kernels.store(self.outputs[0], torch.relu(env[self.inputs[0]]), env, bound)
        return None


@pytest.fixture
def toy(monkeypatch):
    """Register the toy method for one test (and nothing after it)."""
    monkeypatch.setitem(pass_api._REGISTRY, "toy", pass_api.register(ToyPass))
    monkeypatch.setitem(algorithm._ALGORITHMS, "toy", algorithm.register_algorithm(ToyAlgorithm))
    provider = kernels.KernelProvider(
        name="toy",
        implementations=("torch",),
        claims=lambda node: node.domain == DOMAIN,
        build=lambda node, ctx: ToyKernel(node),
    )
    monkeypatch.setitem(kernels._PROVIDERS, "toy", kernels.register_kernel(provider))
    ToyKernel.calls = 0
    return ToyPass


def test_toy_method_composes_with_skip_and_trains(toy, tmp_path):
    export_zoo("cnn3-small", tmp_path / "m.onnx")
    # the option is validated like any pass's, from Python as from the CLI
    with pytest.raises(AccelcError, match="--toy-min-channels"):
        accelc.compile(tmp_path / "m.onnx", tmp_path / "bad", passes=["toy"], pass_options={"toy": {"min_channels": 0}})
    rep = accelc.compile(
        tmp_path / "m.onnx",
        tmp_path / "art",
        passes="toy,skip",
        pass_options={"toy": {"min_channels": 32}, "skip": {"tau_mode": "absolute", "tau": 1e-9}},
    )
    rec = {p["name"]: p for p in rep["passes"]}
    assert rec["toy"]["modified"] and rec["toy"]["changes"][0]["summary"] == f"2 Relu(s) -> {OP}"  # c2, c3
    assert rep["validation"]["training_step"] and "validation" in rec["toy"]  # the manager validated the toy graph
    art, _ = load_artifacts(tmp_path / "art")
    assert [p["type"] for p in art.plan] == ["toy", "skip"]
    assert sum(n.domain == DOMAIN for n in art.training.graph.node) == 2

    # the toy node runs in its kernel and gives ORT's own numbers (plain ORT runs its function)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 8).astype(np.int64)
    fast = TrainingSession(art)
    assert fast.runner is not None
    ToyKernel.calls = 0
    la, ga, _ = fast.compute_gradients(x, y)
    assert ToyKernel.calls == 2
    from accelc.runtime.config import ExecConfig

    lb, gb, _ = TrainingSession(art, ExecConfig(kernels={"toy": "ort", "conv": "ort"})).compute_gradients(x, y)
    assert abs(la - lb) < 1e-5 * abs(lb)
    for k in gb:
        assert np.linalg.norm(ga[k] - gb[k]) <= 1e-4 * np.linalg.norm(gb[k]) + 1e-7, k

    # training: the toy algorithm switches after epoch 1, skip acts on what is left
    ToyKernel.calls = 0
    s = accelc.train(
        tmp_path / "art", data="synthetic:512", epochs=3, batch_size=64, run_dir=tmp_path / "run", progress=False
    )
    hist = s["history"]
    acts = {(d["controller"], d["action"]) for m in hist for d in m["decisions"]}
    assert ("toy", "off") in acts and ("skip", "skip") in acts
    calls = [m["toy"]["kernel_calls"] for m in hist]
    assert calls[0] > 0 and calls[1] == calls[0] == calls[2]  # the kernel ran in epoch 1 only
    assert hist[0]["variant"] == "base" and hist[1]["variant"].startswith("toy:off")
    assert all(np.isfinite(m["train_loss"]) for m in hist) and hist[-1]["train_loss"] < hist[0]["train_loss"]
