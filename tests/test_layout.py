"""The activations' layout for the whole step (accelc.runtime.layout): NCHW or NHWC forced, or chosen
by timing the step in both (``--layout auto``); kernels that read NCHW only get NCHW. Numerics of
NHWC against ORT, torch float64 and torch channels_last: tests/test_engine.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from accelc.runtime import layout as L
from accelc.runtime.config import ExecConfig
from accelc.runtime.executor import _nchw_inputs
from accelc.runtime.kernels import NodeKernel, store
from accelc.runtime.session import TrainingSession
from accelc.runtime.spec import TrainSpec
from accelc.runtime.train.summary import engine_line


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, n)


class _Kernel:
    def __init__(self, stateless=True):
        self.stateless = stateless


def test_measure_keeps_the_faster_layout_and_nchw_within_the_margin(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(L.time, "perf_counter", lambda: clock[0])

    def runner(cost):
        calls = []

        def run(layout):
            calls.append(layout)
            clock[0] += cost[layout]

        return run, calls

    run, calls = runner({L.NCHW: 0.020, L.NHWC: 0.005})
    assert L.measure(run) == (L.NHWC, {L.NCHW: 20.0, L.NHWC: 5.0})
    assert calls == [L.NCHW, L.NHWC] * (L.TIMED + 1)  # interleaved, one untimed round first
    run, calls = runner({L.NCHW: 0.0100, L.NHWC: 0.0098})  # 2% faster: within the margin
    assert L.measure(run)[0] == L.NCHW
    assert calls == [L.NCHW, L.NHWC] * (2 * L.TIMED + 1)  # a close call: measured again

    # a close call from noisy first runs is decided by the runs after them
    noisy = iter([0.0100, 0.0100] + [0.0100, 0.0099] * L.TIMED + [0.0100, 0.0080] * L.TIMED)

    def run(layout):
        clock[0] += next(noisy)

    assert L.measure(run) == (L.NHWC, {L.NCHW: 10.0, L.NHWC: 8.0})
    # the parameters' move to each layout happens before the clock starts
    run, calls = runner({L.NCHW: 0.020, L.NHWC: 0.005})
    moved = []

    def prepare(layout):
        moved.append(layout)
        clock[0] += 1.0

    assert L.measure(run, prepare) == (L.NHWC, {L.NCHW: 20.0, L.NHWC: 5.0})
    assert moved == calls


def test_auto_says_why_it_does_not_measure():
    big = L.MEASURE_FROM_BYTES
    assert L.why_not_measured(2, big, [_Kernel()]) == "the input is not an image batch"
    assert "MiB <" in L.why_not_measured(4, big - 1, [_Kernel()])
    assert "keep state" in L.why_not_measured(4, big, [_Kernel(), _Kernel(stateless=False)])
    assert L.why_not_measured(4, big, [_Kernel()]) is None
    assert L.why_not_measured(4, None, [_Kernel()]) is None  # unknown size: measured


def test_forced_layouts_are_kept_and_auto_chooses_once_per_key():
    runs = []
    forced = L.Layouts(L.NHWC)
    assert forced.for_step("k", 4, lambda: 1 << 40, [_Kernel()], runs.append) == L.NHWC and runs == []
    auto = L.Layouts("auto")
    for _ in range(3):
        auto.for_step(("base", (8, 1, 28, 28)), 4, lambda: 1 << 40, [_Kernel()], runs.append)
    # measured at the first step of the key only (a close call: TIMED more runs each)
    assert len(runs) in (2 * (L.TIMED + 1), 2 * (2 * L.TIMED + 1))
    assert auto.report["auto"] and set(auto.report["measured_ms"]) == {L.NCHW, L.NHWC}
    auto.for_step(("other", (8, 1, 32, 32)), 4, lambda: 1 << 40, [_Kernel()], runs.append)
    assert [c["measured_ms"] is not None for c in auto.report["choices"]] == [True, True]  # every choice
    # data-parallel: every rank takes rank 0's choice
    agreed = L.Layouts("auto").for_step("k", 4, lambda: 1 << 40, [_Kernel()], lambda _: None, lambda c: L.NHWC)
    assert agreed == L.NHWC


def test_in_layout_makes_one_channel_batches_nhwc_strided():
    x = torch.randn(4, 1, 6, 6)
    y = L.in_layout(x, L.NHWC)
    assert y.stride() == (36, 1, 6, 1) and torch.equal(x, y)
    w = torch.randn(8, 1, 3, 3)
    out = torch.nn.functional.conv2d(y, w)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert L.in_layout(x, L.NCHW) is x and L.in_layout(torch.randn(3, 4), L.NHWC).dim() == 2


def test_store_keeps_nhwc_and_a_kernel_reading_nchw_only_gets_nchw():
    env: dict = {}
    t = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    store("a", t, env, {})
    assert env["a"] is t
    store("b", torch.randn(5, 4).t(), env, {})  # not dense in either layout: made dense
    assert env["b"].is_contiguous()
    k = NodeKernel.__new__(NodeKernel)
    k.inputs = ["a", "b", ""]
    _nchw_inputs(k, env)
    assert env["a"].is_contiguous() and torch.equal(env["a"], t)


def test_auto_below_the_threshold_keeps_nchw_and_says_why(small_art):
    s = TrainingSession(small_art, ExecConfig(threads=1))
    s.train_step(*_batch())
    rep = s.engine_report()["layout"]
    assert rep["layout"] == "nchw" and rep["measured_ms"] is None and "MiB" in rep["not_measured"]
    assert "activations NCHW (not measured: activations" in engine_line(s.engine_report())


def test_auto_measures_the_step_and_records_the_choice(small_art, monkeypatch):
    monkeypatch.setattr(L, "MEASURE_FROM_BYTES", 0)
    x, y = _batch()
    s = TrainingSession(small_art, ExecConfig(threads=1))
    ref = TrainingSession(small_art, ExecConfig(threads=1, layout="nchw"))
    a, b = s.train_step(x, y).loss, ref.train_step(x, y).loss
    assert abs(a - b) <= 1e-5 * abs(b)  # the measuring runs left the step as it was
    rep = s.engine_report()["layout"]
    assert rep["layout"] in ("nchw", "nhwc") and set(rep["measured_ms"]) == {"nchw", "nhwc"}
    assert rep["not_measured"] is None and "measured: NCHW" in engine_line(s.engine_report())
    assert abs(s.param_arrays()["c1.weight"] - ref.param_arrays()["c1.weight"]).max() <= 1e-4
    le, _ = s.evaluate_batch(x, y)  # the evaluation graph runs in the chosen layout
    lr_, _ = ref.evaluate_batch(x, y)
    assert abs(le - lr_) <= 1e-5 * abs(lr_)


def test_the_layout_travels_in_the_train_spec():
    spec = TrainSpec(artifacts="art", exec=ExecConfig(layout="nhwc"))
    raw = json.loads(spec.to_json())
    assert raw["layout"] == "nhwc" and TrainSpec.from_json(spec.to_json()).exec.layout == "nhwc"
    raw["layout"] = "NHWC"
    with pytest.raises(ValueError, match="--layout must be one of auto, nchw, nhwc"):
        TrainSpec.from_json(json.dumps(raw))


def test_params_in_layout_moves_weights_and_moments_in_place():
    """The tensor objects stay (the optimizer and bound buffers hold them); values are kept."""
    w, b = torch.randn(8, 4, 3, 3), torch.randn(8)
    m = torch.randn(8, 4, 3, 3)
    before = w.clone()
    ident = id(w)
    assert L.params_in_layout([w, b], {w: {"exp_avg": m, "step": 3}}, L.NHWC) == 2
    assert id(w) == ident and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert m.is_contiguous(memory_format=torch.channels_last) and torch.equal(w, before)
    assert L.params_in_layout([w, b], {w: {"exp_avg": m}}, L.NHWC) == 0  # already there
    assert L.params_in_layout([w, b], {w: {"exp_avg": m}}, L.NCHW) == 2
    assert w.is_contiguous() and m.is_contiguous() and torch.equal(w, before)


def test_an_nhwc_step_keeps_weights_nhwc_and_hands_ort_nchw(small_art):
    """Under --layout nhwc the convolution weights, their gradient buffers and AdamW's moments are
    NHWC (no reorder per call); ORT's paths (a whole-graph session, the arrays handed out) get NCHW,
    and the training matches an NCHW session's."""
    x, y = _batch()
    s = TrainingSession(small_art, ExecConfig(threads=1, layout="nhwc"))
    ref = TrainingSession(small_art, ExecConfig(threads=1, layout="nchw"))
    for _ in range(2):
        a, b = s.train_step(x, y).loss, ref.train_step(x, y).loss
        assert abs(a - b) <= 1e-5 * abs(b)
    name = next(k for k, v in s.params.items() if v.dim() == 4 and v.shape[1] > 1)  # c1 has one channel
    w = s.params[name]
    assert w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert s.grads[name].is_contiguous(memory_format=torch.channels_last)
    assert s.optimizer.state[w]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    arrays = s.param_arrays()
    assert arrays[name].flags["C_CONTIGUOUS"] and s.gradients()[name].flags["C_CONTIGUOUS"]
    assert abs(arrays[name] - ref.param_arrays()[name]).max() <= 1e-5
    assert all(v.flags["C_CONTIGUOUS"] for v in s.state_arrays().values() if isinstance(v, np.ndarray))
    # the same session's parameters run by ORT's whole-graph session: NCHW again, same loss
    import dataclasses

    s.exec = dataclasses.replace(s.exec, kernels={"all": "ort"})
    s._build(s.artifacts)
    assert s.runner is None
    a = s.train_step(x, y).loss
    assert w.is_contiguous() and abs(a - ref.train_step(x, y).loss) <= 1e-5 * abs(a)


