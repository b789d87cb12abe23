"""reuse: BatchNorm after reuse (issue 14) — before evaluating an epoch that trained with reused
convs, the reuse controller gathers the BatchNorm running statistics again through the exact convs
(``--reuse-recalibrate N`` batches, forward only), so the reported accuracy, the checkpoint and an
exported model have the statistics of the graph they run. A small conv-BN net trained with
``choose=all``."""

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import accelc
from accelc.compiler.artifact_dir import load_artifacts
from accelc.compiler.pass_api import get
from accelc.passes.reuse.algorithm import Reuse
from accelc.passes.reuse.rewrite import DEFAULT_RECALIBRATE, reuse_variant, reused_layers
from accelc.runtime import checkpoint as ckpt
from accelc.runtime.algorithm import TrainState
from accelc.runtime.config import ExecConfig
from accelc.runtime.data import load_data
from accelc.runtime.engine import EngineBase
from accelc.runtime.session import TrainingSession
from accelc.runtime.spec import TrainSpec
from accelc.runtime.train import Trainer

from conftest import assert_api_refused, run_cli

BATCH = 16


class BNNet(nn.Module):
    """conv-BN-ReLU twice (c2, 8 -> 16 channels, is the reusable conv), max-pool, FC."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.b2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        h = F.max_pool2d(F.relu(self.b2(self.c2(h))), 2)
        return self.fc(h.flatten(1))


@pytest.fixture(scope="module")
def bn_art(tmp_path_factory):
    """BNNet compiled with reuse, choose=all (c2 reused whatever the machine's timings), the
    default recalibration; once per module (read-only)."""
    d = tmp_path_factory.mktemp("bnrecal")
    torch.manual_seed(0)
    accelc.export(BNNet(), torch.zeros(2, 1, 16, 16), d / "m.onnx")
    accelc.compile(d / "m.onnx", d / "art", ["reuse"], pass_options={"reuse": {"choose": "all"}}, validate_result=False)
    return d


def spec_of(art, **over):
    """The reuse plan entry with some options changed (as a hand-edited plan.json would hold them)."""
    e = next(p for p in art.plan if p["type"] == "reuse")
    return {**e, "options": {**e["options"], **over}}


class Spy(Reuse):
    """The reuse controller, recording the engine's state around its recalibration."""

    def before_evaluate(self, state, epoch):
        self.before = copies(state.engine.state_arrays())
        super().before_evaluate(state, epoch)
        self.after = copies(state.engine.state_arrays())


def copies(arrays):
    return {k: np.array(v, copy=True) for k, v in arrays.items()}  # state_arrays shares the tensors' memory


def running(arrays):
    return {k: v for k, v in arrays.items() if "running_" in k}


def trainer(d, algorithm, epochs=1, images=96):
    sess = TrainingSession(d / "art", ExecConfig(threads=1))
    ds = load_data(f"synthetic:{images}", sess.info.input_shape, sess.info.num_classes, None, 32)
    run = TrainSpec(run_dir=None, epochs=epochs, batch_size=BATCH, seed=0, progress=False)
    return Trainer(run, sess, ds, algorithms=[algorithm]), sess, ds


# ----------------------------------------------------------------------------- what it does
def test_recalibration_is_the_exact_graphs_batchnorm_step_and_moves_nothing_else(bn_art):
    """After an epoch with c2 reused: the decision is logged (batches, seconds); the running
    statistics are those of batchnorm_step on the exact variant over the same batches (the first 8
    of the epoch's data order, cycling into the next epoch's: the epoch has 6); parameters and
    optimizer state are untouched."""
    d = bn_art
    art, _ = load_artifacts(d / "art")
    alg = Spy(art, spec_of(art, recalibrate=8), measure_original=False)
    tr, sess, ds = trainer(d, alg)
    summary = tr.run()
    (m,) = summary["history"]
    (rec,) = [x for x in m["decisions"] if x["action"] == "recalibrate"]
    assert rec["controller"] == "reuse" and rec["batches"] == 8 and rec["images"] == 8 * BATCH
    assert rec["layers"] == ["c2"] and rec["seconds"] > 0 and "8 training batches" in rec["why"]
    assert m["before_eval_seconds"] >= rec["seconds"] and m["train_time"] >= m["train_seconds"] + rec["seconds"]

    before, after = alg.before, alg.after
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert moved and moved <= set(running(before)), moved  # only running statistics, every optim/ state kept
    assert all(np.array_equal(before[k], after[k]) for k in before if k.startswith("optim/"))

    # the reference: the exact graph's batchnorm_step from the same state over the same batches
    ref = TrainingSession(d / "art", ExecConfig(threads=1))
    ref.swap(reuse_variant(ref.artifacts, {}), "exact")
    assert not reused_layers(ref.artifacts.training)
    ref.load_state_arrays(before)
    order = [b for e in (0, 1) for b in ds.batches(e, BATCH, 0)][:8]
    assert len(list(ds.batches(0, BATCH, 0))) == 6
    for _, x, y in order:
        ref.batchnorm_step(x, y)
    got, want = running(after), running(ref.state_arrays())
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # the reported test numbers are those of the recalibrated statistics
    loss, acc = tr.evaluate()
    assert loss == pytest.approx(m["test_loss"], rel=1e-6) and acc == m["test_acc"]


def test_zero_turns_it_off_and_exact_epochs_need_none(bn_art):
    d = bn_art
    art, _ = load_artifacts(d / "art")

    def service(artifacts, batches):
        raise AssertionError("must not recalibrate")

    st = TrainState(type("E", (EngineBase,), {"artifacts": art})(), 1, BATCH, recalibrate_batchnorm=service)
    off = Reuse(art, spec_of(art, recalibrate=0), measure_original=False)
    off.logger = st.logger
    off.before_evaluate(st, 1)
    exact = Reuse(art, spec_of(art), measure_original=False)  # reuse switched off (strategy off, or no layer won)
    exact.logger = st.logger
    exact.on = False
    exact.before_evaluate(st, 2)
    assert not st.logger.take()[1] and not off.log and not exact.log
    e = spec_of(art)
    e["options"].pop("recalibrate")
    assert Reuse(art, e).recalibrate_batches() == (
        DEFAULT_RECALIBRATE
    )  # artifacts compiled before the option: the default

    # a whole epoch with 0: no decision, the statistics as the reused training left them
    alg = Spy(art, spec_of(art, recalibrate=0), measure_original=False)
    tr, _, _ = trainer(d, alg)
    (m,) = tr.run()["history"]
    assert not [x for x in m["decisions"] if x["action"] == "recalibrate"]
    assert all(np.array_equal(alg.before[k], alg.after[k]) for k in alg.before)


def test_bad_values_are_one_line_errors(bn_art, tmp_path):
    p = get("reuse")
    assert p.resolve_options({})["recalibrate"] == DEFAULT_RECALIBRATE
    assert p.resolve_options({"recalibrate": "0"})["recalibrate"] == 0
    assert p.resolve_options({"recalibrate": 64.0})["recalibrate"] == 64
    for bad in (-1, "x", 2.5, float("nan"), True, 100_001, None, [3]):
        assert_api_refused(
            lambda bad=bad: p.resolve_options({"recalibrate": bad}),
            "--reuse-recalibrate must be an integer in 0..100000 (batches; 0 turns it off)",
        )
    art, _ = load_artifacts(bn_art / "art")
    assert_api_refused(
        lambda: Reuse(art, spec_of(art, recalibrate=-3)).recalibrate_batches(),
        "plan.json: the reuse controller's 'recalibrate' must be an integer in 0..100000",
    )
    # a hand-edited plan.json is refused when the artifacts are loaded (training starts)
    import shutil

    shutil.copytree(bn_art / "art", tmp_path / "art")
    plan = json.loads((tmp_path / "art" / "plan.json").read_text())
    plan["controllers"][-1]["options"]["recalibrate"] = -1
    (tmp_path / "art" / "plan.json").write_text(json.dumps(plan))
    rep = json.loads((tmp_path / "art" / "report.json").read_text())  # a deliberate edit: its hash updated
    rep["files"]["plan.json"] = hashlib.sha256((tmp_path / "art" / "plan.json").read_bytes()).hexdigest()
    (tmp_path / "art" / "report.json").write_text(json.dumps(rep))
    msg = assert_api_refused(lambda: load_artifacts(tmp_path / "art"), "recalibrate")
    assert "plan.json" in msg


@pytest.mark.slow
def test_cli_flag_reaches_the_plan_and_is_refused_in_one_line(bn_art, tmp_path):
    d = bn_art
    r = run_cli("compile", d / "m.onnx", "--passes", "reuse", "--reuse-recalibrate", "0", "-o", tmp_path / "a",
                "--no-validate")  # fmt: skip
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())["controllers"][-1]
    assert plan["options"]["recalibrate"] == 0
    r = run_cli("compile", d / "m.onnx", "--passes", "reuse", "--reuse-recalibrate", "-2", "-o", tmp_path / "b")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--reuse-recalibrate must be an integer in 0..100000" in r.stderr, r.stderr
    r = run_cli("passes")
    (line,) = [x for x in r.stdout.splitlines() if x.strip().startswith("--reuse-recalibrate")]
    assert "e.g. --reuse-recalibrate 64; 0: off" in line and f"(default: {DEFAULT_RECALIBRATE})" in line


