"""skip pass: pruned gradients equal torch autograd with the same parameters frozen; skipped
layers have no gradient nodes; an input-side prefix leaves no backward below it; the controller
skips exactly the layers whose λ crossed τ."""

import copy
import dataclasses

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

import accelc
from accelc.compiler.artifact_dir import load_artifacts
from accelc.compiler.graph import training_graph
from accelc.passes.skip.algorithm import LarsSkip
from accelc.passes.skip.rewrite import layer_groups, skip_variant
from accelc.runtime.config import ExecConfig
from accelc.runtime.session import TrainingSession

from conftest import export_test_model, off_gradients

CASES = {
    "vgg": [["features.0"], ["features.0", "features.3", "features.7"], ["features.10"], ["fc1"]],
    "resnet": [["stem"], ["stem", "layers.0.conv1", "layers.0.conv2"], ["layers.1.conv2"], ["layers.1.down.0"]],
    "mixed": [["stem", "grouped"], ["dw"], ["pw", "fc"]],
}

LARS = {"skip": {"rule": "lars"}}  # the paper's rule (the default is freezeout: tests/test_freezeout.py)


def _model(name, tmp_path):
    m, shape = export_test_model(name, tmp_path / "m.onnx")
    accelc.compile(tmp_path / "m.onnx", tmp_path / "art")
    return m, shape


def numpy_lars(w, g, eta, beta):
    """The LARS local rate λ = η‖w‖/(‖∇w‖ + β‖w‖) from the arrays themselves, in float64 and
    written out here (not the product's ``lars``): the reference the graph's norms are checked against."""
    w = np.asarray(w, dtype=np.float64).ravel()
    g = np.asarray(g, dtype=np.float64).ravel()
    w_norm, g_norm = np.sqrt(np.dot(w, w)), np.sqrt(np.dot(g, g))
    return float(eta * w_norm / (g_norm + beta * w_norm))


def torch_frozen_grads(module, frozen, x, y, dtype=torch.float32):
    module = copy.deepcopy(module).train().to(dtype)
    for k, p in module.named_parameters():
        p.requires_grad_(k not in frozen)
    loss = F.cross_entropy(module(torch.from_numpy(x).to(dtype)), torch.from_numpy(y))
    loss.backward()
    return float(loss), {k: p.grad.numpy() for k, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(CASES))
def test_pruned_gradients_match_torch_frozen(name, tmp_path):
    module, shape = _model(name, tmp_path)
    base, _ = load_artifacts(tmp_path / "art")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, *shape)).astype(np.float32)
    y = rng.integers(0, 10, 4).astype(np.int64)
    for skip in CASES[name]:
        art, changes = skip_variant(base, skip)
        tg = training_graph(art)
        frozen = [p for s in skip for p in layer_groups(training_graph(base))[s]]
        # ORT's conv kernels: with batch 4 a BatchNorm output within 1e-6 of a ReLU kink is likely, and
        # oneDNN's last-bit differences then flip one mask element (the conv_onednn rule is checked
        # node by node in test_opt)
        loss, grads, _ = TrainingSession(art, ExecConfig(kernels={"conv": "ort"})).compute_gradients(x, y)
        tloss, tgrads = torch_frozen_grads(module, set(frozen), x, y)
        assert abs(loss - tloss) < 1e-4
        assert set(grads) == set(tgrads), (skip, set(grads) ^ set(tgrads))
        # 1e-4 relative, 1e-6 absolute; float64 judges where float32 is ill-conditioned
        t64 = torch_frozen_grads(module, set(frozen), x, y, torch.float64)[1]
        bad = off_gradients(grads, tgrads, t64)
        assert not bad, (skip, bad)
        # skipped layers have no gradient nodes: no accumulator, no weight-gradient output
        for s in skip:
            layer = tg.layer(s)
            assert not layer.accumulators
            for n in layer.backward:
                if n.op == "ConvGrad":
                    assert all(not o.name for o in n.outputs[1:])
                else:  # Gemm gradient: only the input-gradient Gemm may remain
                    assert all(
                        not o.name.endswith("_grad") or o.name.split("_grad")[0] not in layer.params for o in n.outputs
                    )
        # the plain ORT API loads the pruned artifacts (checkpoint marks them frozen)
        assert all(p not in tg.params for p in frozen)


