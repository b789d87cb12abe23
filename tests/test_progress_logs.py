"""Progress and logs: bars only on a terminal (variant, images/s and loss in them; an evaluation
bar), plain per-epoch lines elsewhere; metrics.csv and steps.csv next to metrics.jsonl; the
TensorBoard logger; checkpoint-NNNN holds epoch NNNN; curves.png marks variant switches."""

import csv
import json
import shutil
import sys

import numpy as np
import pytest

from accelc.compiler.errors import AccelcError
from accelc.runtime import checkpoint as ckpt
from accelc.runtime.spec import TrainSpec
from accelc.runtime.train import MAX_STEP_ROWS, RunLogs, _switches, check_loggers, open_run_dir, release_run_dir, train

DATA = "synthetic:256"  # 256 train images: 8 steps of 32 an epoch


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _train(art, run, **kw):
    kw.setdefault("progress", False)
    return train(TrainSpec(artifacts=art, data=DATA, batch_size=32, run_dir=run, test_limit=100, **kw))


@pytest.fixture(scope="module")
def two_epochs(small_art, tmp_path_factory):
    run = tmp_path_factory.mktemp("logs") / "run"
    _train(small_art, run, epochs=2, log=("csv", "tensorboard"))
    return run


def test_run_files_and_numbering(two_epochs):
    names = sorted(f.name for f in two_epochs.iterdir() if not f.name.startswith("."))
    assert names == [
        "checkpoint-0002.npz",  # holds epoch 2, the last one
        "checkpoint.json",
        "curves.png",
        "metrics.csv",
        "metrics.jsonl",
        "steps.csv",
        "summary.json",
        "tensorboard",
    ]
    meta = json.loads((two_epochs / ckpt.META).read_text())
    assert meta["arrays"] == "checkpoint-0002.npz" and meta["history"][-1]["epoch"] == 2


