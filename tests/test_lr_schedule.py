"""The learning rate over a budget of epochs (accelc.runtime.lr_schedule, ``--lr-schedule``): the
rates, the steps that get them, resume, and the flag's checks in the CLI, the API and the spec."""

from __future__ import annotations

import json

import pytest

import accelc
from accelc.runtime.lr_schedule import LRSchedule
from accelc.runtime.spec import TrainSpec
from tests.conftest import assert_api_refused, run_cli


def test_parse_and_text_round_trip():
    assert LRSchedule.parse("constant") == LRSchedule() and LRSchedule().text() == "constant"
    assert LRSchedule.parse("linear") == LRSchedule("linear", 0.05)
    s = LRSchedule.parse("linear:0.1")
    assert s.warmup == 0.1 and LRSchedule.parse(s.text()) == s
    assert LRSchedule.parse("linear:0") == LRSchedule("linear", 0.0)


@pytest.mark.parametrize("bad", ["cosine", "linear:1", "linear:-0.1", "linear:nan", "linear:x", "constant:2", ""])
def test_bad_schedules_are_one_line(bad):
    assert_api_refused(lambda: LRSchedule.parse(bad), "--lr-schedule takes constant, linear or linear:W", ValueError)
    assert_api_refused(lambda: LRSchedule.parse(3), "got int", TypeError)


def test_linear_warms_up_then_decays_to_zero_over_the_budget():
    s = LRSchedule("linear", 0.1)
    f = [s.factor(i, 100) for i in range(100)]
    assert f[0] == pytest.approx(1 / 11) and f[9] == pytest.approx(10 / 11)  # warm-up: 10 steps
    assert f[10] == 1.0 and f[99] == pytest.approx(1 / 90) and min(f) > 0
    assert all(b < a for a, b in zip(f[10:], f[11:])) and all(b > a for a, b in zip(f[:10], f[1:10]))
    assert [LRSchedule().factor(i, 100) for i in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert LRSchedule("linear", 0.0).factor(0, 10) == 1.0 and LRSchedule("linear", 0.5).factor(0, 1) == 1.0


def _train(art, run, epochs, schedule, **kw):
    return accelc.train(
        art, "synthetic:256", epochs=epochs, batch_size=64, run_dir=run, lr_schedule=schedule, progress=False,
        threads=1, **kw,
    )  # fmt: skip


def test_each_step_gets_its_rate_and_the_run_records_it(small_art, tmp_path, monkeypatch):
    from accelc.runtime.session import TrainingSession

    seen = []
    orig = TrainingSession.set_lr
    monkeypatch.setattr(TrainingSession, "set_lr", lambda self, lr: (seen.append(lr), orig(self, lr))[1])
    s = _train(small_art, tmp_path / "run", 2, "linear:0.25")
    base = 1e-3  # the compiled-in rate
    want = [base * LRSchedule("linear", 0.25).factor(i, 8) for i in range(8)]  # 2 epochs x 4 steps
    assert seen == pytest.approx(want)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in lines] == pytest.approx([want[3], want[7]])
    assert s["lr_schedule"] == "linear:0.25"
    seen.clear()
    _train(small_art, tmp_path / "const", 1, "constant")
    assert seen == []  # a constant rate is left alone


def test_a_resume_with_another_schedule_is_refused(small_art, tmp_path):
    args = ["train", small_art, "--data", "synthetic:256", "--batch-size", "64", "--threads", "1", "-q"]
    r = run_cli(*args, "--epochs", "1", "--lr-schedule", "linear", "-o", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    r = run_cli(*args, "--epochs", "2", "--allow-change", "epochs", "-o", tmp_path / "a", "--resume")
    assert r.returncode == 2 and "--lr-schedule linear:0.05; this run has constant" in r.stderr, r.stderr


def test_the_schedule_travels_in_the_train_spec_and_is_checked():
    spec = TrainSpec(artifacts="art", lr_schedule="linear:0.2")
    assert TrainSpec.from_json(spec.to_json()).lr_schedule == "linear:0.2"
    raw = json.loads(spec.to_json())
    raw["lr_schedule"] = "cosine"
    with pytest.raises(ValueError, match="--lr-schedule takes"):
        TrainSpec.from_json(json.dumps(raw))
    assert_api_refused(lambda: accelc.train("nowhere", lr_schedule="step"), "--lr-schedule takes", ValueError)


def test_cli_bad_schedule_is_one_line(small_art, tmp_path):
    r = run_cli("train", small_art, "--lr-schedule", "linear:2", "-o", tmp_path / "run")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--lr-schedule takes" in r.stderr
    assert not (tmp_path / "run").exists()
