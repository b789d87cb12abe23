"""The tool explains itself (issue 19): compile and inspect say what each pass did and what it is
predicted to save (reuse at its expected remain ratio, with the bound), the passes column names
every pass that touched a layer, and train ends with what every controller decided."""

import json

import numpy as np
import pytest

import accelc
from accelc.cli import layer_table_text, training_summary
from accelc.compiler.artifact_dir import load_artifacts
from accelc.compiler.compile import explain
from accelc.compiler.cost import graph_costs
from accelc.compiler.graph import training_graph
from accelc.passes.reuse.cost import bound_remain, expected_remain
from accelc.passes.skip.rewrite import skip_variant
from accelc.zoo import export_zoo


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("explain")
    export_zoo("cnn3-small", d / "m.onnx", "1,32,32")
    return d


def _cfg(H, hw, scope="image"):
    return {
        "H": H,
        "scope": scope,
        "in_hw": list(hw),
        "geom": {"C": 8, "Co": 8, "kh": 3, "kw": 3, "stride": [1, 1], "pads": [1, 1, 1, 1], "dilation": [1, 1]},
    }


@pytest.mark.parametrize("H, hw", [(8, (28, 28)), (8, (7, 7)), (4, (14, 14)), (10, (16, 16))])
def test_expected_remain_ratio_is_the_mean_of_uniform_codes(H, hw):
    """The expected remain ratio equals the simulated mean clusters/rows of uniform H-bit codes."""
    cfg = _cfg(H, hw)
    rows = hw[0] * hw[1]
    rng = np.random.default_rng(0)
    sims = [len(np.unique(rng.integers(0, 2**H, rows))) / rows for _ in range(400)]
    assert abs(expected_remain(cfg, 64) - np.mean(sims)) < 4 * np.std(sims) / np.sqrt(len(sims)) + 1e-6
    assert expected_remain(cfg, 64) <= bound_remain(cfg, 64) == min(1.0, 2**H / rows)
    assert expected_remain(_cfg(H, hw, "batch"), 64) <= expected_remain(cfg, 64)  # more rows share codes


def test_reuse_is_counted_at_its_expected_remain_ratio(model, tmp_path):
    plain = accelc.compile(model / "m.onnx", tmp_path / "plain", validate_result=False)
    rep = accelc.compile(model / "m.onnx", tmp_path / "reuse", "reuse", validate_result=False)
    exact = {r["name"]: r for r in plain["layers"]}
    art, _ = load_artifacts(tmp_path / "reuse")
    for row in rep["layers"]:
        if "reuse" not in row["passes"]:
            continue
        assert row["passes"] == ["opt", "reuse"]  # opt marked the conv before reuse replaced it
        cfg = next(c for c in rep["passes"][1]["changes"] if c["layer"] == row["name"])
        n, co, ho, wo = row["output_shape"]
        K, G, full = (
            int(np.prod(row["weight_shape"][1:])),
            cfg["chunks"],
            n * co * ho * wo * int(np.prod(row["weight_shape"][1:])),
        )
        rows = n * ho * wo
        c = {"H": cfg["H"], "scope": "image", "in_hw": row["input_shape"][2:], "geom": {
            "C": row["weight_shape"][1], "Co": co, "kh": 3, "kw": 3, "stride": [1, 1], "pads": [1, 1, 1, 1],
            "dilation": [1, 1]}}  # fmt: skip
        for key, r in (("flops_fwd", expected_remain(c, n)), ("flops_fwd_bound", bound_remain(c, n))):
            # hashing, centroid sums, centroid GEMM at the remain ratio, sum over chunks, bias
            want = 2 * (rows * K * cfg["H"] + r * full) + rows * K + rows * G * co + rows * co
            assert row[key] == pytest.approx(want, rel=1e-9)
        # dW reused, dX exact, per-cluster dY sums, dB; and the layer's gradient accumulators
        want_bwd = 2 * (expected_remain(c, n) * full + full) + rows * G * co + rows * co + row["param_count"]
        assert row["flops_bwd"] == pytest.approx(want_bwd, rel=1e-9)
        assert row["flops_fwd"] < exact[row["name"]]["flops_fwd"] + 2 * rows * K * cfg["H"] + rows * (K + G * co)
    after = rep["costs"]["after"]["total"]
    assert after["flops"] <= after["flops_bound"]
    assert rep["passes"][1]["cost_after"]["flops"] == after["flops"]
    assert any("remain ratio" in a for a in rep["costs"]["after"]["assumptions"])
    del art


