"""reuse: the per-layer choice (issue 17) — reuse only the layers where it measurably beats the
exact conv. Decision logic with injected timings (no speed assertions: the machine is noisy),
option validation, state round trips, the data-parallel hand-over, and one small real run."""

import json

import numpy as np
import pytest

from accelc.compiler.pass_api import get
from accelc.passes.reuse import choice as ch
from accelc.passes.reuse.algorithm import Reuse
from accelc.passes.reuse.rewrite import reused_layers
from accelc.runtime.algorithm import TrainState
from accelc.runtime.engine import EngineBase

from conftest import assert_api_refused, export_test_model, run_cli


@pytest.fixture(scope="module")
def reuse_art(tmp_path_factory):
    """cnn3-small compiled with reuse (c2, c3 reused), once per module (read-only)."""
    import accelc
    from accelc.compiler.artifact_dir import load_artifacts

    d = tmp_path_factory.mktemp("choice")
    export_test_model("cnn3-small", d / "m.onnx")
    # prefilter 0: every layer is measured (the time model's prefilter: tests/test_reuse_predict.py)
    accelc.compile(d / "m.onnx", d / "art", ["reuse"], pass_options={"reuse": {"prefilter": 0}}, validate_result=False)
    art, _ = load_artifacts(d / "art")
    return d, art


def spec_of(art, **over):
    """The reuse plan entry with some options changed (as a hand-edited plan.json would hold them)."""
    e = next(p for p in art.plan if p["type"] == "reuse")
    return {**e, "options": {**e["options"], **over}}


def timing(reuse_ms, exact_ms, remain=0.3, error=0.2, engine="onednn"):
    return {
        "reuse_ms": reuse_ms,
        "exact_ms": exact_ms,
        "exact_engine": engine,
        "remain_ratio": remain,
        "error": error,
        "batch": 8,
        "impl": "native",
    }