def test_input_prefix_leaves_no_backward_below(tmp_path):
    _model("vgg", tmp_path)
    base, _ = load_artifacts(tmp_path / "art")
    prefix = ["features.0", "features.3", "features.7"]
    art, _ = skip_variant(base, prefix)
    tg = training_graph(art)
    lowest = tg.layer("features.10")
    cg = [n for n in lowest.backward if n.op == "ConvGrad"][0]
    assert not cg.outputs[0].name  # the lowest trained conv computes no input gradient
    # no backward node consumes or produces a gradient of anything below features.10
    below = {"/features/features.%d" % i for i in range(0, 10)}
    for n in tg.graph.nodes:
        if tg.is_backward(n):
            assert not any(n.name.startswith(b + "/") or n.name.startswith(b + "_") for b in below), n.name
    # fewer backward FLOPs than the full graph, equal forward
    from accelc.compiler.cost import graph_costs

    full, pruned = graph_costs(training_graph(base)), graph_costs(tg)
    assert pruned["phases"]["forward"]["flops"] == full["phases"]["forward"]["flops"]
    assert pruned["phases"]["backward"]["flops"] < 0.8 * full["phases"]["backward"]["flops"]


@pytest.mark.slow
def test_compile_fixed_skip_set_cli_and_plain_ort(tmp_path):
    from onnxruntime.training import api

    from conftest import run_cli

    _model("vgg", tmp_path)
    r = run_cli(
        "compile",
        tmp_path / "m.onnx",
        "-o",
        tmp_path / "s",
        "--passes",
        "skip",
        "--skip-layers",
        "features.0,features.3",
    )
    assert r.returncode == 0, r.stderr
    d = tmp_path / "s"
    m = onnx.load(str(d / "training_model.onnx"))
    tagged = [n for n in m.graph.node if any(p.key == "accelc.pass" and p.value == "skip" for p in n.metadata_props)]
    assert tagged  # Netron shows what the pass changed
    state = api.CheckpointState.load_checkpoint(str(d / "checkpoint"))
    module = api.Module(str(d / "training_model.onnx"), state, str(d / "eval_model.onnx"))
    opt = api.Optimizer(str(d / "optimizer_model.onnx"), module)
    module.train()
    module(np.zeros((2, 1, 28, 28), np.float32), np.zeros(2, np.int64))
    opt.step()
    r = run_cli("compile", tmp_path / "m.onnx", "-o", tmp_path / "bad", "--passes", "skip", "--skip-layers", "nope")
    assert r.returncode == 2 and "nope" in r.stderr and "features.0" in r.stderr
    assert not (tmp_path / "bad").exists()


def test_lars_values_match_numpy_and_controller_skips_crossers(tmp_path):
    _model("vgg", tmp_path)
    accelc.compile(tmp_path / "m.onnx", tmp_path / "inst", passes=["skip"], pass_options=LARS, force=True)
    sess = TrainingSession(tmp_path / "inst")
    ctrl = LarsSkip(sess.artifacts, sess.artifacts.plan[0])
    opts = sess.artifacts.plan[0]["options"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 8).astype(np.int64)
    before = {k: v.numpy().copy() for k, v in sess.params.items()}
    step = sess.train_step(x, y)
    grads = sess.gradients()
    tg = training_graph(sess.artifacts)
    for layer in tg.layers:
        w = layer.weight
        expect = numpy_lars(before[w], grads[w], opts["eta"], opts["beta"])
        wk, gk = ctrl.keys[layer.name]
        got = ctrl.lars(step.probes[wk], step.probes[gk], opts["eta"], opts["beta"])
        assert abs(got - expect) <= 1e-5 * expect, (layer.name, got, expect)
    # decisions: relative τ=2; epoch 1 sets the reference, epoch 2 λ values cross for some layers
    ctrl.first = {l: 1.0 for l in ctrl.layers}
    lam = {l: 1.0 for l in ctrl.layers}
    for l in ("features.0", "features.3", "features.10"):
        lam[l] = 2.5
    assert ctrl.done_layers(lam) == ["features.0", "features.3", "features.10"]
    assert ctrl.choose(ctrl.done_layers(lam)) == ["features.0", "features.3"]  # prefix stops at features.7
    ctrl.options = dataclasses.replace(ctrl.options, policy="any")
    assert ctrl.choose(ctrl.done_layers(lam)) == ["features.0", "features.3", "features.10"]
    ctrl.options = dataclasses.replace(ctrl.options, policy="prefix")
    ctrl.skipped = ["features.0", "features.3"]
    lam2 = {l: 1.0 for l in ctrl.layers}  # monotone: nothing done any more, nothing un-skipped
    assert ctrl.choose(ctrl.done_layers(lam2)) == ["features.0", "features.3"]
    ctrl.options = dataclasses.replace(ctrl.options, tau_mode="absolute", tau=0.5)
    assert set(ctrl.done_layers({"fc1": 0.6, "fc2": 0.4})) == {"fc1"}
    # growth: done once λ's rise over the previous epoch falls under τ (none before a second epoch)
    ctrl.options = dataclasses.replace(ctrl.options, tau_mode="growth", tau=0.1)
    ctrl.lambdas = [{"epoch": 1, "fc1": 1.0, "fc2": 1.0}]
    assert ctrl.done_layers({"fc1": 1.05, "fc2": 1.5}) == []
    ctrl.lambdas.append({"epoch": 2, "fc1": 1.05, "fc2": 1.5})
    assert ctrl.done_layers({"fc1": 1.05, "fc2": 1.5}) == ["fc1"]  # +5% < 10%; fc2 still rose 50%


