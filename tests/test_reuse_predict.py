"""The reuse time model (passes/reuse/predict.py): units, the machine profile, the prediction in
the compile report, and the prefilter of the measured choice."""

import json

import numpy as np
import pytest

from accelc.compiler.pass_api import get
from accelc.passes.reuse import predict as P
from accelc.passes.reuse.algorithm import Reuse
from accelc.passes.reuse.spec import ConvGeom
from accelc.runtime.algorithm import TrainState
from accelc.runtime.engine import EngineBase

from conftest import assert_api_refused, export_test_model

GEOM = ConvGeom(C=64, Co=128, kh=3, kw=3, pads=(1, 1, 1, 1))


def flat_profile(per_unit=1e-9, call=0.0) -> dict:
    keys = ("hash_conv", "hash_rows", "compact", "sums", "gemm", "gather", "grad_sums", "dx_exact", "scatter_dx")
    per = {k: per_unit for k in keys + ("conv_fwd", "conv_dx", "conv_dw")}
    per.update(call_reuse=call, call_exact=call)
    return {"seconds_per_unit": per, "probe": {"threads": 1}, "probe_ms": {}}


def test_units_count_each_phase_of_the_native_kernels():
    reuse, exact = P.units(GEOM, 8, (32, 32), 144, 8, "exact", 0.25)
    R, G, K, co = 8 * 32 * 32, 4, 576, 128
    assert reuse["hash_conv"] == R * G * 144 * 8 and "hash_rows" not in reuse  # 144 = 16 whole channels
    assert reuse["sums"] == R * G * 144 and reuse["gather"] == R * G * co and reuse["grad_sums"] == R * G * co
    assert reuse["gemm"] == pytest.approx(2 * 0.25 * R * G * 144 * co)  # forward + weight gradient
    assert reuse["dx_exact"] == R * K * co and "scatter_dx" not in reuse
    assert exact == {"conv_fwd": R * K * co, "conv_dx": R * K * co, "conv_dw": R * K * co}
    cl, _ = P.units(GEOM, 8, (32, 32), 144, 8, "cluster", 0.25)
    assert cl["gemm"] == pytest.approx(3 * 0.25 * R * G * 144 * co) and cl["scatter_dx"] == R * G * 144
    assert "dx_exact" not in cl
    rows, _ = P.units(GEOM, 8, (32, 32), 100, 8, "exact", 0.25)
    assert "hash_rows" in rows and "hash_conv" not in rows  # L not whole channels: the C hash
    fwd, ex = P.units(GEOM, 8, (32, 32), 144, 8, "exact", 0.25, None)  # forward only
    assert set(ex) == {"conv_fwd"} and "grad_sums" not in fwd and "dx_exact" not in fwd
    frozen, ex = P.units(GEOM, 8, (32, 32), 144, 8, "exact", 0.25, (True, False, True))  # no dW
    assert frozen["grad_sums"] == R * co and "conv_dw" not in ex


def test_prediction_is_units_times_the_profile_and_the_floor_has_no_gemm():
    prof = flat_profile(1e-9, call=0.002)
    p = P.predict(GEOM, 8, (32, 32), 144, 8, "exact", 0.25, prof=prof)
    reuse, exact = P.units(GEOM, 8, (32, 32), 144, 8, "exact", 0.25)
    assert p["reuse_ms"] == pytest.approx(sum(reuse.values()) * 1e-6 + 2.0)
    assert p["exact_ms"] == pytest.approx(sum(exact.values()) * 1e-6 + 3 * 2.0)
    assert p["floor_ms"] == pytest.approx(p["reuse_ms"] - reuse["gemm"] * 1e-6)
    assert p["speedup"] == pytest.approx(p["exact_ms"] / p["reuse_ms"])
    assert P.hopeless({"floor_ms": 10.0, "exact_ms": 10.0}, 0.9, 1.0)
    assert not P.hopeless({"floor_ms": 10.0, "exact_ms": 10.0}, 0.9, 1.5)


def test_the_machine_profile_is_measured_once_per_process():
    prof = P.profile()
    per = prof["seconds_per_unit"]
    assert set(per) >= {"hash_conv", "hash_rows", "sums", "gemm", "gather", "grad_sums", "dx_exact", "conv_fwd"}
    assert all(np.isfinite(v) and v >= 0 for v in per.values()) and per["conv_fwd"] > 0 and per["gemm"] > 0
    assert P.profile() is prof


