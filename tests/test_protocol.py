"""The time-to-accuracy protocol: validation split held out of the training images, a fixed target
judged on it (the test split only reports), seeds interleaved, spread and count of seeds reaching
the target, stop at the target, torch-amp reported as not run where bf16 is emulated, and the
rescale plateau switch reading validation loss."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from accelc.bench import _at_target, parse_seeds, run_bench, summarise
from accelc.compiler.errors import AccelcError
from accelc.runtime.data import load_data, parse_val_split, take_validation

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- validation split
def test_val_split_is_the_last_training_images_and_never_trained_on():
    full = load_data("synthetic:1200", (1, 16, 16), 10)
    ds = load_data("synthetic:1200", (1, 16, 16), 10, val_split=200)
    assert len(ds.x_train) == 1000 and len(ds.x_val) == 200
    np.testing.assert_array_equal(ds.y_val, full.y_train[1000:])
    np.testing.assert_array_equal(ds.x_val, full.x_train[1000:])
    np.testing.assert_array_equal(ds.x_train, full.x_train[:1000])
    # a fraction, and the train limit applies to the images before the validation split
    ds = load_data("synthetic:1200", (1, 16, 16), 10, train_limit=300, val_split=0.25)
    assert len(ds.x_train) == 300 and len(ds.x_val) == 300
    np.testing.assert_array_equal(ds.y_val, full.y_train[900:])


def test_val_split_auto_and_none():
    assert load_data("synthetic:600", (1, 16, 16), 10, val_split="auto").x_val is None  # under 1000: none
    ds = load_data("synthetic:2000", (1, 16, 16), 10, val_split="auto")
    assert len(ds.x_val) == 200 and len(ds.x_train) == 1800
    assert load_data("synthetic:600", (1, 16, 16), 10, val_split=0).x_val is None
    assert parse_val_split("0") is None and parse_val_split("0.1") == 0.1 and parse_val_split("50") == 50


@pytest.mark.parametrize("bad", ["-3", "1.5", "x", "nan", True, [1]])
def test_val_split_bad_values_are_one_line(bad):
    with pytest.raises(AccelcError, match="--val-split"):
        parse_val_split(bad)


def test_val_split_of_class_ordered_data_is_not_the_last_class():
    """Arrays given in Python (like an image folder read class by class) may be sorted by class:
    the held-out images come from a fixed permutation, not from the end."""
    x = np.random.default_rng(0).standard_normal((1000, 1, 8, 8)).astype(np.float32)
    y = np.repeat(np.arange(10), 100)
    ds = load_data((x, y, x[:50], y[:50]), (1, 8, 8), 10, val_split=100)
    assert len(np.unique(ds.y_val)) == 10 and len(ds.x_train) == 900
    assert not set(map(bytes, ds.x_val)) & set(map(bytes, ds.x_train))
    again = load_data((x, y, x[:50], y[:50]), (1, 8, 8), 10, val_split=100)
    np.testing.assert_array_equal(again.y_val, ds.y_val)  # the same split every time


@pytest.mark.parametrize("bad", ["1.0", "1e-400", "2.5"])
def test_val_split_float_text_must_be_a_fraction(bad):
    with pytest.raises(AccelcError, match="--val-split"):
        parse_val_split(bad)


def test_val_split_must_leave_images_on_both_sides():
    ds = load_data("synthetic:600", (1, 16, 16), 10)
    with pytest.raises(AccelcError, match="at least one image on each side"):
        take_validation(ds, 600, None)


def test_val_split_on_real_idx_files_is_normalised_with_training_statistics(tmp_path):
    from test_data_checks import fashion_dir  # the shared IDX writer

    d = fashion_dir(tmp_path / "f", n_train=300, n_test=50)
    ds = load_data(f"fashion-mnist:{d}", (1, 28, 28), 10, train_limit=100, val_split=100)
    assert len(ds.x_train) == 100 and len(ds.x_val) == 100
    assert abs(float(ds.x_train.mean())) < 1e-4  # the statistics are the training images' own
    assert ds.x_val.flags.writeable and not np.may_share_memory(ds.x_val, ds.x_train)


def test_resized_keeps_the_validation_split():
    ds = load_data("synthetic:1200", (1, 16, 16), 10, val_split=200)
    low = ds.resized((8, 8))
    assert low.x_val.shape == (200, 1, 8, 8) and low.y_val is ds.y_val


# ----------------------------------------------------------------------------- target and summary
def _hist(accs, val=True, t=10.0):
    return [
        {
            "epoch": i + 1,
            "train_time": t * (i + 1),
            "train_seconds": t,
            "eval_seconds": 1.0,
            "val_seconds": 0.5 if val else 0.0,
            "steps": 10,
            "test_acc": a - 0.01,
            **({"val_acc": a} if val else {}),
        }
        for i, a in enumerate(accs)
    ]


def test_target_is_judged_on_validation_and_reports_test_there():
    hit = _at_target(_hist([0.5, 0.8, 0.9]), 0.8)
    assert hit == {"epoch": 2, "train_time": 20.0, "eval_time": 3.0, "test_acc": pytest.approx(0.79)}
    assert _at_target(_hist([0.5, 0.79]), 0.8) is None
    # without a validation split the test split decides
    assert _at_target(_hist([0.5, 0.82], val=False), 0.8)["epoch"] == 2
    # a low-resolution stage does not count: the deliverable is the full-size model
    h = _hist([0.85, 0.82, 0.86])
    h[0]["input_hw"], h[1]["input_hw"], h[2]["input_hw"] = [16, 16], [32, 32], [32, 32]
    assert _at_target(h, 0.8, [32, 32])["epoch"] == 2 and _at_target(h, 0.8)["epoch"] == 1


def test_summary_median_spread_and_seeds_reaching():
    def run(accs, t):
        h = _hist(accs, t=t)
        return {"history": h, "final_test_acc": h[-1]["test_acc"], "best_test_acc": max(m["test_acc"] for m in h),
                "train_time": h[-1]["train_time"], "decisions": [], "seed": 0}  # fmt: skip

    results = {
        "ort": [run([0.7, 0.9], 10), run([0.9, 0.9], 12), run([0.7, 0.9], 11)],
        "ort+x": [run([0.9, 0.9], 5), run([0.7, 0.7], 5), run([0.9, 0.9], 7)],
    }
    rep = summarise(results, "0.85", None, 64)
    ort, x = rep["configs"]["ort"], rep["configs"]["ort+x"]
    assert ort["reached"] == 3 and ort["all_reached"]
    assert ort["time_to_target"] == 20 and ort["time_to_target_range"] == [12, 22]
    assert x["reached"] == 2 and not x["all_reached"]
    assert x["time_to_target"] == 6 and x["time_to_target_range"] == [5, 7]
    assert x["final_test_acc_range"] == [pytest.approx(0.69), pytest.approx(0.89)]
    # no ratio for a configuration that missed the target on a seed (its median is over lucky seeds)
    assert x["time_to_target_ratio_vs_ort"] is None and ort["time_to_target_ratio_vs_ort"] == 1.0
    results["ort+x"][1] = run([0.9, 0.9], 6)
    x = summarise(results, "0.85", None, 64)["configs"]["ort+x"]
    assert x["all_reached"] and x["time_to_target_ratio_vs_ort"] == pytest.approx(0.3)


@pytest.mark.parametrize("bad", ["0,0", "a", "", "-1", [1, 1]])
def test_seeds_are_validated(bad):
    with pytest.raises(AccelcError, match="--seeds"):
        parse_seeds(bad)
    assert parse_seeds("3, 1") == [3, 1] and parse_seeds(None, 5) == [5]


# ----------------------------------------------------------------------------- end to end (small)
@pytest.mark.slow
def test_bench_protocol_end_to_end(tmp_path):
    """Two seeds, configurations interleaved per seed, validation split, stop at the target,
    torch-amp reported instead of run where bf16 is emulated."""
    from accelc.bench import bf16_capable

    out = tmp_path / "b"
    rep = run_bench(
        "cnn3-small", "synthetic:1500", 3, "torch,torch-amp,ort", out, seeds="0,1", target="0.3",
        stop_at_target=True, progress=False, val_split=300,
    )  # fmt: skip
    assert rep["val_images"] == 300 and rep["train_images"] == 1200 and rep["decided_on"] == "validation"
    assert rep["seeds"] == [0, 1]
    ort = rep["configs"]["ort"]
    assert ort["runs"] == 2 and ort["seeds"] == [0, 1] and ort["reached"] == 2
    for h in ort["histories"]:  # stopped at the epoch that reached it
        assert h[-1]["val_acc"] >= 0.3 and all(m["val_acc"] < 0.3 for m in h[:-1])
    # torch and ort start from the same weights and data order: the same first-epoch accuracy
    assert rep["configs"]["torch"]["histories"][0][0]["val_acc"] == pytest.approx(
        ort["histories"][0][0]["val_acc"], abs=0.02
    )
    if not bf16_capable()[0]:
        assert "torch-amp" in rep["not_run"] and "bf16" in rep["not_run"]["torch-amp"]
        assert "torch-amp" not in rep["configs"]
    text = (out / "bench.md").read_text()
    assert "judged on the validation split" in text and "2/2" in text
    for f in ("bench.json", "time_to_target.png", "accuracy_vs_time.png"):
        assert (out / f).stat().st_size > 0
    with pytest.raises(AccelcError, match="--stop-at-target needs a fixed"):
        run_bench("cnn3-small", "synthetic:200", 1, "ort", tmp_path / "c", stop_at_target=True, progress=False)


@pytest.mark.slow
def test_protocol_report_writes_the_results_page(tmp_path):
    """benchmarks/protocol.py --report-only builds protocol.md and the whole results page from
    bench.json (the README is never rewritten)."""
    out = tmp_path / "o"
    out.mkdir()
    run_bench("cnn3-small", "synthetic:1500", 1, "ort", out / "w1", target="0.05", progress=False, val_split=300)
    spec = tmp_path / "workloads.json"
    spec.write_text(json.dumps({"seeds": [0], "configs": ["ort"], "workloads": {"w1": {}}, "quick": {}}))
    page = tmp_path / "results" / "time-to-accuracy.md"
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "protocol.py"), "--report-only", "-o", str(out),
         "--workloads-file", str(spec), "--results", str(page)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    text = page.read_text()
    assert text.startswith("# Time to accuracy: results\n") and "| ort | 1/1 |" in text
    assert "Generated by `python benchmarks/protocol.py" in text and "#### w1:" in text
    rules = text.split("[the protocol](", 1)[1].split(")", 1)[0]  # relative to the page's folder
    assert (page.parent / rules).resolve() == (ROOT / "docs" / "time-to-accuracy.md").resolve()
    assert (out / "protocol.md").read_text().count("| ort |") == 1
    assert not list(page.parent.glob(".*.tmp"))
    # a workload without its bench.json never replaces the page; a missing folder is one line
    spec.write_text(json.dumps({"seeds": [0], "configs": ["ort"], "workloads": {"w1": {}, "w2": {}}, "quick": {}}))
    for o, says in ((out, "no bench.json for w2"), (tmp_path / "nowhere", "does not exist")):
        p = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "protocol.py"), "--report-only", "-o", str(o),
             "--workloads-file", str(spec), "--results", str(page)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert page.read_text() == text


@pytest.mark.parametrize("flags", [["--seeds", "0,1"], ["--stop-at-target", "--target", "0.5"], ["--val-split", "100"]])
def test_bench_nproc_refuses_the_protocol_flags(tmp_path, flags):
    """--nproc measures throughput only: the protocol's flags are refused in one line, not ignored."""
    from conftest import run_cli

    r = run_cli("bench", "--model", "cnn3-small", "--nproc", "2", *flags, "-o", tmp_path / "s")
    assert r.returncode == 2 and "--nproc measures throughput only" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "s").exists()