def test_controller_end_to_end_skips_and_accounts(tmp_path):
    from accelc.runtime.data import synthetic
    from accelc.runtime.spec import TrainSpec
    from accelc.runtime.train import Trainer

    _model("vgg", tmp_path)
    accelc.compile(tmp_path / "m.onnx", tmp_path / "inst", passes=["skip"], pass_options=LARS, force=True)
    sess = TrainingSession(tmp_path / "inst")
    entry = sess.artifacts.plan[0]
    opts = {**entry["options"], "tau": 1.05, "policy": "any"}  # a low threshold so the tiny run decides
    ctrl = LarsSkip(sess.artifacts, {**entry, "options": opts})
    ds = synthetic((1, 28, 28), 10, 512, 64)
    run = TrainSpec(run_dir=None, epochs=3, batch_size=64, seed=0, progress=False)
    s = Trainer(run, sess, ds, algorithms=[ctrl]).run()
    skips = [d for d in s["decisions"] if d["action"] == "skip"]
    assert skips, s["decisions"]
    d = skips[0]
    for layer, lam in d["lam"].items():  # every skipped layer crossed its threshold
        assert lam > opts["tau"] * d["first"][layer]
    rep = s["controllers"]["skip"]
    assert 0 < rep["op_reduction"] < 1 and 0 < rep["bandwidth_reduction"] < 1
    assert sess.variant_name.startswith("skip:")


@pytest.mark.parametrize("name", ["resnet", "mixed"])
def test_savings_per_layer_equal_pruning_a_copy_per_set(name, tmp_path):
    """The one-sweep savings the pass reports equal pruning the graph per skip set and costing it."""
    from accelc.compiler.cost import graph_costs
    from accelc.compiler.graph import TrainingGraph
    from accelc.passes.skip.rewrite import prune, skip_savings, skip_sets

    def skip_savings_by_pruning(art, layers, policy, keep_last):  # the reference: a pruned copy per set
        base_tg = training_graph(art)
        base = graph_costs(base_tg)["total"]["flops"]
        out = {}
        for name, skip in skip_sets(layers, policy, keep_last).items():
            tg = TrainingGraph(art.training, base_tg.shapes)
            prune(tg, skip)
            out[name] = base - graph_costs(tg)["total"]["flops"]
        return out

    _model(name, tmp_path)
    art, _ = load_artifacts(tmp_path / "art")
    layers = training_graph(art).layer_names()
    for policy in ("prefix", "suffix", "any"):
        fast = skip_savings(art, layers, policy, 1)
        slow = skip_savings_by_pruning(art, layers, policy, 1)
        assert fast.keys() == slow.keys() and len(fast) >= 3
        assert all(abs(fast[k] - slow[k]) <= 1e-9 * max(1.0, abs(slow[k])) for k in fast), (policy, fast, slow)


def test_instrumentation_is_checked_node_by_node_and_anything_else_is_not_taken_for_it(tmp_path):
    """The instrumented graph passes the structural self-check; a changed node, a changed
    initialiser or an added node of another kind sends it back to the numeric check."""
    from accelc.passes.skip.rewrite import instrument, only_norms_added

    _model("resnet", tmp_path)
    art, _ = load_artifacts(tmp_path / "art")
    tg = training_graph(art)
    instrument(tg)
    after = tg.to_onnx()
    assert "unchanged by construction" in only_norms_added(art.training, after)
    changed = copy.deepcopy(after)
    node = next(n for n in changed.graph.node if n.op_type == "Relu")
    node.op_type = "Sigmoid"
    assert only_norms_added(art.training, changed) is None
    extra = copy.deepcopy(after)
    norm = next(n for n in extra.graph.node if n.op_type == "ReduceL2")
    norm.op_type = "ReduceL1"
    assert only_norms_added(art.training, extra) is None
