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
    # per run, the layout choices of --layout auto (this small step's are not measured: NCHW)
    assert [[c["layout"] for c in run] for run in ort["layouts"]] == [["nchw"], ["nchw"]]
    assert rep["configs"]["torch"]["layouts"] == [None, None]
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


# ----------------------------------------------------------------------------- protocol v2: budgeted fronts
def _budget_rep(budget, configs, val=True, machine=None):
    """A bench.json of one budget: ``configs`` {name: [(train_time, val_acc, test_acc) per seed]},
    every seed trained all ``budget`` epochs (the given values are its final epoch's)."""

    def history(t, v, a):
        h = [{"epoch": i + 1, "train_time": t * (i + 1) / budget, "test_acc": a - 0.1, "val_acc": v - 0.1}
             for i in range(budget)]  # fmt: skip
        h[-1].update({"test_acc": a, "val_acc": v})
        if not val:
            for m in h:
                del m["val_acc"]
        return h

    return {
        "model": "vgg",
        "data": "synthetic",
        "input_shape": [1, 32, 32],
        "epochs": budget,
        "seeds": list(range(len(next(iter(configs.values()))))),
        "lr": 0.001,
        "lr_schedule": "linear",
        "stop_at_target": False,
        "batch_size": 64,
        "train_images": 1000,
        "val_images": 200 if val else 0,
        "test_images": 500,
        "decided_on": "validation" if val else "test (no validation split)",
        "date": "2026-12-07",
        "machine": machine or {"platform": "Linux", "cpus": 2},
        "not_run": {},
        "configs": {
            c: {"seeds": list(range(len(runs))), "histories": [history(*r) for r in runs]}
            for c, runs in configs.items()
        },
    }


def _reps(table):
    """{E: bench.json} from {E: {config: [(time, val, test), ...]}}."""
    return {e: _budget_rep(e, configs) for e, configs in table.items()}


def test_fronts_points_are_median_time_and_mean_and_range_of_the_final_epoch():
    import fronts

    rep = _budget_rep(4, {"ort": [(10.0, 0.80, 0.79), (12.0, 0.82, 0.80), (30.0, 0.90, 0.84)]})
    (p,) = fronts.fronts_of({4: rep})["ort"]
    assert p["budget"] == 4 and p["time"] == 12.0 and p["time_range"] == [10.0, 30.0]
    assert p["val_acc"] == pytest.approx(0.84) and p["val_acc_range"] == [0.80, 0.90]
    assert p["test_acc"] == pytest.approx(0.81) and p["test_acc_range"] == [0.79, 0.84]
    assert p["complete"] and p["seeds"] == [0, 1, 2]
    rep["configs"]["ort"]["histories"][1].pop()  # a seed that stopped before the end of its budget
    assert not fronts.fronts_of({4: rep})["ort"][0]["complete"]
    # without a validation split the test split decides (as the bench)
    p = fronts.fronts_of({2: _budget_rep(2, {"ort": [(5.0, 0.7, 0.6)]}, val=False)})["ort"][0]
    assert p["val_acc"] == pytest.approx(0.6)


FRONT = {
    2: {"ort": [(20.0, 0.80, 0.79)], "c": [(10.0, 0.78, 0.77)], "fast": [(5.0, 0.90, 0.88)]},
    4: {"ort": [(40.0, 0.85, 0.84)], "c": [(20.0, 0.84, 0.83)], "fast": [(9.0, 0.91, 0.89)]},
    8: {"ort": [(80.0, 0.88, 0.87)], "c": [(40.0, 0.86, 0.85)], "fast": [(18.0, 0.92, 0.90)]},
}


def test_fronts_time_to_ort_accuracy_interpolates_between_budgets():
    import fronts

    fr = fronts.build(_reps(FRONT), "w")
    assert fr["budgets"] == [2, 4, 8] and "torch" not in fr["time_to"] and all(fr["time_follows_budget"].values())
    by = {row["budget"]: row for row in fr["time_to"]["ort"]}
    assert by[2]["ref_val_acc"] == pytest.approx(0.80) and by[2]["ref_time"] == 20.0
    c2, c4, c8 = (by[e]["configs"]["c"] for e in (2, 4, 8))
    # 0.80 lies a third of the way from c's E=2 (10 s, 0.78) to its E=4 (20 s, 0.84)
    assert c2["time"] == pytest.approx(10 + 10 / 3) and not c2["upper_bound"] and c2["between"] == [2, 4]
    assert c2["ratio"] == pytest.approx((10 + 10 / 3) / 20) and c2["test_acc"] == pytest.approx(0.79)
    assert c4["time"] == pytest.approx(30.0) and c4["ratio"] == pytest.approx(0.75)
    assert c4["test_acc"] == pytest.approx(0.84) and c4["between"] == [4, 8]
    # ort's E=8 accuracy is above c's best point: not reached, never extrapolated
    assert not c8["reached"] and c8["time"] is None and c8["ratio"] is None and c8["best"] == pytest.approx(0.86)
    # ort against itself: exactly its own time, except at its first budget (an upper bound)
    o2, o4 = by[2]["configs"]["ort"], by[4]["configs"]["ort"]
    assert o4["time"] == 40.0 and o4["ratio"] == 1.0 and not o4["upper_bound"]
    assert o2["upper_bound"] and o2["time"] == 20.0 and o2["ratio"] == 1.0


