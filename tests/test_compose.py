"""All passes composed: order, one schedule for every controller, the standard bench report."""

import json

import onnx
import pytest

from conftest import run_cli


@pytest.fixture(scope="module")
def small32(tmp_path_factory):
    d = tmp_path_factory.mktemp("compose")
    r = run_cli("export", "cnn3-small", "--input-shape", "1,32,32", "-o", d / "m.onnx")
    assert r.returncode == 0, r.stderr
    return d


@pytest.mark.slow
def test_pass_order_is_put_right_with_a_note(small32, tmp_path):
    r = run_cli("compile", small32 / "m.onnx", "--passes", "skip,rescale", "-o", tmp_path / "x", "--no-validate")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines() == [
        "accelc: note: passes run in the order rescale,skip (each pass rewrites what the passes before it made)"
    ]
    plan = [c["type"] for c in json.loads((tmp_path / "x" / "plan.json").read_text())["controllers"]]
    assert plan == ["rescale", "skip"]


@pytest.mark.slow
def test_all_passes_rewrite_both_stages(small32, tmp_path):
    seed = ("--rescale-mode", "kernel", "--skip-rule", "lars")  # the papers' modes: one stage, instrumented
    r = run_cli("compile", small32 / "m.onnx", "--passes", "rescale,reuse,skip", *seed, "-o", tmp_path / "art")
    assert r.returncode == 0, r.stderr
    for d in (tmp_path / "art", tmp_path / "art" / "stage-low"):
        m = onnx.load(d / "training_model.onnx")
        ops = [n.op_type for n in m.graph.node]
        assert "ReluGrad" not in ops  # opt
        assert sum(o.startswith("ReuseConvGrad_") for o in ops) == 2  # reuse (c2, c3)
        assert any(o.name.startswith("accelc.lars.") for o in m.graph.output)  # skip instrumentation
    plan = [c["type"] for c in json.loads((tmp_path / "art" / "plan.json").read_text())["controllers"]]
    assert plan == ["rescale", "reuse", "skip"]


@pytest.mark.slow
def test_a_skipped_reused_layer_loses_its_backward(small32, tmp_path):
    """The composed variant: skip set {c1, c2} (an input-side prefix) with reuse on — c2's reuse
    forward stays, its ReuseConvGrad node is gone; c3 keeps its reused backward."""
    from accelc.compiler.artifact_dir import load_artifacts
    from accelc.passes.reuse.algorithm import Reuse
    from accelc.passes.skip.algorithm import LarsSkip
    from accelc.runtime.algorithm import Schedule

    r = run_cli("compile", small32 / "m.onnx", "--passes", "reuse,skip", "--skip-rule", "lars", "-o", tmp_path / "art")
    assert r.returncode == 0, r.stderr
    art, _ = load_artifacts(tmp_path / "art")
    plan = {p["type"]: p for p in art.plan}
    ru, sk = Reuse(art, plan["reuse"]), LarsSkip(art, plan["skip"])
    comp = Schedule(art, [ru, sk])
    sk.skipped = ["c1", "c2"]
    g = comp.artifacts().training.graph
    ops = {n.op_type for n in g.node}
    assert "ReuseConv_c2" in ops and "ReuseConvGrad_c2" not in ops
    assert "ReuseConv_c3" in ops and "ReuseConvGrad_c3" in ops
    ru.on = False  # reuse switched off: plain convs, c2 still without backward
    g = comp.artifacts().training.graph
    assert not any(n.domain == "ai.accelc.reuse" for n in g.node)
    assert not any(n.op_type == "ConvGrad" and n.name.startswith("/c2/") for n in g.node)


@pytest.mark.slow
def test_end_to_end_every_controller_acts(small32, tmp_path):
    """Tiny model, synthetic data, all passes, 4 epochs: the low-resolution stage first, then a
    rescale switch; reuse active, then switched off by its strategy; at least one skip decision;
    training still learns."""
    r = run_cli(
        "compile",
        small32 / "m.onnx",
        "--passes",
        "rescale,reuse,skip",
        "--rescale-mode",
        "kernel",
        "--skip-rule",
        "lars",
        "--reuse-strategy",
        "off",
        "--reuse-plateau",
        "0.5",
        "--reuse-choose",
        "all",
        "--skip-tau-mode",
        "absolute",
        "--skip-tau",
        "0.015",
        "--skip-policy",
        "prefix",
        "-o",
        tmp_path / "art",
    )
    assert r.returncode == 0, r.stderr
    r = run_cli(
        "train",
        tmp_path / "art",
        "--data",
        "synthetic:1000",
        "--epochs",
        "4",
        "--batch-size",
        "50",
        "--lr",
        "0.003",
        "-o",
        tmp_path / "run",
        "-q",
    )
    assert r.returncode == 0, r.stderr
    hist = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    acts = {(d["controller"], d["action"]) for m in hist for d in m["decisions"]}
    assert ("rescale", "switch") in acts
    assert ("reuse", "off") in acts
    assert ("skip", "skip") in acts
    assert [m["input_hw"][0] for m in hist] == [16, 16, 32, 32]
    reused = [any(v["remain_ratio"] is not None for v in m["reuse"].values()) for m in hist]
    assert reused[0] and not reused[-1]
    assert hist[-1]["test_acc"] > 0.3  # 10 classes: chance is 0.1


@pytest.mark.slow
def test_reuse_variants_of_a_fixed_skip_set(small32, tmp_path):
    """--skip-layers c1,c2 removes c2's whole reused backward; the reuse controller can still build
    its other settings and switch reuse off (c2 keeps a reused, then exact, forward)."""
    from accelc.compiler.artifact_dir import load_artifacts
    from accelc.passes.reuse.rewrite import reuse_variant, reused_layers

    r = run_cli(
        "compile", small32 / "m.onnx", "--passes", "reuse,skip", "--skip-layers", "c1,c2", "-o", tmp_path / "art"
    )
    assert r.returncode == 0, r.stderr
    art, _ = load_artifacts(tmp_path / "art")
    ops = {n.op_type for n in art.training.graph.node}
    assert "ReuseConv_c2" in ops and "ReuseConvGrad_c2" not in ops
    cfg = reused_layers(art.training)
    finer = {k: dict(L=72, H=10, scope=v["scope"], input_grad=v["input_grad"], seed=v["seed"]) for k, v in cfg.items()}
    assert set(reused_layers(reuse_variant(art, finer).training)) == {"c2", "c3"}
    off = reuse_variant(art, {}).training.graph.node
    assert not any(n.domain == "ai.accelc.reuse" for n in off)
    assert not any(n.op_type == "ConvGrad" and n.name.startswith("/c2/") for n in off)