@pytest.fixture(scope="module")
def art_dir(tmp_path_factory):
    import accelc

    d = tmp_path_factory.mktemp("predict")
    export_test_model("cnn3-small", d / "m.onnx")
    accelc.compile(d / "m.onnx", d / "art", ["reuse"], validate_result=False)
    return d


def test_compile_report_predicts_every_reused_layer(art_dir):
    from accelc.compiler.compile import explain

    report = json.loads((art_dir / "art" / "report.json").read_text())
    (rec,) = [r for r in report["passes"] if r["name"] == "reuse"]
    reused = [c for c in rec["changes"] if c.get("action") == "reused"]
    assert {c["layer"] for c in reused} == {"c2", "c3"}
    for c in reused:
        p = c["predicted"]
        assert p["reuse_ms"] > 0 and p["exact_ms"] > 0 and 0 < p["floor_ms"] <= p["reuse_ms"]
        assert 0 < p["remain_ratio"] <= 1 and p["batch"] == report["options"]["batch_size"]
    lines = explain(report)
    head = next(i for i, ln in enumerate(lines) if "reuse time model" in ln)
    assert lines[head + 1].startswith("  c2: predicted ") and lines[head + 2].startswith("  c3: predicted ")
    assert "ms per step at remain ratio" in lines[head + 1] and "even with no clusters" in lines[head + 1]
    # a record edited by hand is left out, never an error
    for bad in ({"reuse_ms": "x", "exact_ms": 1, "floor_ms": 1}, {"reuse_ms": 0, "exact_ms": 1, "floor_ms": 0}, 5):
        reused[0]["predicted"] = bad
        lines = explain(report)
        assert not any(ln.startswith("  c2: predicted") for ln in lines)
        assert any(ln.startswith("  c3: predicted") for ln in lines)


class Engine(EngineBase):
    def __init__(self, art):
        self.artifacts = art


def _make(art, measurer, **over):
    e = next(p for p in art.plan if p["type"] == "reuse")
    spec = {**e, "options": {**e["options"], **over}}
    a = Reuse(art, spec, measure_original=False, measurer=measurer)
    st = TrainState(Engine(art), 3, 8)
    a.logger = st.logger
    return a, st


def test_prefilter_rules_out_layers_that_cannot_win_without_measuring(art_dir, monkeypatch):
    from accelc.compiler.artifact_dir import load_artifacts

    art, _ = load_artifacts(art_dir / "art")
    # calls that cost 50 ms each: reuse (one call) can never beat 3 exact passes... unless the
    # exact conv is as slow: a profile where hashing alone costs far more than the conv
    slow_hash = flat_profile(1e-12)
    slow_hash["seconds_per_unit"]["hash_conv"] = slow_hash["seconds_per_unit"]["hash_rows"] = 1e-6
    monkeypatch.setattr(P, "profile", lambda: slow_hash)

    def never(state, layers, settings):
        raise AssertionError("nothing should be measured")

    a, st = _make(art, never)
    assert a.prefilter == 1.5
    a.on_train_start(st)
    assert a.chosen == [] and a.describe() == "reuse:off"
    (d,) = st.logger.take()[1]
    assert "c2: exact (not measured: predicted " in d["why"] and "over 1.5 × the margin" in d["why"]
    assert d["why"].startswith("predicted at L=144, H=8, margin 0.9 (time model, nothing measured): no layer")
    assert d["layers"]["c2"]["ruled_out"] and d["layers"]["c2"]["predicted_floor_ms"] > 0
    assert d["layers"]["c2"]["rule"] == "floor"
    assert a.report()["choice"]["c3"]["why"].startswith("c3: exact (not measured: predicted")

    # a cheap reuse is measured as before; prefilter 0 measures whatever the model says
    calls = []

    def fake(state, layers, settings):
        calls.append(list(layers))
        return {k: {"reuse_ms": 1.0, "exact_ms": 3.0, "exact_engine": "onednn", "batch": 8} for k in layers}

    cheap = flat_profile(1e-12)  # reuse's phases nearly free, the exact conv not
    cheap["seconds_per_unit"].update(conv_fwd=1e-9, conv_dx=1e-9, conv_dw=1e-9)
    monkeypatch.setattr(P, "profile", lambda: cheap)
    a, st = _make(art, fake)
    a.on_train_start(st)
    assert calls == [["c2", "c3"]] and a.chosen == ["c2", "c3"]
    # cheap without clusters, slow at the expected remain ratio (costly centroid GEMMs): the second rule
    gemm = flat_profile(1e-12)
    gemm["seconds_per_unit"].update(gemm=1e-6, conv_fwd=1e-10, conv_dx=1e-10, conv_dw=1e-10)
    monkeypatch.setattr(P, "profile", lambda: gemm)
    calls.clear()
    a, st = _make(art, fake)
    a.on_train_start(st)
    assert calls == [] and a.chosen == []
    rec = a.report()["choice"]["c2"]
    assert rec["rule"] == "expected" and rec["why"].startswith("c2: exact (not measured: predicted ")
    assert "ms reused at the expected remain ratio" in rec["why"] and "under 1/(1.5 × margin))" in rec["why"]
    monkeypatch.setattr(P, "profile", lambda: slow_hash)
    calls.clear()
    a, st = _make(art, fake, prefilter=0)
    a.on_train_start(st)
    assert calls == [["c2", "c3"]]