def test_fronts_first_budget_already_above_is_an_upper_bound():
    import fronts

    fr = fronts.build(_reps(FRONT), "w")
    for row in fr["time_to"]["ort"]:
        f = row["configs"]["fast"]  # its smallest budget already beats ort at every budget
        assert f["reached"] and f["upper_bound"] and f["time"] == 5.0 and f["between"] == [2]
        assert f["ratio"] == pytest.approx(5.0 / row["ref_time"]) and f["test_acc"] == pytest.approx(0.88)
    text = fronts.markdown(fr)
    assert "| E=2 | 0.8000 | 0.7900 | 20.0 | fast | ≤ 5.0 | ≤ 0.25 | 0.8800 | E=2 |" in text
    assert "| E=8 | 0.8800 | 0.8700 | 80.0 | c | not reached (best 0.8600) | — | — | — |" in text


def test_fronts_ties_and_non_monotone_fronts():
    import fronts

    front = [
        {"budget": 2, "time": 10.0, "val_acc": 0.70, "test_acc": 0.69},
        {"budget": 4, "time": 20.0, "val_acc": 0.70, "test_acc": 0.70},  # flat: no division by zero
        {"budget": 8, "time": 20.0, "val_acc": 0.80, "test_acc": 0.79},  # the same time as E=4
        {"budget": 16, "time": 50.0, "val_acc": 0.75, "test_acc": 0.74},  # worse again: the first crossing counts
    ]
    r = fronts.reach(front, 0.80)  # exactly a point's accuracy: that point's time, not a bound
    assert r["reached"] and r["time"] == 20.0 and not r["upper_bound"] and r["between"] == [4, 8]
    assert r["test_acc"] == pytest.approx(0.79)
    r = fronts.reach(front, 0.72)
    assert r["time"] == 20.0 and r["between"] == [4, 8] and r["test_acc"] == pytest.approx(0.718)
    r = fronts.reach(front, 0.70)  # the first point ties the accuracy: reached there, as an upper bound
    assert r["upper_bound"] and r["time"] == 10.0
    assert not fronts.reach(front, 0.8001)["reached"] and not fronts.reach([], 0.5)["reached"]
    # a larger budget that took less time (noise): the front follows time, and the report says so
    swapped = {e: dict(c) for e, c in FRONT.items()}
    swapped[4]["c"] = [(8.0, 0.84, 0.83)]
    fr = fronts.build(_reps(swapped), "w")
    assert [p["budget"] for p in fr["fronts"]["c"]] == [4, 2, 8] and not fr["time_follows_budget"]["c"]
    c2 = fr["time_to"]["ort"][0]["configs"]["c"]  # its fastest point (E=4) already reaches ort's E=2
    assert c2["upper_bound"] and c2["time"] == 8.0 and c2["between"] == [4] and c2["ratio"] == pytest.approx(0.4)
    assert "Training time does not grow with the budget for c " in fronts.markdown(fr)
    # two configurations with the same points get the same answers
    same = {e: {**c, "twin": c["c"]} for e, c in FRONT.items()}
    for row in fronts.build(_reps(same), "w")["time_to"]["ort"]:
        assert row["configs"]["twin"] == row["configs"]["c"]


def test_fronts_against_torch_when_torch_ran():
    import fronts

    table = {e: {**c, "torch": [(t * 0.5, v, a) for t, v, a in c["ort"]]} for e, c in FRONT.items()}
    fr = fronts.build(_reps(table), "w")
    assert set(fr["time_to"]) == {"ort", "torch"}
    row = fr["time_to"]["torch"][1]  # E=4: torch 20 s at 0.85; ort's front reaches 0.85 at its E=4, 40 s
    assert row["budget"] == 4 and row["ref_time"] == 20.0 and row["configs"]["ort"]["ratio"] == pytest.approx(2.0)
    assert "Time to torch's accuracy" in fronts.markdown(fr)