class Fake:
    """An injected measurer: fixed timings per layer; records every call."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, state, layers, settings):
        self.calls.append((list(layers), {k: (v["L"], v["H"]) for k, v in settings.items()}))
        t = self.table(len(self.calls)) if callable(self.table) else self.table
        return {k: t[k] for k in layers if k in t}


def never(state, layers, settings):
    raise AssertionError("the measurement must not run")


class Engine(EngineBase):
    def __init__(self, art, group=None):
        self.artifacts = art
        self.collective = group


def make(art, measurer, engine=None, **over):
    a = Reuse(art, spec_of(art, **over), measure_original=False, measurer=measurer)
    st = TrainState(engine or Engine(art), 3, 8)
    a.logger = st.logger
    return a, st


# ----------------------------------------------------------------------------- the decision
def test_a_winning_layer_keeps_reuse_a_losing_one_runs_exact(reuse_art):
    _, art = reuse_art
    fake = Fake({"c2": timing(2.0, 5.0), "c3": timing(21.4, 5.2, remain=0.31, error=0.22)})
    a, st = make(art, fake)
    assert a.choose == "measured" and a.margin == 0.9
    assert set(a.settings()) == {"c2", "c3"}  # before the choice: every compiled layer
    a.on_train_start(st)
    assert fake.calls == [(["c2", "c3"], {"c2": (144, 8), "c3": (144, 8)})]
    assert a.chosen == ["c2"] and set(a.settings()) == {"c2"}
    assert a.decision() == (True, (144, 8), ("c2",)) and a.describe() == "reuse:L144H8[1/2]"
    variant = a.transform(art)
    assert set(reused_layers(variant.training)) == {"c2"}  # c3 is the exact Conv/ConvGrad again
    assert {n.op_type for n in variant.training.graph.node} >= {"ReuseConv_c2", "Conv", "ConvGrad"}
    (d,) = st.logger.take()[1]
    assert d["action"] == "choose" and d["chosen"] == ["c2"]
    assert "c3: exact (reuse 21.4 ms vs exact 5.2 ms on oneDNN at remain ratio 0.31, error 0.22)" in d["why"]
    assert "c2: reuse (reuse 2.0 ms vs exact 5.0 ms" in d["why"] and "reuse on c2; exact c3" in d["why"]
    assert d["layers"]["c3"]["reuse_ms"] == 21.4 and d["layers"]["c3"]["chosen"] is False
    rep = a.report()
    assert rep["chosen"] == ["c2"] and rep["choice"]["c3"]["chosen"] is False
    assert rep["choice"]["c3"]["why"].startswith("c3: exact (reuse 21.4 ms")


def test_margin_is_strict(reuse_art):
    _, art = reuse_art
    chosen, rec = ch.judge({"a": timing(4.5, 5.0), "b": timing(4.49, 5.0), "c": {"failed": "boom"}}, 0.9)
    assert chosen == ["b"] and not rec["a"]["chosen"] and not rec["c"]["chosen"]
    assert rec["c"]["why"] == "c: exact (not measured: boom)"
    a, st = make(art, Fake({"c2": timing(4.0, 5.0), "c3": timing(5.5, 5.0)}), margin=1.2)
    a.on_train_start(st)
    assert a.chosen == ["c2", "c3"] and a.describe() == "reuse:L144H8"


def test_no_winner_switches_reuse_off_for_the_run_and_says_why(reuse_art):
    _, art = reuse_art
    a, st = make(art, Fake({"c2": timing(16.0, 3.0), "c3": timing(35.0, 4.0, engine="ort")}))
    a.on_train_start(st)
    assert a.chosen == [] and a.settings() == {} and a.decision() == (False,) and a.describe() == "reuse:off"
    assert not reused_layers(a.transform(art).training)  # the plain graph
    (d,) = st.logger.take()[1]
    assert "no layer is faster reused; reuse off for this run" in d["why"]
    assert "c2: exact (reuse 16.0 ms vs exact 3.0 ms on oneDNN" in d["why"]
    assert "c3: exact (reuse 35.0 ms vs exact 4.0 ms on ORT" in d["why"]


def test_a_failed_measurement_leaves_layers_exact_and_never_raises(reuse_art):
    _, art = reuse_art

    def broken(state, layers, settings):
        raise RuntimeError("no activations")

    a, st = make(art, broken)
    a.on_train_start(st)
    assert a.chosen == [] and "not measured: RuntimeError: no activations" in a.log[-1]["why"]

    # not applicable (e.g. no data, a GPU run): nothing chosen, every compiled layer stays
    def no_data(state, layers, settings):
        raise ch.NotMeasurable("no training batch")

    b, st = make(art, no_data)
    b.on_train_start(st)
    assert (
        b.chosen is None
        and set(b.settings()) == {"c2", "c3"}
        and "not measured (no training batch)" in b.log[-1]["why"]
    )


def test_choose_all_keeps_every_layer_and_measures_nothing(reuse_art):
    _, art = reuse_art
    a, st = make(art, never, choose="all")
    a.on_train_start(st)
    assert a.chosen is None and set(a.settings()) == {"c2", "c3"} and a.decision() == (True, (144, 8), None)
    assert a.transform(art) is art and a.layer_choice("c2")["chosen"] is True


def test_settings_of_another_artifact_set_leave_out_the_exact_layers(reuse_art):
    """A rescale stage's artifacts go through reused_layers of that set; the choice still holds."""
    _, art = reuse_art
    a, st = make(art, Fake({"c2": timing(9.0, 3.0), "c3": timing(1.0, 3.0)}))
    a.on_train_start(st)
    other = art.copy()
    assert set(a.settings(other)) == {"c3"}


def test_lh_refine_measures_the_chosen_layers_again_at_the_new_setting(reuse_art):
    _, art = reuse_art
    table = {
        1: {"c2": timing(1.0, 5.0), "c3": timing(2.0, 5.0)},
        2: {"c2": timing(1.0, 5.0), "c3": timing(9.0, 5.0)},  # c3 loses at the finer setting
    }
    fake = Fake(lambda n: table[n])
    a, st = make(art, fake, strategy="lh", schedule=[[288, 6], [144, 8]], plateau=0.5)
    a.on_train_start(st)
    assert a.chosen == ["c2", "c3"] and fake.calls[0][1] == {"c2": (288, 6), "c3": (288, 6)}
    for epoch, loss in ((1, 1.0), (2, 0.99)):  # the second epoch plateaus: refine to (144, 8)
        a.on_epoch_end(st, epoch, {"train_loss": loss, "steps": 2})
    assert a.index == 1 and fake.calls[1] == (["c2", "c3"], {"c2": (144, 8), "c3": (144, 8)})
    assert a.chosen == ["c2"] and a.decision() == (True, (144, 8), ("c2",))
    acts = [d["action"] for d in a.log]
    assert acts == ["choose", "refine", "choose"]
    assert len(a.report()["measurements"]) == 2
    m = st.logger.take()[0]["reuse"]
    assert m["c3"]["chosen"] is True  # epoch 2 ran with c3 reused; the log line says why
    e = a.epochs[-1]["layers"]
    assert "why" in e["c2"] and e["c2"]["chosen"]