def test_prefilter_option_is_validated_like_the_other_options(art_dir):
    from accelc.compiler.artifact_dir import load_artifacts

    p = get("reuse")
    assert p.resolve_options({})["prefilter"] == 1.5
    assert (
        p.resolve_options({"prefilter": "0"})["prefilter"] == 0
        and p.resolve_options({"prefilter": 2})["prefilter"] == 2
    )
    for bad in (0.5, -1, "x", float("inf"), 101, True):
        assert_api_refused(
            lambda bad=bad: p.resolve_options({"prefilter": bad}), "--reuse-prefilter must be 0 (off) or a number"
        )
    art, _ = load_artifacts(art_dir / "art")
    assert_api_refused(lambda: _make(art, None, prefilter=0.2), "'prefilter' must be 0 (off) or a number in [1, 100]")


def test_a_measurement_stops_early_only_when_the_rounds_decide_beyond_noise():
    from accelc.passes.reuse import choice as ch

    slow = {"reuse": [0.10, 0.11], "onednn": [0.05, 0.07], "ort": [0.06, 0.06]}
    assert ch._clear(slow, 0.9)  # 0.10 >= 1.25 × 0.9 × 0.06
    close = {"reuse": [0.066, 0.11], "onednn": [0.05, 0.07], "ort": [0.06, 0.06]}
    assert not ch._clear(close, 0.9)  # 0.066 < 1.25 × 0.9 × 0.06: more rounds
    assert ch._clear(close, 0.8)  # a lower margin: it loses already
    fast = {"reuse": [0.03, 0.035], "onednn": [0.05, 0.07], "ort": [0.06, 0.06]}
    assert ch._clear(fast, 0.9)  # 1.25 × 0.035 <= 0.9 × 0.05
    assert not ch._clear({"reuse": [0.03, 0.04], "onednn": [0.05, 0.07], "ort": [0.06, 0.06]}, 0.9)


def test_the_off_switch_is_decided_on_the_validation_loss_when_there_is_one(art_dir):
    from accelc.compiler.artifact_dir import load_artifacts

    art, _ = load_artifacts(art_dir / "art")

    class Run:
        artifacts = art
        reducer = None

    def epoch(a, st, n, **m):
        a.on_epoch_end(st, n, dict({"steps": 1}, **m))

    a, st = _make(art, None, choose="all", strategy="off", plateau=0.05)
    st.engine = Run()
    a.logger = st.logger
    # the training loss keeps falling, the validation loss does not: off after epoch 2
    epoch(a, st, 1, train_loss=2.0, val_loss=1.0)
    epoch(a, st, 2, train_loss=1.0, val_loss=0.99)
    (d,) = [x for x in a.log if x["action"] == "off"]
    assert d["epoch"] == 2 and d["why"].startswith("validation loss plateaued (fell 1.0% < 0.05)")
    b, st = _make(art, None, choose="all", strategy="off", plateau=0.05)
    st.engine = Run()
    epoch(b, st, 1, train_loss=2.0)
    epoch(b, st, 2, train_loss=1.0)
    assert b.on and not [x for x in b.log if x["action"] == "off"]  # without a split: the training loss fell 50%