# ----------------------------------------------------------------------------- runs, resume, ranks
def test_run_logs_it_counts_it_and_a_resume_ends_the_same(bn_art, tmp_path):
    """accelc.train: one decision per epoch in metrics.jsonl, its time in train_time, the final
    checkpoint holds the recalibrated statistics; killed after epoch 1 and resumed, the run ends
    with the same statistics and metrics."""
    d = bn_art
    kw = dict(data="synthetic:96", batch_size=BATCH, progress=False, threads=1, test_limit=32)
    s = accelc.train(d / "art", epochs=2, run_dir=tmp_path / "full", **kw)
    hist = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    for m in hist:
        (rec,) = [x for x in m["decisions"] if x["action"] == "recalibrate"]
        assert rec["batches"] == DEFAULT_RECALIBRATE and rec["epoch"] == m["epoch"]
        assert m["before_eval_seconds"] >= rec["seconds"] > 0
    assert hist[1]["train_time"] == pytest.approx(
        sum(m["train_seconds"] + m["before_eval_seconds"] for m in hist) + s["setup_seconds"], rel=1e-6
    )
    assert len([x for x in s["decisions"] if x["action"] == "recalibrate"]) == 2

    accelc.train(d / "art", epochs=1, run_dir=tmp_path / "cut", **kw)
    accelc.train(d / "art", epochs=2, run_dir=tmp_path / "cut", resume=True, allow_change=("epochs",), **kw)
    a, _ = ckpt.load(tmp_path / "full")
    b, _ = ckpt.load(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    h2 = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert h2[1]["test_loss"] == pytest.approx(hist[1]["test_loss"], rel=1e-4)
    assert [x["action"] for x in h2[1]["decisions"]] == [x["action"] for x in hist[1]["decisions"]]

    # the exported model carries the recalibrated statistics of the last checkpoint
    import onnx
    from onnx import numpy_helper

    accelc.export_run(tmp_path / "full", tmp_path / "model.onnx")
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "model.onnx").graph.initializer}
    stats = {k[len("param/") :]: v for k, v in running(a).items()}
    assert stats and all(np.array_equal(inits[k], v) for k, v in stats.items())