def test_an_ort_segment_writes_a_bound_nhwc_buffer_through_an_nchw_one():
    """ORT writes NCHW: a bound output of an ORT segment kept NHWC (an NHWC weight's gradient
    buffer, when a convolution falls back to ORT) is written through an NCHW buffer."""
    from onnx import helper
    from test_aten import model

    from accelc.runtime.executor import SegmentedRunner, claimed, prepared
    from accelc.runtime.session import session_options

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 5, 5)).astype(np.float32), rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER")  # not claimed: ORT's
    m = prepared(model([conv], {"x": x, "w": w}, ["y"]), ExecConfig())
    runner = SegmentedRunner(m, session_options(), ["CPUExecutionProvider"], ExecConfig(), claimed(m, ExecConfig()))
    assert runner.segments
    feeds = {"x": torch.from_numpy(x), "w": torch.from_numpy(w)}
    ref, _ = runner.run(dict(feeds), {})
    buf = torch.empty(2, 4, 5, 5, memory_format=torch.channels_last)
    got, _ = runner.run(dict(feeds), {"y": buf})
    assert got["y"] is buf and buf.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(buf, ref["y"])


def test_weight_gradients_are_adopted_not_copied(small_art, monkeypatch):
    """A convolution's fresh weight gradient replaces its bound buffer (same shape, dtype and
    strides) instead of being copied into it; the session reads it back. The same training as
    with the copy, bit for bit."""
    from accelc.runtime import kernels, torch_ops

    x, y = _batch()
    s = TrainingSession(small_art, ExecConfig(threads=1, layout="nhwc"))
    ref = TrainingSession(small_art, ExecConfig(threads=1, layout="nhwc"))
    name = next(k for k, v in s.params.items() if v.dim() == 4 and v.shape[1] > 1)
    copying = lambda n, t, env, bound, fresh=False: kernels.store(n, t, env, bound)  # noqa: E731
    for _ in range(2):
        before = s.grads[name]
        a = s.train_step(x, y).loss
        assert s.grads[name] is not before and s.params[name].grad is s.grads[name]
        with monkeypatch.context() as m:
            m.setattr(torch_ops, "store", copying)
            b = ref.train_step(x, y).loss
        assert a == b
        assert np.array_equal(s.gradients()[name], ref.gradients()[name])
        assert np.array_equal(s.param_arrays()[name], ref.param_arrays()[name])