# ----------------------------------------------------------------------------- state
def test_state_round_trip_keeps_the_choice_and_does_not_measure_again(reuse_art):
    _, art = reuse_art
    a, st = make(art, Fake({"c2": timing(9.0, 3.0), "c3": timing(1.0, 3.0)}))
    a.on_train_start(st)
    sd = json.loads(json.dumps(a.state_dict()))  # what a checkpoint holds
    b, st2 = make(art, never)
    b.load_state_dict(sd)
    b.on_train_start(st2)  # a resume: the checkpoint's choice, no measurement
    assert b.chosen == ["c3"] and b.decision() == a.decision() and b.describe() == a.describe()
    assert b.report()["choice"] == a.report()["choice"]
    # a checkpoint from before the choice existed: every layer, as it trained
    old = {k: v for k, v in sd.items() if k not in ("chosen", "choice", "measurements", "choice_done")}
    c, st3 = make(art, never)
    c.load_state_dict(old)
    c.on_train_start(st3)
    assert c.chosen is None and set(c.settings()) == {"c2", "c3"}
    with pytest.raises(TypeError):
        make(art, never)[0].load_state_dict(dict(sd, chosen="c2"))


class Group:
    """A two-rank group stand-in: rank 0 sends its value, the other rank gets ``sent``."""

    world = 2

    def __init__(self, main, sent=None):
        self.is_main, self.sent, self.calls = main, sent, 0

    def broadcast_json(self, value, what=""):
        self.calls += 1
        if self.is_main:
            self.sent = json.loads(json.dumps(value, sort_keys=True))
            return value
        return self.sent


def test_data_parallel_rank0_measures_and_every_rank_takes_its_choice(reuse_art):
    _, art = reuse_art
    g0 = Group(True)
    a, st = make(art, Fake({"c2": timing(1.0, 3.0), "c3": timing(9.0, 3.0)}), engine=Engine(art, g0))
    a.on_train_start(st)
    g1 = Group(False, g0.sent)
    b, st1 = make(art, never, engine=Engine(art, g1))  # rank 1 never measures
    b.on_train_start(st1)
    assert g0.calls == g1.calls == 1
    assert b.chosen == a.chosen == ["c2"] and b.decision() == a.decision()
    assert [d["action"] for d in b.log] == ["choose"] and st1.logger.take()[1][0]["why"] == a.log[0]["why"]
    # a resumed rank 0 (choice loaded, nothing measured) still broadcasts once, so a rank that
    # could not read the checkpoint takes rank 0's choice instead of waiting forever
    g2 = Group(True)
    c, st2 = make(art, never, engine=Engine(art, g2))
    c.load_state_dict(a.state_dict())
    c.on_train_start(st2)
    g3 = Group(False, g2.sent)
    e, st3 = make(art, never, engine=Engine(art, g3))
    e.on_train_start(st3)
    assert g2.calls == g3.calls == 1 and c.chosen == e.chosen == ["c2"] and not st3.logger.take()[1]


# ----------------------------------------------------------------------------- options
def test_bad_choose_and_margin_are_one_line_errors(reuse_art):
    p = get("reuse")
    o = p.resolve_options({"choose": "all", "margin": "0.5"})
    assert o["choose"] == "all" and o["margin"] == 0.5
    assert p.resolve_options({})["choose"] == "measured" and p.resolve_options({})["margin"] == 0.9
    assert_api_refused(lambda: p.resolve_options({"choose": "some"}), "--reuse-choose")
    for bad in (0, -1, "x", float("nan"), 11, True):
        assert_api_refused(
            lambda bad=bad: p.resolve_options({"margin": bad}), "--reuse-margin must be a number in (0, 10]"
        )
    _, art = reuse_art
    assert_api_refused(lambda: Reuse(art, spec_of(art, choose="some")), "'choose': choose from measured, all")
    assert_api_refused(lambda: Reuse(art, spec_of(art, margin=0)), "'margin' must be a number in (0, 10]")


@pytest.mark.slow
def test_cli_flags_reach_the_plan(reuse_art, tmp_path):
    d, _ = reuse_art
    r = run_cli("compile", d / "m.onnx", "--passes", "reuse", "--reuse-choose", "all", "--reuse-margin", "0.8",
                "-o", tmp_path / "a", "--no-validate")  # fmt: skip
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())["controllers"][-1]
    assert plan["options"]["choose"] == "all" and plan["options"]["margin"] == 0.8
    r = run_cli("compile", d / "m.onnx", "--passes", "reuse", "--reuse-margin", "0", "-o", tmp_path / "b")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--reuse-margin must be" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- the real measurement