class _Rank:
    """A two-rank group stand-in for the trainer's recalibration service."""

    world = 2

    def __init__(self, rank):
        self.rank, self.is_main = rank, rank == 0

    def shard(self, x, y):
        b = len(y) // 2
        return x[self.rank * b : (self.rank + 1) * b], y[self.rank * b : (self.rank + 1) * b]


def test_data_parallel_rank0_recalibrates_on_its_shards():
    """Only rank 0 runs the batches (its shard of each global batch, as its training statistics
    come from); the other ranks run none and take rank 0's statistics from the broadcast before
    evaluation (Trainer.evaluate), so every rank and the checkpoint hold the same statistics."""
    ds = load_data("synthetic:96", (1, 16, 16), 10, None, 32)
    calls = {}

    class Engine(EngineBase):
        def __init__(self, rank):
            self.rank = rank

        def recalibrate_batchnorm(self, art, batches):
            calls[self.rank] = [(x.copy(), y.copy()) for x, y in batches]
            return len(calls[self.rank])

    for rank in (0, 1):
        t = Trainer.__new__(Trainer)
        t.engine, t.dist, t.data, t.batch_size, t.seed, t._epoch = Engine(rank), _Rank(rank), ds, BATCH, 0, 1
        got = Trainer._recalibrate_batchnorm(t, "art", 3)
        assert got == {"batches": 3, "images": 3 * BATCH // 2}
    assert calls[1] == []
    want = [b for b in ds.batches(1, BATCH, 0)][:3]
    assert len(calls[0]) == 3
    for (x, y), (_, wx, wy) in zip(calls[0], want):
        np.testing.assert_array_equal(x, wx[: BATCH // 2])
        np.testing.assert_array_equal(y, wy[: BATCH // 2])


@pytest.mark.slow
def test_two_ranks_log_it_and_agree(bn_art, tmp_path):
    d = bn_art
    s = accelc.train(
        d / "art", "synthetic:128", epochs=1, batch_size=32, run_dir=tmp_path / "run", nproc=2, progress=False
    )
    (m,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (rec,) = [x for x in m["decisions"] if x["action"] == "recalibrate"]
    assert rec["batches"] == DEFAULT_RECALIBRATE and rec["images"] == DEFAULT_RECALIBRATE * 16
    assert m["ranks_agree"] and s["distributed"]["world_size"] == 2


def test_a_rank_without_batches_builds_nothing(bn_art):
    """Ranks other than 0 receive rank 0's statistics: they say whether there is anything to
    recalibrate (0 batches, or None without BatchNorm) without building the statistics graph."""
    sess = TrainingSession(bn_art / "art", ExecConfig(threads=1))
    exact = sess.artifacts
    assert sess.recalibrate_batchnorm(exact, iter(())) == 0
    assert sess._stats_of is None  # nothing built
    x = np.zeros((BATCH, *exact.info.input_shape), np.float32)
    assert sess.recalibrate_batchnorm(exact, [(x, None)]) == 1 and sess._stats_of is not None
    assert sess.recalibrate_batchnorm(exact, []) == 0
