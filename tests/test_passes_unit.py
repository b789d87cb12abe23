"""Each pass on a tiny hand-made graph, in process (the style of onnx-ir's and onnxscript's pass
tests): build a few nodes, run the pass, assert ``modified`` and numerical equality with the
unrewritten graph on the same weights and batch."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import accelc.passes  # noqa: F401  (registers the passes)
from accelc.compiler import provenance
from accelc.compiler.artifacts import generate
from accelc.compiler.errors import AccelcError
from accelc.compiler.manager import PassManager
from accelc.compiler.model import check_model
from accelc.compiler.pass_api import get, parse_pass_list
from accelc.compiler.validation import random_feeds, run_lowered


def tiny(head: str = "flatten", k1: int = 3, hw: int = 8) -> onnx.ModelProto:
    """X[N,3,hw,hw] -> Conv c1 (3->8, k1) -> Relu -> Conv c2 (8->8, 3x3) -> Relu -> head -> Gemm fc (->4)."""
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    inits = [init("c1.weight", 8, 3, k1, k1), init("c1.bias", 8), init("c2.weight", 8, 8, 3, 3), init("c2.bias", 8)]
    nodes = [
        helper.make_node("Conv", ["x", "c1.weight", "c1.bias"], ["h1"], name="/c1/Conv", pads=[k1 // 2] * 4),
        helper.make_node("Relu", ["h1"], ["r1"], name="/Relu"),
        helper.make_node("Conv", ["r1", "c2.weight", "c2.bias"], ["h2"], name="/c2/Conv", pads=[1] * 4),
        helper.make_node("Relu", ["h2"], ["r2"], name="/Relu_1"),
    ]
    if head == "flatten":
        nodes.append(helper.make_node("Flatten", ["r2"], ["f"], name="/Flatten"))
        feat = 8 * hw * hw
    else:
        nodes += [
            helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="/GAP"),
            helper.make_node("Flatten", ["g"], ["f"], name="/Flatten"),
        ]
        feat = 8
    inits += [init("fc.weight", 4, feat), init("fc.bias", 4)]
    nodes.append(helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="/fc/Gemm", transB=1))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    return m


def artifacts(**kw):
    art, _ = generate(check_model(tiny(**kw)))
    return art


def outputs(art, model=None, seed=0):
    """Loss, logits and every gradient of a training graph on one random batch (random weights)."""
    model = model or art.training
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(art.training.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = random_feeds(sess, art, np.random.default_rng(seed), params="random", batch=2)
    return run_lowered(art, model, feeds)


def assert_same(a: dict, b: dict, keys=None, tol=1e-5):
    for k in keys or a:
        x, y = np.asarray(a[k], np.float64), np.asarray(b[k], np.float64)
        assert np.linalg.norm(x - y) <= tol * np.linalg.norm(x) + 1e-7, k


def run_pass(name, art, **options):
    p = get(name)()
    return p.run(art.copy(), p.resolve_options(options))


def test_opt_relu_grad_rule():
    art = artifacts()
    res = run_pass("opt", art, rules="relu_grad")
    assert res.modified
    ops = [n.op_type for n in res.artifacts.training.graph.node]
    assert "ReluGrad" not in ops and ops.count("Greater") == 2
    tagged = [n for n in res.artifacts.training.graph.node if provenance.props(n).get(provenance.PASS) == "opt"]
    assert len(tagged) == 6
    assert_same(outputs(art), outputs(art, res.artifacts.training))


def test_opt_conv_onednn_rule_marks_and_changes_nothing_else():
    art = artifacts()
    res = run_pass("opt", art, rules=["conv_onednn"])
    assert res.modified and len(res.changes) == 2
    marked = [n.op_type for n in res.artifacts.training.graph.node if provenance.props(n).get(provenance.EXEC)]
    assert sorted(marked) == ["Conv", "Conv", "ConvGrad", "ConvGrad"]
    assert_same(outputs(art), outputs(art, res.artifacts.training), tol=0)


def test_skip_prunes_a_fixed_set_and_keeps_the_other_gradients():
    art = artifacts()
    res = run_pass("skip", art, layers="c1")
    assert res.modified
    before, after = outputs(art), outputs(art, res.artifacts.training)
    kept = [k for k in after if k.startswith(("c2.", "fc.")) and k.endswith("_grad")]
    assert kept and not [k for k in after if k.startswith("c1.") and k.endswith("_grad")]
    assert_same(before, after, keys=kept + [art.training.graph.output[0].name])  # the gradients left, the loss


def test_skip_instruments_the_lars_norms():
    art = artifacts()
    res = run_pass("skip", art, rule="lars")
    assert res.modified and res.artifacts.plan[-1]["type"] == "skip"
    out = outputs(art, res.artifacts.training)
    for layer, w in (("c1", "c1.weight"), ("c2", "c2.weight"), ("fc", "fc.weight")):
        assert abs(out[f"accelc.lars.{layer}.g"] - np.linalg.norm(out[f"{w}_grad"])) < 1e-4 * np.linalg.norm(
            out[f"{w}_grad"]
        )


def test_reuse_with_every_row_its_own_cluster_is_the_convolution():
    """H = 20 hyperplanes on 36 rows per image: every row its own cluster, so the reused conv (run
    as its portable ONNX functions in plain ORT) equals the exact one."""
    art = artifacts(hw=6)
    res = run_pass("reuse", art, layers="c2", L=72, H=20)
    assert res.modified
    ops = [n.op_type for n in res.artifacts.training.graph.node]
    assert "ReuseConv_c2" in ops and "ReuseConvGrad_c2" in ops and ops.count("ConvGrad") == 1
    assert_same(outputs(art), outputs(art, res.artifacts.training), tol=1e-4)


def test_reuse_refuses_what_it_cannot_reuse():
    with pytest.raises(AccelcError, match="not a reusable layer"):
        run_pass("reuse", artifacts(), layers="c1")  # 3 input channels


def test_rescale_builds_the_low_resolution_stage():
    art = artifacts(k1=5)
    res = run_pass("rescale", art, mode="kernel", factor=2, min_kernel=5)
    assert res.modified
    stage = res.artifacts.stages["stage-low"]
    assert stage.info.input_shape == (3, 4, 4)
    w = {t.name: tuple(t.dims) for t in stage.info.model.graph.initializer}
    assert w["c1.weight"] == (8, 3, 3, 3) and w["c2.weight"] == (8, 8, 3, 3) and w["fc.weight"] == (4, 128)
    assert get("rescale")().ensures(
        art, res.artifacts, get("rescale").resolve_options({"mode": "kernel", "min_kernel": 5})
    )


def test_manager_validates_every_stage_it_changed():
    art = artifacts(k1=5)
    manager = PassManager(
        ["opt", "rescale", "skip"], {"rescale": {"mode": "kernel", "min_kernel": 5}, "skip": {"rule": "lars"}}
    )
    out, records = manager.run(art)
    rec = {r["name"]: r for r in records}
    assert manager.validation["training_step"] and manager.validation["stages"]["stage-low"]["training_step"]
    assert "rescale both ways" in rec["rescale"]["validation"]["self_check"]
    assert "unchanged by construction" in rec["skip"]["validation"]["self_check"]  # instrumented: norms added
    stage_ops = [n.op_type for n in out.stages["stage-low"].training.graph.node]
    assert "ReluGrad" not in stage_ops  # opt replayed on the new stage
    assert any(o.name.startswith("accelc.lars.") for o in out.stages["stage-low"].training.graph.output)


@pytest.mark.parametrize(
    "name,options,needle",
    [
        ("skip", {"tau": -3}, "must be a finite number > 0"),
        ("skip", {"tau": float("inf")}, "must be a finite number > 0"),
        ("skip", {"policy": "sideways"}, "choose from prefix, suffix, any"),
        ("skip", {"nope": 1}, "has no option"),
        ("reuse", {"H": 0}, "1..20"),
        ("reuse", {"schedule": "288"}, "L:H pairs"),
        ("rescale", {"factor": 1.5}, "integer"),
        ("rescale", {"switch": 3}, "epoch:E"),
        ("opt", {"rules": "fast"}, "unknown rule"),
    ],
)
def test_options_are_validated_from_python_as_from_the_cli(name, options, needle):
    with pytest.raises(AccelcError, match=needle):
        get(name).resolve_options(options)


def test_pass_lists():
    assert parse_pass_list("none") == [] and parse_pass_list(None) == []
    assert parse_pass_list(["rescale", "skip"]) == ["rescale", "skip"]
    with pytest.warns(UserWarning, match="passes run in the order rescale,skip"):  # put into order (issue 19)
        assert parse_pass_list("skip,rescale") == ["rescale", "skip"]
    for bad, needle in (
        ("skip,skip", "twice"),
        ("nope", "unknown pass"),
        (3, "list"),
    ):
        with pytest.raises(AccelcError, match=needle):
            parse_pass_list(bad)


def test_a_later_tag_keeps_the_run_time_settings_of_a_node():
    """skip trimming a ConvGrad that amp marked for its bf16 kernel must not hand it back to ORT
    (seen on a CPU with native bf16: ORT got bf16 inputs)."""
    n = helper.make_node("ConvGrad", ["dy", "x", "w"], ["", "dw"], name="c_Grad/ConvGrad_0")
    provenance.tag(n, "amp", "c", "bf16 on oneDNN", **{provenance.EXEC: "amp", "accelc.amp.role": "conv_grad"})
    provenance.tag(n, "skip", "c", "skip: unneeded gradient outputs removed")
    p = provenance.props(n)
    assert p[provenance.PASS] == "skip" and p[provenance.NOTE].startswith("skip")
    assert p[provenance.EXEC] == "amp" and p["accelc.amp.role"] == "conv_grad"