def test_compile_and_inspect_explain_each_pass(model, tmp_path):
    rep = accelc.compile(
        model / "m.onnx",
        tmp_path / "art",
        "rescale,reuse,skip",
        {"rescale": {"mode": "kernel"}, "skip": {"rule": "lars"}},
    )  # the seed's modes
    lines = explain(rep)
    text = "\n".join(lines)
    by = {ln.split(":")[0]: ln for ln in lines}
    assert (
        "ReluGrad -> Greater/Cast/Mul: 3 nodes" in by["pass opt"] and "training-step FLOPs unchanged" in by["pass opt"]
    )
    assert "reused: c2, c3 (L=144, H=8, scope=image, input_grad=exact)" in by["pass reuse"]
    assert "expected, at most" in by["pass reuse"]
    assert "low-resolution stage at 16x16" in by["pass rescale"]
    assert "decides at run time" in by["pass skip"] and "would save per step: c1 " in by["pass skip"]
    assert "stage stage-low:" in text and "modified=" not in text and "; ;" not in text and "…" not in text
    # the savings per layer are what pruning that prefix saves in the cost model
    art, _ = load_artifacts(tmp_path / "art")
    saved = {c["layer"]: c.get("saves_flops_per_step") for c in rep["passes"][-1]["changes"]}
    assert saved["fc"] is None  # the last layer is always trained (keep_last 1)
    base = graph_costs(training_graph(art))["total"]["flops"]
    pruned = graph_costs(training_graph(skip_variant(art, ["c1", "c2"])[0]))["total"]["flops"]
    assert saved["c2"] == pytest.approx(base - pruned, rel=1e-12) and saved["c2"] > saved["c1"] > 0
    # inspect says the same from the directory, and the passes column names every pass
    view = accelc.inspect(tmp_path / "art")
    assert explain(view)[: len(rep["passes"])] == lines[: len(rep["passes"])]
    table = layer_table_text(view)
    assert "opt,reuse,skip" in table and "~" in table and "plain ORT training step" in table


SEED_MODES = {"rescale": {"mode": "kernel"}, "skip": {"rule": "lars"}}  # the papers' own (not the defaults)


def test_training_summary_says_what_every_controller_decided(model, tmp_path):
    accelc.compile(
        model / "m.onnx",
        tmp_path / "art",
        "rescale,reuse,skip",
        {"reuse": {"choose": "all"}, **SEED_MODES},
        validate_result=False,
    )
    s = accelc.train(
        tmp_path / "art", "synthetic:256", epochs=3, batch_size=64, run_dir=tmp_path / "run", progress=False, threads=1
    )
    plan = json.loads((tmp_path / "art" / "plan.json").read_text())["controllers"]
    report = json.loads((tmp_path / "art" / "report.json").read_text())
    lines = training_summary(s, plan, report)
    by = {ln.split(":")[0].split(" (")[0]: ln for ln in lines}
    assert by["rescale"].startswith("rescale: epochs 1-2 at low resolution (16x16), full resolution from epoch 3")
    assert "remain ratio per layer (measured) c2 " in by["reuse"]
    assert by["skip"].startswith("skip: skipped nothing in 3 epoch(s): ") and "first-epoch λ" in by["skip"]
    assert "for the plain ORT step" in by["step cost"]
    # a controller that skipped says which layers, when, and the λ behind it
    s2 = dict(s, decisions=[{"epoch": 2, "controller": "skip", "action": "skip", "why": "c1 done",
                             "lam": {"c1": 0.08}, "first": {"c1": 0.03}, "skipped": ["c1"]}])  # fmt: skip
    line = [ln for ln in training_summary(s2, plan, report) if ln.startswith("skip")][0]
    assert line == "skip: after epoch 2: skip c1 (c1 λ 0.08 > 2.0 x 0.03)"
