"""skip's freezeout rule (FreezeOut's budgeted progressive freezing): the schedule's arithmetic, the
optimizer's per-parameter learning-rate scales (bit-equal to an optimizer at the scaled rate), and
a run that freezes input side first at the scheduled steps, each layer's weights still from the
step its rate reached zero, and resumes to the same result."""

import json

import numpy as np
import pytest
import torch

import accelc
from accelc.compiler.artifact_dir import load_artifacts
from accelc.passes.skip.freezeout import freeze_times, lr_multiplier
from accelc.runtime.optim import OrtAdamW, OrtSGD

from conftest import export_test_model, stopped_after


def test_freeze_times_linear_cubic_and_kept_layers():
    assert freeze_times(5, 0.5, "linear", 1) == [0.5, 0.625, 0.75, 0.875, 1.0]
    cubic = freeze_times(5, 0.5, "cubic", 1)
    assert cubic[0] == 0.5 and cubic[-1] == 1.0
    assert all(c <= lin for c, lin in zip(cubic, freeze_times(5, 0.5, "linear", 1)))  # cubic freezes earlier
    assert freeze_times(5, 0.5, "linear", 2)[-2:] == [1.0, 1.0]  # keep_last: never frozen
    assert freeze_times(5, 0.5, "linear", 0)[-1] == 1.0  # the last layer always trains
    assert freeze_times(1, 0.5, "linear", 1) == [1.0]
    t = freeze_times(9, 0.3, "cubic", 1)
    assert t == sorted(t)  # monotone: the frozen set is always an input-side prefix


def test_lr_multiplier_is_a_cosine_to_zero_at_the_freeze_time():
    assert lr_multiplier(0.0, 0.5, False) == 1.0
    assert lr_multiplier(0.25, 0.5, False) == pytest.approx(0.5)
    assert lr_multiplier(0.5, 0.5, False) == 0.0 and lr_multiplier(0.9, 0.5, False) == 0.0
    assert lr_multiplier(0.499999, 0.5, False) < 1e-9
    assert lr_multiplier(0.0, 0.5, True) == 2.0  # FreezeOut's 1/t_i
    assert lr_multiplier(0.7, 1.0, True) == 1.0  # a layer that never freezes
    # the cosine from a later start (the schedule run within the last quarter): 1 before it
    assert lr_multiplier(0.3, 0.875, False, 0.75) == 1.0 and lr_multiplier(0.75, 0.875, False, 0.75) == 1.0
    assert lr_multiplier(0.8125, 0.875, False, 0.75) == pytest.approx(0.5)
    assert lr_multiplier(0.875, 0.875, False, 0.75) == 0.0
    assert lr_multiplier(0.75, 0.875, True, 0.75) == pytest.approx(2.0)  # 1/t_i of the part it trains in


