"""Runtime: accelc train end to end, kill -9 and --resume, data sources."""

import gzip
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from accelc.runtime.data import load_data, synthetic

from conftest import ACCELC, run_cli


@pytest.mark.slow
def test_train_cli_writes_metrics_summary_plot_checkpoint(small_art, tmp_path):
    r = run_cli(
        "train", small_art, "--data", "synthetic:1024", "--epochs", "2", "--batch-size", "32", "-o", tmp_path / "run"
    )
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    for k in ("train_loss", "train_acc", "test_acc", "train_seconds", "eval_seconds", "images_per_second"):
        assert all(k in m for m in lines)
    assert lines[1]["train_loss"] < lines[0]["train_loss"]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["epochs"] == 2 and s["final_test_acc"] == lines[-1]["test_acc"]
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    assert (tmp_path / "run" / "checkpoint.json").exists()
    # the run dir is not silently overwritten
    r = run_cli("train", small_art, "--data", "synthetic:256", "--epochs", "1", "-o", tmp_path / "run")
    assert r.returncode == 2 and "--resume" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_kill_and_resume_matches_uninterrupted(small_art, tmp_path, schedule):
    """A killed and resumed run equals the uninterrupted one; with a learning-rate schedule each
    step of the resumed epochs gets the rate of its place in the same budget."""
    args = [
        "train",
        "--lr-schedule",
        schedule,
        str(small_art),
        "--data",
        "synthetic:2048",
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--seed",
        "7",
        "--threads",
        "1",
    ]
    ref = run_cli(*args, "-o", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    p = subprocess.Popen(ACCELC + args + ["-o", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoint.json").exists():
        time.sleep(0.05)
    time.sleep(0.4)  # into epoch 2
    assert p.poll() is None, "training finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    done = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert 1 <= len(done) < 3
    r = run_cli(*args, "-o", run, "--resume")
    assert r.returncode == 0, r.stderr
    a = [json.loads(l) for l in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in b] == [1, 2, 3]
    for x, y in zip(a, b):
        for k in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert abs(x[k] - y[k]) <= 1e-6, (k, x[k], y[k])
    assert not list(run.glob(".*tmp*"))  # no partial files


def test_synthetic_is_deterministic_and_shaped():
    a = synthetic((3, 20, 24), 7, 300, 50)
    b = synthetic((3, 20, 24), 7, 300, 50)
    assert a.x_train.shape == (300, 3, 20, 24) and set(np.unique(a.y_train)) <= set(range(7))
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_train, b.y_train)
    assert abs(a.x_train.mean()) < 1e-3 and abs(a.x_train.std() - 1) < 1e-2
    o1, o2 = a.order(0, 1), a.order(0, 1)
    assert np.array_equal(o1, o2) and not np.array_equal(o1, a.order(1, 1))
    # spatial structure, not noise: neighbouring pixels are strongly correlated
    x = a.x_train[:, 0]
    assert np.corrcoef(x[:, :, 1:].ravel(), x[:, :, :-1].ravel())[0, 1] > 0.5


def _write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_and_resize(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 20))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (5, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 5))
    ds = load_data(f"fashion-mnist:{tmp_path}", (3, 32, 32), 10)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (5, 3, 32, 32)
    from accelc.compiler.errors import AccelcError

    with pytest.raises(AccelcError, match="dataset-fashion-mnist"):
        load_data(f"fashion-mnist:{tmp_path / 'nope'}", (1, 28, 28), 10)