def test_metrics_csv_equals_jsonl(two_epochs):
    jsonl = [json.loads(x) for x in (two_epochs / "metrics.jsonl").read_text().splitlines()]
    rows = _rows(two_epochs / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r, m in zip(rows, jsonl):
        for k in ("train_loss", "test_loss", "train_acc", "test_acc", "images_per_second", "train_time"):
            assert float(r[k]) == m[k]  # repr: exact round trip
        assert r["variant"] == m["variant"] and r["input_hw"] == "x".join(map(str, m["input_hw"]))


def test_steps_csv_every_step_and_mean_is_epoch_loss(two_epochs):
    rows = _rows(two_epochs / "steps.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 17))
    assert [int(r["epoch"]) for r in rows] == [1] * 8 + [2] * 8
    assert [int(r["epoch_step"]) for r in rows] == list(range(1, 9)) * 2
    jsonl = [json.loads(x) for x in (two_epochs / "metrics.jsonl").read_text().splitlines()]
    for e in (1, 2):  # the epoch's loss is the mean of its (equal-sized) steps' losses
        mean = np.mean([float(r["loss"]) for r in rows if int(r["epoch"]) == e])
        assert abs(mean - jsonl[e - 1]["train_loss"]) < 1e-6
    assert all(float(r["images_per_second"]) > 0 for r in rows)


def test_tensorboard_events(two_epochs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(two_epochs / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"step/loss", "epoch/train_loss", "epoch/test_acc"} <= set(tags)
    steps = [(e.step, e.value) for e in acc.Scalars("step/loss")]
    rows = _rows(two_epochs / "steps.csv")
    assert [s for s, _ in steps] == list(range(1, 17))
    assert np.allclose([v for _, v in steps], [float(r["loss"]) for r in rows], rtol=1e-6)
    assert [e.step for e in acc.Scalars("epoch/test_acc")] == [1, 2]


def test_resume_continues_logs(small_art, two_epochs, tmp_path):
    run = tmp_path / "run"
    _train(small_art, run, epochs=1, log=("csv", "tensorboard"))
    assert (run / "checkpoint-0001.npz").is_file()
    with open(run / "steps.csv", "a") as fh:  # rows of an epoch a killed run did not finish
        fh.write("2,9,1,9.9,1.0,1.0,base,32x32\n")
    _train(small_art, run, epochs=2, resume=True, allow_change=("epochs",), log=("csv", "tensorboard"))
    assert not (run / "checkpoint-0001.npz").exists() and (run / "checkpoint-0002.npz").is_file()
    a, b = _rows(two_epochs / "steps.csv"), _rows(run / "steps.csv")
    assert [(r["epoch"], r["step"], r["loss"]) for r in a] == [(r["epoch"], r["step"], r["loss"]) for r in b]
    assert _rows(two_epochs / "metrics.csv")[1]["test_acc"] == _rows(run / "metrics.csv")[1]["test_acc"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("step/loss")] == list(range(1, 17))  # no step twice across the resume
    assert [e.step for e in acc.Scalars("epoch/test_acc")] == [1, 2]


def test_resume_reads_previous_numbering(small_art, tmp_path):
    """A run directory of the numbering before (checkpoint-0000.npz held epoch 1) resumes."""
    run = tmp_path / "run"
    _train(small_art, run, epochs=1)
    (run / "checkpoint-0001.npz").rename(run / "checkpoint-0000.npz")
    meta = json.loads((run / ckpt.META).read_text())
    meta["arrays"] = "checkpoint-0000.npz"
    (run / ckpt.META).write_text(json.dumps(meta))
    s = _train(small_art, run, epochs=2, resume=True, allow_change=("epochs",))
    assert [h["epoch"] for h in s["history"]] == [1, 2]
    assert sorted(p.name for p in run.glob("*.npz")) == ["checkpoint-0002.npz"]


def test_loggers_choice():
    assert check_loggers("csv,tensorboard") == ("csv", "tensorboard")
    assert check_loggers(["none"]) == () and check_loggers(None) == ()
    with pytest.raises(AccelcError, match=r"^--log takes csv, tensorboard or none, got wandb$"):
        check_loggers("wandb")


def test_none_logs_only_jsonl(small_art, tmp_path):
    run = tmp_path / "run"
    _train(small_art, run, epochs=1, log="none")
    assert not (run / "metrics.csv").exists() and not (run / "steps.csv").exists()
    assert (run / "metrics.jsonl").is_file()


def test_force_keeps_a_foreign_tensorboard_folder(two_epochs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_epochs, run)
    (run / "tensorboard" / "notes.txt").write_text("mine")
    with pytest.raises(AccelcError, match="holds 'tensorboard/notes.txt', which accelc train did not write"):
        open_run_dir(run, resume=False, force=True)
    assert (run / "tensorboard" / "notes.txt").read_text() == "mine" and (run / "steps.csv").is_file()
    (run / "tensorboard" / "notes.txt").unlink()
    rd, lock = open_run_dir(run, resume=False, force=True)  # only what accelc train wrote: cleared
    release_run_dir(rd, lock, False)
    assert not any(p.name != ".lock" and not p.name.startswith(".") for p in run.iterdir())


def test_step_rows_bounded(tmp_path):
    logs = RunLogs(tmp_path, ("csv",), [], total_steps=3 * MAX_STEP_ROWS)
    assert logs.stride == 3
    m = {"variant": "base", "input_hw": [8, 8], "train_time": 1.0}
    for i in range(7):
        logs.step(1, i + 1, i == 6, float(i), 10, 0.5, m)
    # every third step: the mean loss of the three since the last row; the epoch's last step too
    assert [(r["step"], r["loss"]) for r in logs.rows] == [(3, 1.0), (6, 4.0), (7, 6.0)]
    assert logs.rows[0]["images_per_second"] == 20.0


def test_plain_lines_off_a_terminal(small_art, tmp_path, capsys):
    _train(small_art, tmp_path / "run", epochs=1, progress=True, log="none")
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err
    assert err.startswith("ort epoch 1/1: loss ") and "img/s)" in err


def test_bars_on_a_terminal(small_art, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    _train(small_art, tmp_path / "run", epochs=1, progress=True, log="none")
    err = capsys.readouterr().err
    assert "\r" in err and "ort epoch 1/1" in err and "img/s" in err and "loss " in err
    assert "ort epoch 1/1 eval" in err  # the evaluation's bar


def test_switch_marks():
    h = [
        {"variant": "rescale:low(s=2)", "input_hw": [16, 16], "train_time": 1.0},
        {"variant": "rescale:low(s=2)", "input_hw": [16, 16], "train_time": 2.0},
        {"variant": "rescale:full", "input_hw": [32, 32], "train_time": 4.0},
        {"variant": "rescale:full+skip(2)", "input_hw": [32, 32], "train_time": 5.0},
    ]
    assert _switches(h) == [(0.0, "rescale:low(s=2) 16x16"), (2.0, "rescale:full"), (4.0, "rescale:full+skip(2)")]
    assert _switches([{"variant": "base", "input_hw": [8, 8], "train_time": 1.0}]) == []


# ---------------------------------------------------------------- plots
@pytest.fixture
def figures(monkeypatch):
    """The figures the plotting functions draw (captured as they are closed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (seen.append(fig), close(fig)))
    return seen


def _hist(e, hw=(28, 28), **extra):
    return {"epoch": e, "input_hw": list(hw), "train_time": float(e), "test_acc": 0.1 * e, **extra}


def test_controllers_plot_draws_only_panels_with_content(figures, tmp_path):
    from accelc.bench import plot_controllers

    rep = {"model": "vgg", "data": "synthetic"}
    plain = [_hist(e) for e in (1, 2, 3)]
    reuse = [_hist(e, reuse={"c2": {"remain_ratio": 0.5}, "c3": {"remain_ratio": 0.4}}) for e in (1, 2, 3)]
    low = [_hist(e, (14, 14) if e == 1 else (28, 28)) for e in (1, 2, 3)]
    plot_controllers({"ort": [{"history": plain}], "ort+reuse": [{"history": reuse}]}, tmp_path / "c.png", rep)
    (fig,) = figures
    assert [a.get_title() for a in fig.axes] == ["remain ratio (clusters / rows) per reused layer"]
    lines = fig.axes[0].get_lines()
    assert len({line.get_color() for line in lines}) == 1 and len({line.get_marker() for line in lines}) == 2
    assert all(float(t).is_integer() for t in fig.axes[0].get_xticks())
    plot_controllers({"ort": [{"history": plain}], "ort+rescale": [{"history": low}]}, tmp_path / "c.png", rep)
    assert [a.get_title() for a in figures[1].axes] == ["resolution stage (input height)"]
    assert list(figures[1].axes[0].get_yticks()) == [14, 28]
    plot_controllers({"ort": [{"history": plain}]}, tmp_path / "c.png", rep)
    assert "no controller acted" in figures[2].axes[0].texts[0].get_text()


def test_curves_mark_switches_and_bench_shows_target(figures, tmp_path):
    from accelc.bench import plot_bench
    from accelc.runtime.train import plot_run

    h = [
        dict(_hist(e, (14, 14) if e == 1 else (28, 28)), train_loss=1.0, test_loss=1.0, train_acc=0.5)
        for e in (1, 2, 3)
    ]
    for m, v in zip(h, ("rescale:low(s=2)", "rescale:full", "rescale:full")):
        m["variant"] = v
    plot_run(h, tmp_path / "curves.png")
    names = [t.get_text() for t in figures[0].axes[0].texts]
    assert names == ["rescale:low(s=2) 14x14", "rescale:full"]
    plot_bench({"ort": [{"history": h}]}, tmp_path / "a.png", {"model": "m", "data": "d", "target_acc": 0.25,
                                                                "target_rule": "ort-best"})  # fmt: skip
    labels = figures[1].axes[0].get_legend_handles_labels()[1]
    assert "target 0.2500 (ort-best)" in labels