def test_write_fronts_writes_json_markdown_and_png(tmp_path):
    import fronts

    w = tmp_path / "vgg32"
    assert fronts.write_fronts(w) is None  # no folder: nothing
    w.mkdir()
    (w / "budget-x").mkdir()  # not a budget folder
    (w / "budget-16").mkdir()  # no bench.json: ignored
    assert fronts.write_fronts(w) is None and not list(w.glob("fronts.*"))
    reps = _reps(FRONT)
    reps[2]["machine"]["cpu"] = "AMD EPYC 7B13"
    reps[2]["not_run"] = {"torch-amp": "no bf16"}
    for e, rep in reps.items():
        (w / f"budget-{e}").mkdir()
        (w / f"budget-{e}" / "bench.json").write_text(json.dumps(rep))
    fr = fronts.write_fronts(w)
    saved = json.loads((w / "fronts.json").read_text())
    assert saved["budgets"] == [2, 4, 8] and saved["cpu"] == "AMD EPYC 7B13" and saved["workload"] == "vgg32"
    assert [p["budget"] for p in saved["fronts"]["c"]] == [2, 4, 8] and saved["time_to"]["ort"][0]["budget"] == 2
    assert saved == json.loads(json.dumps(fr))
    text = (w / "fronts.md").read_text()
    assert text.startswith("# vgg32: budgeted fronts") and "AMD EPYC 7B13" in text
    assert "| c | E=4 | 20.0 (20.0–20.0) | 0.8400 (0.8400–0.8400) | 0.8300 (0.8300–0.8300) |" in text
    assert "| torch-amp | not run: no bf16 |" in text
    assert (w / "fronts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(w.glob(".*tmp*"))


def test_protocol_report_gathers_budgeted_fronts(tmp_path):
    """--report-only rebuilds the fronts from the budget folders, into protocol.md and --results."""
    import protocol

    out = tmp_path / "o"
    for e, rep in _reps(FRONT).items():
        (out / "w1" / f"budget-{e}").mkdir(parents=True)
        (out / "w1" / f"budget-{e}" / "bench.json").write_text(json.dumps(rep))
    spec = tmp_path / "workloads.json"
    spec.write_text(json.dumps({"seeds": [0], "configs": ["ort"], "workloads": {"w1": {}}, "quick": {}}))
    page = tmp_path / "results" / "tta.md"
    args = ["--report-only", "-o", str(out), "--workloads-file", str(spec), "--results", str(page)]
    assert protocol.main(args) == 0
    assert (out / "w1" / "fronts.png").is_file() and (out / "w1" / "fronts.json").is_file()
    md = (out / "protocol.md").read_text()
    assert "#### w1: budgeted fronts" in md and "Time to ort's accuracy" in md
    text = page.read_text()
    assert "Budgeted fronts (protocol v2" in text and "fixed target" not in text and "budget-*/bench.json" in text


@pytest.mark.parametrize("flags", [["--budgets", "2,2"], ["--budgets", "0,2"], ["--budgets", "x"],
                                   ["--budgets", "2", "--epochs", "3"], ["--budgets", "2", "--calibrate"]])  # fmt: skip
def test_protocol_budgets_refusals_are_one_line(tmp_path, flags, capsys):
    import protocol

    assert protocol.main([*flags, "--workloads", "vgg32", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--budgets" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_protocol_budgets_end_to_end(tmp_path, capsys):
    """--budgets 1,2 on a tiny workload: every budget trained in full with the linear schedule, no
    stop at the (easy) target, the fronts written and rebuilt by --report-only."""
    import protocol

    spec = tmp_path / "workloads.json"
    tiny = {"model": "cnn3-small", "input_shape": "1,16,16", "data": "synthetic:700", "lr": 0.001,
            "train_limit": 5000, "test_limit": 200, "val_split": 100, "epochs": 3, "target": 0.05}  # fmt: skip
    spec.write_text(json.dumps({"seeds": [0], "configs": ["ort"], "workloads": {"tiny": tiny}, "quick": {}}))
    out = tmp_path / "o"
    args = ["--workloads-file", str(spec), "--configs", "ort,torch", "--seeds", "0,1", "-q", "-o", str(out)]
    assert protocol.main(["--budgets", "2,1", "--train-limit", "300", *args]) == 0
    for e in (1, 2):
        rep = json.loads((out / "tiny" / f"budget-{e}" / "bench.json").read_text())
        assert rep["epochs"] == e and rep["lr_schedule"] == "linear" and not rep["stop_at_target"]
        assert rep["train_images"] == 300 and rep["val_images"] == 100 and rep["seeds"] == [0, 1]
        assert all(len(h) == e for c in ("ort", "torch") for h in rep["configs"][c]["histories"])
        assert rep["configs"]["ort"]["histories"][0][-1]["lr"] < 0.001  # decayed towards zero
    fr = json.loads((out / "tiny" / "fronts.json").read_text())
    assert fr["budgets"] == [1, 2] and set(fr["fronts"]) == {"ort", "torch"} and set(fr["time_to"]) == {"ort", "torch"}
    assert "#### tiny: budgeted fronts" in (out / "protocol.md").read_text()
    for f in ("fronts.json", "fronts.md", "fronts.png"):
        (out / "tiny" / f).unlink()
    assert protocol.main(["--report-only", *args]) == 0
    assert json.loads((out / "tiny" / "fronts.json").read_text()) == fr and (out / "tiny" / "fronts.png").is_file()
