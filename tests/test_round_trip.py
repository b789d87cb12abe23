"""Every file accelc writes is one accelc reads back (issue 32.1): a 62-conv model compiled with
every pass, trained until the skip controller froze most of it (a variant far past any fixed
bound), resumed, and exported; then every file of the artifacts, the run and the export is read
by the reader accelc (or ORT, for the files made for ORT) has for it, and a file no reader claims
fails the test, so a new kind of output comes with its reader."""

import csv
import fnmatch
import json

import numpy as np
import pytest

import accelc
from accelc.compiler.artifact_dir import load_artifacts
from accelc.compiler.pass_api import registered

from conftest import run_cli

DEPTH = 60  # blocks of 8-channel 3x3 convs, between a 5x5 stem (rescale's kernel) and a 1x1 head conv


def _deep_model(path):
    import torch
    from torch import nn

    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 8, 5, padding=2)
            self.blocks_of_a_rather_long_stage_name = nn.Sequential(
                *[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()) for _ in range(DEPTH)]
            )
            self.mix = nn.Conv2d(8, 8, 1)
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            h = self.blocks_of_a_rather_long_stage_name(torch.relu(self.stem(x)))
            return self.head(torch.mean(self.mix(h), dim=(2, 3)))

    torch.manual_seed(0)
    accelc.export(Deep(), torch.zeros(2, 1, 16, 16), path)


def _read_metrics_jsonl(p):
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    assert [r["epoch"] for r in rows] == [1, 2, 3], rows
    return rows


def _read_metrics_csv(p):
    with p.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3], rows


def _read_steps_csv(p):
    with p.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps) and len(set(steps)) == len(steps) and steps, steps[:5]
    assert {int(r["epoch"]) for r in rows} == {1, 2, 3}


def _read_png(p):
    import matplotlib.image

    assert matplotlib.image.imread(str(p)).ndim == 3


def _read_tensorboard(p):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    assert sum(1 for _ in EventFileLoader(str(p)).Load()) > 1


@pytest.mark.slow
def test_every_file_of_a_deep_run_through_every_pass_reads_back(tmp_path):
    import onnx
    import onnxruntime as ort

    passes = [p for p in registered() if p not in ("opt", "amp")]  # amp: its own dtype tests (bf16 on this CPU?)
    assert {"skip", "reuse", "rescale"} <= set(passes)
    _deep_model(tmp_path / "m.onnx")
    convs = sum(n.op_type == "Conv" for n in onnx.load(tmp_path / "m.onnx").graph.node)
    assert convs >= 60
    art, run = tmp_path / "art", tmp_path / "run"
    opts = {  # the seed's modes (their options below); the defaults: tests/test_freezeout.py, test_rescale_progressive.py
        "skip": {"rule": "lars", "tau_mode": "absolute", "tau": 1e-12, "policy": "any"},
        "rescale": {"mode": "kernel", "switch": "epoch:1"},
    }
    accelc.compile(tmp_path / "m.onnx", art, passes=passes, pass_options=opts)
    kw = {"batch_size": 16, "run_dir": run, "progress": False, "log": "csv,tensorboard"}
    accelc.train(art, "synthetic:64", epochs=2, **kw)
    meta = json.loads((run / "checkpoint.json").read_text())
    assert isinstance(meta["variant"], dict) and len(json.dumps(meta["variant"])) > 200, meta["variant"]
    s = accelc.train(art, "synthetic:64", epochs=3, resume=True, allow_change=["epochs"], **kw)
    assert s["epochs"] == 3
    out = accelc.export_run(run, tmp_path / "model.onnx", ort_checkpoint=tmp_path / "model.ckpt")

    # every file, claimed by the reader accelc (or ORT) has for it
    readers = {
        # the artifacts: load_artifacts verifies each file against report.json's hashes and parses it;
        # inspect reads the report, the plan and the graphs again
        "art/*": lambda p: None,
        "run/checkpoint.json": lambda p: None,  # read by the resume and export-run above, and below
        "run/checkpoint-*.npz": lambda p: None,
        "run/summary.json": lambda p: json.loads(p.read_text())["epochs"] == 3 or pytest.fail(str(p)),
        "run/metrics.jsonl": _read_metrics_jsonl,
        "run/metrics.csv": _read_metrics_csv,
        "run/steps.csv": _read_steps_csv,
        "run/curves.png": _read_png,
        "run/tensorboard/events.out.tfevents.*": _read_tensorboard,
        "run/.accelc-lock": lambda p: p.stat().st_size == 0 or None,
        "model.onnx": lambda p: onnx.checker.check_model(onnx.load(p)),
        "model.ckpt": lambda p: None,  # ORT Training's CheckpointState, loaded below
        "m.onnx": lambda p: None,  # the user's model
    }
    loaded, report = load_artifacts(art)
    assert set(loaded.stages) and report["passes"]
    for cmd in (["inspect", art, "--json"], ["inspect", art]):
        r = run_cli(*cmd)
        assert r.returncode == 0, (cmd, r.stderr)
    seen = []
    for p in sorted(tmp_path.rglob("*")):
        if p.is_dir():
            continue
        rel = p.relative_to(tmp_path).as_posix()
        pattern = next((k for k in readers if fnmatch.fnmatch(rel, k)), None)
        assert pattern is not None, f"accelc wrote {rel}, which no reader in this test claims"
        readers[pattern](p)
        seen.append(pattern)
    assert {"run/tensorboard/events.out.tfevents.*", "run/steps.csv", "run/metrics.csv"} <= set(seen)

    # resume again with nothing left to train, and export again: the run's files still read back
    again = accelc.train(art, "synthetic:64", epochs=3, resume=True, **kw)
    assert again["epochs"] == 3
    second = accelc.export_run(run, tmp_path / "again.onnx")
    assert second["trained_variant"] == out["trained_variant"]
    x = np.random.default_rng(0).standard_normal((2, 1, 16, 16)).astype(np.float32)
    a = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(tmp_path / "again.onnx"), providers=["CPUExecutionProvider"])
    name = out["input"]["name"]
    np.testing.assert_array_equal(a.run(None, {name: x})[0], b.run(None, {name: x})[0])
    from onnxruntime.training import api

    state = api.CheckpointState.load_checkpoint(str(tmp_path / "model.ckpt"))
    assert len(list(state.parameters)) == out["ort_checkpoint_parameters"]