def test_imagefolder(tmp_path):
    from PIL import Image

    for k, cls in enumerate(["cat", "dog"]):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(np.full((10, 12, 3), 40 * k + i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = load_data(f"imagefolder:{tmp_path}", (1, 16, 16), 10)
    assert ds.num_classes == 2 and ds.x_train.shape[1:] == (1, 16, 16)
    assert len(ds.x_train) + len(ds.x_test) == 10


@pytest.mark.slow
def test_bench_side_by_side(tmp_path):
    r = run_cli(
        "bench",
        "--model",
        "cnn3-small",
        "--data",
        "synthetic:256",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--configs",
        "torch,ort-noopt,ort,ort+skip",
        "--skip-tau",
        "1.5",
        "--skip-policy",
        "any",
        "-o",
        tmp_path / "b",
        "-q",
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert list(rep["configs"]) == ["torch", "ort-noopt", "ort", "ort+skip"]
    for c, v in rep["configs"].items():
        assert v["epoch_seconds"] > 0 and 0 <= v["final_test_acc"] <= 1
    # same initial weights, data order and mathematics: the two ORT variants train identically
    a, b = rep["configs"]["ort-noopt"]["histories"][0], rep["configs"]["ort"]["histories"][0]
    assert all(abs(x["train_loss"] - y["train_loss"]) < 1e-5 for x, y in zip(a, b))
    assert "| torch |" in (tmp_path / "b" / "bench.md").read_text()
    assert (tmp_path / "b" / "accuracy_vs_time.png").stat().st_size > 1000
    r = run_cli("bench", "--configs", "torch,tpu", "-o", tmp_path / "c")
    assert r.returncode == 2 and "tpu" in r.stderr


def test_bench_configurations_flags_and_config_file(tmp_path):
    """bench takes compile's pass flags (for every configuration that runs the pass) and named
    configurations with options of their own from a JSON file; the bracket language is gone."""
    from accelc.bench import parse_configs

    from conftest import assert_api_refused

    c = parse_configs("torch,ort,ort+skip", {"skip": {"tau": "1.5"}})
    assert c["ort+skip"] == {"engine": "ort", "passes": ["skip"], "options": {"skip": {"tau": "1.5"}}, "opt": True}
    assert c["torch"]["engine"] == "torch" and c["ort"]["passes"] == []
    f = tmp_path / "c.json"
    f.write_text(
        json.dumps(
            {
                "configs": [
                    "ort",
                    {"name": "skip-any", "passes": ["skip"], "options": {"skip": {"policy": "any"}}},
                    {"name": "plain", "passes": [], "opt": False},
                ]
            }
        )
    )
    c = parse_configs(None, {"skip": {"tau": "3"}}, f)
    assert list(c) == ["ort", "skip-any", "plain"]
    assert c["skip-any"]["options"] == {"skip": {"tau": "3", "policy": "any"}} and c["plain"]["opt"] is False
    assert_api_refused(lambda: parse_configs("ort+skip[tau=1.5]"), "not in brackets")
    assert_api_refused(lambda: parse_configs("ort,ort"), "listed twice")
    assert_api_refused(lambda: parse_configs("ort", {"skip": {"tau": "2"}}), "no configuration runs pass 'skip'")
    assert_api_refused(lambda: parse_configs("ort+skip", {"skip": {"tau": "-2"}}), "--skip-tau")
    for bad, needle in (
        ("{", "not valid JSON"),
        ('{"configs": [{"name": "x"}]}', "'passes' is a required property"),
        ('{"configs": [{"name": "../x", "passes": []}]}', "letters, digits"),
        ('{"configs": [{"name": "x", "passes": ["nope"]}]}', "nope"),
        ('{"configs": [{"name": "x", "passes": [], "options": {"skip": {"tau": 2}}}]}', "does not run"),
    ):
        f.write_text(bad)
        assert_api_refused(lambda: parse_configs(None, None, f), needle)
    assert_api_refused(lambda: parse_configs(None, None, tmp_path / "missing.json"), "No such file")


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_multi_tensor_adamw_is_bit_equal_to_the_per_tensor_loop(mode, wd):
    """The foreach update equals the kernel's loop to the bit, also with parameters at other step
    counts (one skipped a step: no gradient)."""
    import torch

    from accelc.runtime.optim import OrtAdamW

    torch.manual_seed(0)
    ps = [torch.randn(s) for s in [(4, 3, 3, 3), (4,), (10, 16), (), (7,)]]
    qs = [p.clone() for p in ps]
    fast = OrtAdamW(ps, lr=1e-3, weight_decay=wd, adam_mode=mode)
    ref = OrtAdamW(qs, lr=1e-3, weight_decay=wd, adam_mode=mode)
    for it in range(5):
        for p, q in zip(ps, qs):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        if it == 2:
            ps[1].grad = qs[1].grad = None
        fast.step()
        ref.step_reference()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    for p, q in zip(ps, qs):
        assert fast.state[p]["step"] == ref.state[q]["step"]
        assert torch.equal(fast.state[p]["exp_avg"], ref.state[q]["exp_avg"])
        assert torch.equal(fast.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])