def _params(seed, shapes=((3, 4), (5,), (2, 2, 3))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


@pytest.mark.parametrize("adam_mode", [0, 1])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adamw_scales_equal_an_optimizer_at_the_scaled_rate(adam_mode, wd):
    """Each parameter's update with scale k is bit-equal to the update of an optimizer whose rate
    is k × lr (scale 1 is the unscaled kernel; scale 0 leaves the parameter as it was)."""
    lr, scales = 1e-2, [1.0, 0.37, 0.0]
    ps = _params(0)
    opt = OrtAdamW(ps, lr=lr, adam_mode=adam_mode, weight_decay=wd)
    opt.lr_scales = {p: k for p, k in zip(ps, scales)}
    refs = []
    for k, p in zip(scales, _params(0)):
        refs.append((p, OrtAdamW([p], lr=lr * k, adam_mode=adam_mode, weight_decay=wd)))
    start = [p.clone() for p in ps]
    for step in range(3):
        grads = _params(10 + step)
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        for (p, o), g in zip(refs, grads):
            p.grad = g.clone()
            o.step()
    for p, (ref, _), k, p0 in zip(ps, refs, scales, start):
        assert torch.equal(p, ref), k
        if k == 0:
            assert torch.equal(p, p0)


def test_sgd_scales():
    ps = _params(0)
    opt = OrtSGD(ps, lr=0.1)
    opt.lr_scales = {ps[1]: 0.5, ps[2]: 0.0}
    start = [p.clone() for p in ps]
    for p, g in zip(ps, _params(1)):
        p.grad = g
    opt.step()
    assert torch.equal(ps[0], start[0] - 0.1 * ps[0].grad)
    assert torch.equal(ps[1], start[1] - 0.05 * ps[1].grad)
    assert torch.equal(ps[2], start[2])


@pytest.fixture(scope="module")
def freezeout_art(tmp_path_factory):
    d = tmp_path_factory.mktemp("fo")
    export_test_model("vgg", d / "m.onnx")
    accelc.compile(d / "m.onnx", d / "art", passes=["skip"], pass_options={"skip": {"rule": "freezeout", "t0": 0.5}})
    return d / "art"


def _train(art, run_dir, epochs=2, **kw):
    """The runs here are compared bit for bit, a resumed one with an uninterrupted one: the layout
    is fixed, since ``auto`` times both at each run's first step and, on a loaded machine, two
    runs can choose differently (seen: NCHW 113.6 against NHWC 143.6 ms in one, NHWC 88.7 against
    NCHW 151.7 in the other), and the two layouts round differently. (A resumed run reuses its
    checkpoint's choices: tests/test_layout.py.)"""
    return accelc.train(
        art,
        "synthetic",
        epochs=epochs,
        batch_size=32,
        train_limit=256,
        test_limit=64,
        lr_schedule="linear",
        run_dir=run_dir,
        progress=False,
        **{"layout": "nhwc", **kw},
    )


def test_compile_records_the_schedule_and_no_instrumentation(freezeout_art):
    art, _ = load_artifacts(freezeout_art)
    assert not [o.name for o in art.training.graph.output if o.name.startswith("accelc.lars.")]
    entry = art.plan[0]
    assert entry["type"] == "skip" and entry["options"]["rule"] == "freezeout"
    rep = json.loads((freezeout_art / "report.json").read_text())
    changes = [c for p in rep["passes"] if p.get("name") == "skip" for c in p.get("changes", [])]
    times = [c["freezes_at"] for c in changes if "freezes_at" in c]
    assert times[0] == 0.5 and times[-1] == 1.0 and times == sorted(times)


def test_run_freezes_input_side_first_at_the_scheduled_steps(freezeout_art, tmp_path):
    s = _train(freezeout_art, tmp_path / "run")
    rep = s["controllers"]["skip"]
    steps = 2 * (256 // 32)  # the budget's steps
    layers = list(rep["freeze_at"])
    frozen = rep["frozen_at"]
    assert list(frozen) == [n for n in layers if rep["freeze_at"][n] < 1]  # input side first, all of them
    for name, rec in frozen.items():  # at the first step at or past its time
        t = rep["freeze_at"][name]
        assert rec["step"] == int(np.ceil(t * steps - 1e-9)), (name, rec, t)
    decisions = [d for d in s["decisions"] if d["action"] == "freeze"]
    assert decisions and all("step" in d for d in decisions)
    # the epochs' cost: the second half of the run skips a growing prefix
    e1, e2 = rep["epochs"]
    assert e1["flops_per_step"] == e1["base_flops_per_step"] and e2["flops_per_step"] < e1["flops_per_step"]
    assert sum(e2["steps_by_skip_set"].values()) == e2["steps"]
    assert s["history"][1]["flops_per_step"] == pytest.approx(e2["flops_per_step"])
    assert 0 < rep["op_reduction"] < 0.5


def test_resume_freezes_at_the_same_steps(freezeout_art, tmp_path, monkeypatch):
    """A run stopped after its first epoch and resumed (the same 2-epoch budget) freezes at the
    same steps and ends where the uninterrupted run ends."""
    whole = _train(freezeout_art, tmp_path / "whole")
    cut = stopped_after(monkeypatch, 1, lambda: _train(freezeout_art, tmp_path / "split"))
    assert len(cut["history"]) == 1
    resumed = _train(freezeout_art, tmp_path / "split", resume=True)
    assert [m["test_loss"] for m in resumed["history"]] == [m["test_loss"] for m in whole["history"]]
    assert resumed["controllers"]["skip"]["frozen_at"] == whole["controllers"]["skip"]["frozen_at"]


def test_first_layer_does_not_move_after_its_freeze(freezeout_art, tmp_path):
    from accelc.passes.skip.algorithm import LarsSkip
    from accelc.runtime.data import synthetic
    from accelc.runtime.session import TrainingSession
    from accelc.runtime.spec import TrainSpec
    from accelc.runtime.train import Trainer

    sess = TrainingSession(freezeout_art)
    ctrl = LarsSkip(sess.artifacts, sess.artifacts.plan[0])
    first = ctrl.layers[0]
    params = ctrl.params_of[first]
    seen = {}

    class Watch(LarsSkip):  # records the first layer's parameters before every step
        def before_step(self, state, epoch, step):
            super().before_step(state, epoch, step)
            seen[state.step] = {p: sess.param_arrays()[p].copy() for p in params}

    w = Watch(sess.artifacts, sess.artifacts.plan[0])
    ds = synthetic((1, 28, 28), 10, 256, 64)
    Trainer(
        TrainSpec(run_dir=None, epochs=2, batch_size=32, seed=0, progress=False, lr_schedule="linear"),
        sess,
        ds,
        algorithms=[w],
    ).run()
    t = w.frozen_at[first]["step"]
    end = sess.param_arrays()
    for p in params:
        assert not np.array_equal(seen[0][p], seen[t - 1][p]), p  # it trained before
        assert np.array_equal(seen[t][p], end[p]), p  # and not after its rate reached zero
        # the last steps before the freeze move it little: the cosine's tail
        assert np.abs(seen[t][p] - seen[t - 1][p]).max() <= np.abs(seen[1][p] - seen[0][p]).max()
    assert ctrl.freeze_at == w.freeze_at


# ----------------------------------------------------------------------------- the loop's step events
def _fake_run(algorithms, epochs=2):
    """A Trainer over a fake engine that records its swaps and learning-rate scales per step."""
    from types import SimpleNamespace

    from accelc.runtime.data import synthetic
    from accelc.runtime.engine import EngineBase, StepResult
    from accelc.runtime.spec import TrainSpec
    from accelc.runtime.train import Trainer

    root = SimpleNamespace(info=SimpleNamespace(input_shape=(1, 8, 8)), name="root")

    class Engine(EngineBase):
        artifacts = root
        optimizer = SimpleNamespace(lr_scales={}, param_groups=[])

        def __init__(self):
            self.swaps, self.scales, self.steps = [], [], 0

        def swap(self, artifacts, name, update=None):
            self.artifacts, self.variant_name = artifacts, name
            self.swaps.append((self.steps, name))

        def set_lr_scales(self, scales):
            self.scales.append((self.steps, dict(scales)))

        def train_step(self, x, y):
            self.steps += 1
            return StepResult(1.0, np.zeros((len(y), 10), np.float32))

        def evaluate_batch(self, x, y):
            return 1.0, np.zeros((len(y), 10), np.float32)

    engine = Engine()
    ds = synthetic((1, 8, 8), 10, 128, 32)  # 4 steps per epoch
    spec = TrainSpec(run_dir=None, epochs=epochs, batch_size=32, progress=False)
    return engine, Trainer(spec, engine, ds, algorithms=algorithms).run()


def _algorithm(name, at_step, shape=(1, 8, 8), scales=None):
    from types import SimpleNamespace

    from accelc.runtime.algorithm import Algorithm

    class A(Algorithm):
        def __init__(self):
            super().__init__(None, {})
            self.name, self.on = name, False

        def before_step(self, state, epoch, step):
            self.on = state.step >= at_step

        def decision(self):
            return self.on

        def transform(self, art):
            return SimpleNamespace(info=SimpleNamespace(input_shape=shape), name=name) if self.on else art

        def describe(self):
            return name if self.on else ""

        def lr_scales(self, state):
            return scales(state) if scales else None

    return A()


def test_a_decision_before_a_step_switches_at_that_step_and_scales_multiply():
    a = _algorithm("a", 5, scales=lambda st: {"w": 0.5, "v": 2.0} if st.step < 6 else {})
    b = _algorithm("b", 99, scales=lambda st: {"w": 0.5} if st.step < 6 else {})
    engine, s = _fake_run([a, b])
    assert engine.swaps == [(5, "a")]  # before the 6th step (0-based step 5), inside epoch 2
    # set when they change only: both algorithms' scales multiplied, then cleared once
    assert engine.scales == [(0, {"w": 0.25, "v": 2.0}), (5, {"w": 0.25, "v": 2.0}), (6, {})]
    assert s["history"][1]["variant"] == "a"


def test_a_decision_before_a_step_may_not_change_the_input_shape():
    from accelc.compiler.errors import AccelcError

    with pytest.raises(AccelcError, match="before a step changed the input's shape"):
        _fake_run([_algorithm("a", 2, shape=(1, 4, 4))])


@pytest.mark.parametrize(
    "bad",
    [
        {"step_time": {"(none)": ["1", 0.5]}},
        {"step_time": {"(none)": [1, float("nan")]}},
        {"step_time": {"(none)": [1]}},
        {"frozen_at": {"features.0": {"step": 3}}},
        {"frozen_at": []},
        {"freeze_at": {"features.0": 0.5}},
        {"freeze_at": "0.5"},
        {"motion": {}},
    ],
)
def test_a_malformed_controller_state_is_refused_on_load(freezeout_art, bad):
    """What a checkpoint says of the freezeout controller is checked when it is loaded (the
    resume turns these errors into one line), not when the report later reads it."""
    from accelc.passes.skip.algorithm import LarsSkip

    art, _ = load_artifacts(freezeout_art)
    ctrl = LarsSkip(art, art.plan[0])
    with pytest.raises((TypeError, ValueError, KeyError, AttributeError)):
        ctrl.load_state_dict({"log": [], **bad})


# ----------------------------------------------------------------------------- the veto
def test_drift_is_one_for_steps_in_one_direction_and_small_for_steps_that_cancel():
    from accelc.passes.skip.freezeout import angle, drift, postponed

    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(1000).astype(np.float32)
    lr, steps = 1e-3, 100
    sign = np.sign(rng.standard_normal(1000))
    straight = w0 + steps * lr * sign  # every element moved by the rate at every step, the same way
    assert drift(w0, straight, steps * lr) == pytest.approx(1.0, rel=1e-4)
    walk = w0 + lr * np.sign(rng.standard_normal((steps, 1000))).sum(0)  # each step's sign at random
    assert drift(w0, walk, steps * lr) == pytest.approx(1 / np.sqrt(steps), rel=0.1)
    assert drift(w0, w0, steps * lr) == 0.0 and drift(w0, straight, 0.0) is None
    assert angle(w0, 3 * w0) == pytest.approx(0.0, abs=1e-5)  # a scale is no change of direction
    assert angle(np.array([1.0, 0.0]), np.array([0.0, 2.0])) == pytest.approx(90.0)
    assert postponed([0.5, 0.6, 0.9, 1.0], 1, 0.25) == [0.5, 0.85, 1.0, 1.0]


@pytest.fixture(scope="module")
def veto_art(tmp_path_factory):
    """freezeout from t0 0.5 with a drift veto no training layer passes under (every due layer is
    kept), and with one every layer passes under (the plain schedule)."""
    d = tmp_path_factory.mktemp("veto")
    export_test_model("vgg", d / "m.onnx")
    out = {}
    for name, limit in (("always", 1e-9), ("never", 1e9)):
        opts = {"rule": "freezeout", "t0": 0.5, "veto": "drift", "veto_drift": limit}
        accelc.compile(d / "m.onnx", d / name, passes=["skip"], pass_options={"skip": opts})
        out[name] = d / name
    return out


def test_the_veto_keeps_moving_layers_and_records_every_epochs_motion(veto_art, freezeout_art, tmp_path):
    kept = _train(veto_art["always"], tmp_path / "kept", epochs=3)
    rep = kept["controllers"]["skip"]
    vetoes = [d for d in kept["decisions"] if d["action"] == "veto"]
    # epoch 1's end: the first layer (due at 50%) one epoch later, the rest past the end; epoch 2's: never
    assert len(vetoes) == 2 and all(v["drift"] > 1e-9 for v in vetoes)
    assert vetoes[0]["was"] == 0.5 and vetoes[0]["freeze_at"] == pytest.approx(0.5 + 1 / 3)
    assert vetoes[1]["freeze_at"] == 1.0
    assert rep["frozen_at"] == {} and set(rep["freeze_at"].values()) == {1.0}
    motion = rep["motion"]
    assert [m["epoch"] for m in motion] == [1, 2, 3] and motion[-1]["progress"] == 1.0
    layers = list(rep["freeze_at"])
    for m in motion:  # every layer trained every epoch; its drift is a fraction of its steps' reach
        assert set(m["drift"]) == set(layers)
        assert all(0 < v < 1.5 for v in m["drift"].values()) and all(0 < a < 90 for a in m["angle"].values())
    # a veto no layer passes leaves the schedule as it was: the same run as without the veto
    same = _train(veto_art["never"], tmp_path / "same")
    plain = _train(freezeout_art, tmp_path / "plain")
    assert not [d for d in same["decisions"] if d["action"] == "veto"]
    assert same["controllers"]["skip"]["frozen_at"] == plain["controllers"]["skip"]["frozen_at"]
    assert [m["test_loss"] for m in same["history"]] == [m["test_loss"] for m in plain["history"]]


def test_a_resumed_run_keeps_the_schedule_the_veto_changed(veto_art, tmp_path, monkeypatch):
    whole = _train(veto_art["always"], tmp_path / "whole", epochs=3)
    stopped_after(monkeypatch, 1, lambda: _train(veto_art["always"], tmp_path / "split", epochs=3))
    resumed = _train(veto_art["always"], tmp_path / "split", epochs=3, resume=True)
    assert [m["test_loss"] for m in resumed["history"]] == [m["test_loss"] for m in whole["history"]]
    for key in ("freeze_at", "frozen_at", "motion"):
        assert resumed["controllers"]["skip"][key] == whole["controllers"]["skip"][key], key


def test_a_checkpointed_schedule_is_checked_before_it_is_used(freezeout_art):
    """The schedule a checkpoint carries (the veto may have changed it) must name this model's
    layers with numbers that grow input side first, within the run."""
    from accelc.passes.skip.algorithm import LarsSkip

    art, _ = load_artifacts(freezeout_art)
    ctrl = LarsSkip(art, art.plan[0])
    layers, times = list(ctrl.freeze_at), list(ctrl.freeze_at.values())
    later = [min(1.0, t + 0.1) for t in times]
    ctrl.load_state_dict({"log": [], "freeze_at": dict(zip(layers, later))})
    assert list(ctrl.freeze_at.values()) == later  # a valid one replaces the compiled schedule
    for bad in (
        {**dict(zip(layers, times)), layers[0]: "0.5"},
        {**dict(zip(layers, times)), layers[0]: True},
        {**dict(zip(layers, times)), layers[0]: 0.99},  # later than the next layer's
        {**dict(zip(layers, times)), layers[-1]: 1.5},
        {**dict(zip(layers, times)), layers[0]: float("nan")},
    ):
        with pytest.raises((TypeError, ValueError)):
            ctrl.load_state_dict({"log": [], "freeze_at": bad})