def test_a_resumed_run_keeps_the_layouts_its_checkpoint_carries(small_art, tmp_path, monkeypatch):
    """``--layout auto`` measures at a run's first step; a resumed run takes the choices from the
    checkpoint instead of measuring again (under load a second measurement may choose the other
    layout, which rounds differently), so it ends where the run would have ended uninterrupted.
    The checkpoint's choices are untrusted input: a malformed entry is refused in one line."""
    import accelc
    from accelc.runtime import checkpoint as ckpt

    from conftest import stopped_after

    monkeypatch.setattr(L, "MEASURE_FROM_BYTES", 0)
    choose = {"layout": L.NHWC}
    measured = []

    def fake_measure(run, prepare=None):
        measured.append(choose["layout"])
        return choose["layout"], {L.NCHW: 2.0, L.NHWC: 1.0}

    monkeypatch.setattr(L, "measure", fake_measure)

    def train(run_dir, **kw):
        return accelc.train(
            small_art, "synthetic", epochs=2, batch_size=32, train_limit=96, test_limit=32,
            run_dir=run_dir, progress=False, threads=1, **kw,
        )  # fmt: skip

    whole = train(tmp_path / "whole")
    cut = stopped_after(monkeypatch, 1, lambda: train(tmp_path / "split"))
    assert len(cut["history"]) == 1
    meta = json.loads((tmp_path / "split" / ckpt.META).read_text())
    assert [c["layout"] for c in meta["layouts"]] == [L.NHWC] and len(meta["layouts"][0]["key"]) == 64
    assert meta["layouts"][0]["last"] is True  # the evaluation graph (and skip's prefix cache) runs in it
    choose["layout"] = L.NCHW  # what a second measurement would choose now
    n = len(measured)
    resumed = train(tmp_path / "split", resume=True)
    assert len(measured) == n  # not measured again
    assert [m["test_loss"] for m in resumed["history"]] == [m["test_loss"] for m in whole["history"]]
    lay = resumed["engine"]["layout"]
    assert lay["layout"] == L.NHWC and lay["restored"] == 1 and "restored from the checkpoint" in lay["not_measured"]

    meta["layouts"] = [{"key": "0" * 64, "layout": "nhwc", "extra": 1}]
    (tmp_path / "split" / ckpt.META).write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match="malformed at layouts/0"):
        train(tmp_path / "split", resume=True)
