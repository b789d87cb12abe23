"""A new method is one object: a toy method defined here, outside accelc, without editing any of
accelc's files and without monkeypatching: one :class:`accelc.Method` handed to
:func:`accelc.install`. It has options (one definition: its flag, its Python validation and its
plan.json schema come from it), a pass, a custom node with its own kernel in the executor, a
run-time algorithm that switches variant after epoch 1, a run-summary line and a bench panel; it
composes with skip and trains."""

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

import accelc
from accelc.compiler import pass_api, provenance
from accelc.compiler.artifact_dir import load_artifacts
from accelc.compiler.errors import AccelcError
from accelc.compiler.method import Panel
from accelc.compiler.options import Options, option
from accelc.runtime import algorithm, kernels
from accelc.runtime.session import TrainingSession
from accelc.zoo import export_zoo

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


@dataclass(frozen=True)
class ToyOptions(Options):
    min_channels: int = option(1, "only Relus on at least this many channels", _channels)


class ToyPass(pass_api.Pass):
    def run(self, art, options):
        from accelc.compiler.graph import training_graph

        shapes = training_graph(art).shapes
        n = _to_toy(art.training, options.min_channels, shapes)
        if n:
            art.plan.append(self.method.plan_entry(options))
        return pass_api.PassResult(art, bool(n), [{"summary": f"{n} Relu(s) -> {OP}"}])


class ToyAlgorithm(algorithm.Algorithm):
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

    def report(self):
        return {"on": self.on}

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


def _summary(rep, decisions, options, history):
    return [f"toy: kernel on (min_channels={options.min_channels}) until epoch {decisions[0]['epoch']}"]


DRAWN = []


def _draw(ax, runs, colour):
    DRAWN.extend(c for c, _ in runs)
    for c, h in runs:
        ax.plot([m["epoch"] for m in h], [m["toy"]["kernel_calls"] for m in h], color=colour[c], label=c)


TOY = accelc.Method(
    name="toy",
    summary="forward Relus run by a toy kernel",
    paper="tests/test_extension.py",
    options=ToyOptions,
    compile=ToyPass,
    algorithm=ToyAlgorithm,
    after=("amp",),
    before=("skip",),  # between amp and skip, as the composition order allows
    kernels=(
        kernels.KernelProvider(
            name="toy",
            implementations=("torch",),
            claims=lambda node: node.domain == DOMAIN,
            build=lambda node, ctx: ToyKernel(node),
        ),
    ),
    run_summary=_summary,
    bench_panel=Panel("toy kernel calls", lambda h: any("toy" in m for m in h), _draw),
)


@pytest.fixture
def toy():
    """The toy method installed for one test (and nothing after it): one object, no patching."""
    accelc.install(TOY)
    ToyKernel.calls = 0
    yield TOY
    accelc.uninstall(TOY)


def test_toy_method_composes_with_skip_and_trains(toy, tmp_path):
    export_zoo("cnn3-small", tmp_path / "m.onnx")
    # the option is validated like any pass's, from Python as from the CLI
    with pytest.raises(AccelcError, match="--toy-min-channels"):
        accelc.compile(tmp_path / "m.onnx", tmp_path / "bad", passes=["toy"], pass_options={"toy": {"min_channels": 0}})
    rep = accelc.compile(
        tmp_path / "m.onnx",
        tmp_path / "art",
        passes="toy,skip",
        pass_options={"toy": {"min_channels": 32}, "skip": {"rule": "lars", "tau_mode": "absolute", "tau": 1e-9}},
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

    # its summary line and its bench panel, from the method object alone
    from accelc.bench import plot_controllers
    from accelc.cli.summary import training_summary

    lines = training_summary(s, [p for p in art.plan])
    assert "toy: kernel on (min_channels=32) until epoch 1" in lines
    DRAWN.clear()
    plot_controllers({"toy+skip": [{"history": hist}]}, tmp_path / "controllers.png", {"model": "m", "data": "d"})
    assert DRAWN == ["toy+skip"] and (tmp_path / "controllers.png").stat().st_size > 0


def test_toy_method_gets_its_flags_and_plan_schema(toy, capsys):
    from accelc.cli import main
    from accelc.compiler import schemas

    with pytest.raises(SystemExit) as e:
        main(["compile", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--toy-min-channels" in out and "only Relus on at least this many channels" in out
    assert "toy" in [m.name for m in accelc.installed()]
    assert [m.name for m in accelc.installed()][-2:] == ["toy", "skip"]  # between amp and skip
    # plan.json's schema is derived from the options: every option, no other key
    good = {"controllers": [{"type": "toy", "options": {"min_channels": 3}}]}
    schemas.check(good, schemas.plan_schema(), "plan.json")
    for bad in ({"min_channels": 3, "bogus": 1}, {}):
        with pytest.raises(AccelcError, match="plan.json"):
            schemas.check({"controllers": [{"type": "toy", "options": bad}]}, schemas.plan_schema(), "plan.json")


def _another(name, **order):
    opts = dataclass(frozen=True)(type(f"{name}Options", (Options,), {}))
    return accelc.Method(name=name, options=opts, compile=type(f"{name}Pass", (pass_api.Pass,), {}), **order)


def test_composition_order_ties_and_cycles_are_refused():
    before = [m.name for m in accelc.installed()]
    with pytest.raises(AccelcError, match="a tie"):
        accelc.install(_another("tie", after=("amp",)))
    with pytest.raises(AccelcError, match="cycle"):
        accelc.install(_another("loop", after=("skip",), before=("opt",)))
    with pytest.raises(AccelcError, match="not installed"):
        accelc.install(_another("lost", after=("nothing",)))
    with pytest.raises(AccelcError, match="already installed"):
        accelc.install(_another("skip", after=("amp",)))
    assert [m.name for m in accelc.installed()] == before  # a refused install changes nothing