def test_activations_are_the_training_forward_of_the_batch(reuse_art):
    """The conv input the measurement times is the one the training step computes (c2's input
    comes after the exact c1, so the reused graph and the measurement agree on it)."""
    from accelc.passes.reuse.rewrite import strip
    from accelc.runtime.config import ExecConfig
    from accelc.runtime.session import TrainingSession

    d, art = reuse_art
    s = TrainingSession(d / "art", ExecConfig(threads=1))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, *art.info.input_shape[-3:])).astype(np.float32)
    y = rng.integers(0, 10, 4)
    site = ch.conv_sites(strip(art.training), {"c2"})["c2"]
    feeds = dict(s.param_arrays(), input=x, labels=y.astype(np.int64))
    acts, source = ch.forward_activations([("training forward", strip(art.training))], feeds, [site["x"]], 1)
    env = {}
    s.compute_gradients(x, y, env_out=env)
    assert source == "training forward"
    np.testing.assert_allclose(acts[site["x"]], np.asarray(env[site["x"]]), rtol=1e-5, atol=1e-6)


def test_end_to_end_the_choice_is_measured_on_real_activations(reuse_art, tmp_path):
    """1 epoch of cnn3-small on synthetic data: the start measures c2 and c3 (numbers per layer),
    the variant that trains is the one the choice names, and a resume keeps the choice."""
    import accelc

    d, _ = reuse_art
    kw = dict(data="synthetic:96", batch_size=16, run_dir=tmp_path / "run", progress=False, threads=1, test_limit=32)
    s = accelc.train(d / "art", epochs=1, **kw)
    rep = s["controllers"]["reuse"]
    assert rep["choose"] == "measured" and set(rep["choice"]) == {"c2", "c3"}
    for layer, r in rep["choice"].items():
        assert r["activations"] == "training forward" and r["batch"] == 16 and r["repeats"] >= 1
        assert r["reuse_ms"] > 0 and r["exact_ms"] > 0 and r["exact_engine"] in ("onednn", "ort")
        assert r["exact_ms"] == min(r["onednn_ms"], r["ort_ms"])
        assert 0 < r["remain_ratio"] <= 1 and np.isfinite(r["error"])
        assert r["why"].startswith(f"{layer}: {'reuse' if r['chosen'] else 'exact'} (reuse ")
    assert rep["chosen"] == [k for k, r in rep["choice"].items() if r["chosen"]]
    hist = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (choose,) = [x for x in hist[0]["decisions"] if x["action"] == "choose"]
    assert set(choose["layers"]) == {"c2", "c3"} and "margin 0.9" in choose["why"]
    for layer, m in hist[0]["reuse"].items():  # what ran: reused exactly where chosen
        assert m["chosen"] == (layer in rep["chosen"]) and (m["remain_ratio"] is not None) == m["chosen"]
    assert hist[0]["variant"] == ("reuse:off" if not rep["chosen"] else hist[0]["variant"])
    s2 = accelc.train(d / "art", epochs=2, resume=True, allow_change=("epochs",), **kw)
    hist = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not [x for x in hist[1]["decisions"] if x["action"] == "choose"]  # no new measurement
    assert s2["controllers"]["reuse"]["chosen"] == rep["chosen"] and hist[1]["variant"] == hist[0]["variant"]


def test_a_partly_chosen_variant_trains_with_the_exact_layers_exact(reuse_art, tmp_path):
    """Injected timings choose c2 only: the run trains c2 reused and c3 as the exact conv."""
    import accelc

    d, art = reuse_art
    fake = Fake({"c2": timing(1.0, 3.0), "c3": timing(9.0, 3.0)})
    alg = Reuse(art, spec_of(art), measure_original=False, measurer=fake)
    kw = dict(data="synthetic:64", batch_size=16, progress=False, threads=1, test_limit=32)
    s = accelc.train(d / "art", epochs=1, run_dir=tmp_path / "run", algorithms=[alg], **kw)
    hist = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert hist[0]["variant"] == "reuse:L144H8[1/2]" and s["controllers"]["reuse"]["chosen"] == ["c2"]
    m = hist[0]["reuse"]
    assert m["c2"]["chosen"] and 0 < m["c2"]["remain_ratio"] <= 1
    assert not m["c3"]["chosen"] and m["c3"]["remain_ratio"] is None and m["c3"]["why"].startswith("c3: exact")
