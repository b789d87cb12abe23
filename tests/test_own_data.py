"""Own data and own models: ``accelc.train`` takes numpy arrays, torch tensors and torch
``Dataset``/``DataLoader`` objects; ``torch_module_for`` builds the torch eager baseline of any ONNX
model (onnx2torch) from the same initial weights.

Tolerances: data given as arrays is the data a spec gives, so training on it reproduces the spec's
run exactly (losses compared with ==). The torch baseline's first training step runs the same
model from the same weights in another engine: its loss agrees with ORT's to float32 rounding
(measured: identical or 1 ulp, relative difference <= 1.1e-7), checked at rtol 1e-6; a few steps
later (AdamW on both) still at rtol 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import accelc
from accelc.compiler.errors import InvalidType, InvalidValue
from accelc.compiler.model import load_model
from accelc.runtime import checkpoint as ckpt
from accelc.runtime.data import DataSource, in_memory_data, load_data

from conftest import assert_api_refused, export_test_model

SHAPE = (1, 28, 28)  # cnn3-small, 10 classes


def _arrays(n=160, n_test=64):
    ds = load_data(f"synthetic:{n}", SHAPE, 10, test_limit=n_test)
    return ds.x_train, ds.y_train, ds.x_test, ds.y_test


def _train(small_art, tmp_path, data, name="run", **kw):
    kw = dict(epochs=1, batch_size=32, run_dir=tmp_path / name, progress=False) | kw
    return accelc.train(small_art, data=data, **kw)


# ----------------------------------------------------------------------------- own data
def test_arrays_train_as_the_spec_does(small_art, tmp_path):
    """The arrays a spec builds, given as arrays, train to the same losses and accuracies."""
    spec = _train(small_art, tmp_path, "synthetic:160", "spec", test_limit=64)
    own = _train(small_art, tmp_path, _arrays(), "own")
    for a, b in zip(spec["history"], own["history"]):
        assert (a["train_loss"], a["test_loss"], a["test_acc"]) == (b["train_loss"], b["test_loss"], b["test_acc"])
    assert own["data"].startswith("arrays(sha256=") and own["data"].endswith("160+64 images)")
    fp = ckpt.read_meta(tmp_path / "own")["fingerprint"]
    assert fp["data"] == own["data"] and fp["train_images"] == 160


def test_torch_dataset_dataloader_and_tensors_are_the_same_data(small_art, tmp_path):
    xtr, ytr, xte, yte = _arrays()
    want = in_memory_data((xtr, ytr, xte, yte))
    t = [torch.from_numpy(a) for a in (xtr, ytr, xte, yte)]
    train_ds, test_ds = torch.utils.data.TensorDataset(t[0], t[1]), torch.utils.data.TensorDataset(t[2], t[3])
    loaders = (
        torch.utils.data.DataLoader(train_ds, batch_size=50),
        torch.utils.data.DataLoader(test_ds, batch_size=50),
    )
    forms = {
        "tensors": tuple(t),
        "datasets": (train_ds, test_ds),
        "loaders": loaders,
        "pairs": ((xtr, ytr), (xte, yte)),
        "dict": {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte},
    }
    for name, form in forms.items():
        got = in_memory_data(form)
        assert str(got) == str(want), name  # the same SHA-256: the same data
        np.testing.assert_array_equal(got.x_train, xtr)
        np.testing.assert_array_equal(got.y_test, yte)
    s = _train(small_art, tmp_path, (train_ds, test_ds))
    assert s["data"] == str(want) and s["epochs"] == 1


def test_resume_checks_the_arrays(small_art, tmp_path):
    data = _arrays()
    _train(small_art, tmp_path, data)
    s = _train(small_art, tmp_path, data, epochs=2, resume=True, allow_change=("epochs",))
    assert [h["epoch"] for h in s["history"]] == [1, 2]
    other = (data[0] + 0.5, *data[1:])
    msg = assert_api_refused(
        lambda: _train(small_art, tmp_path, other, epochs=3, resume=True, allow_change=("epochs",)), "--data arrays("
    )
    assert "this run has arrays(" in msg


def _triples(x, y):
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    return torch.utils.data.TensorDataset(tx, ty, ty)


def test_bad_arrays_refused(small_art, tmp_path):
    x, y, xt, yt = _arrays(64, 32)
    cases = [
        ((x.astype(np.uint8), y, xt, yt), "must hold floating-point images, got uint8 (scale it", InvalidValue),
        ((x[:, 0], y, xt, yt), "must be (N, C, H, W) images", InvalidValue),
        (
            (np.zeros((64, 3, 32, 32), np.float32), y, np.zeros((32, 3, 32, 32)), yt),
            "the model's input is (1, 28, 28)",
            InvalidValue,
        ),
        ((x, y + 5, xt, yt), "the model has 10 classes", None),
        ((x, y.astype(np.float32), xt, yt), "must hold integer class indices", InvalidValue),
        ((x, y[:10], xt, yt), "x_train has 64 images but y_train has 10 labels", InvalidValue),
        ((x[:0], y[:0], xt, yt), "x_train holds no images", InvalidValue),
        ((np.where(np.arange(64)[:, None, None, None] == 7, np.nan, x), y, xt, yt), "NaN or Inf (image 7)", None),
        ((x, y, np.zeros((32, 1, 14, 14), np.float32), yt), "x_test of shape (1, 14, 14)", InvalidValue),
        ((x, y, xt), "got 3 items", InvalidValue),
        ({"x_train": x, "y_train": y, "x_test": xt}, "lacks y_test", InvalidValue),
        ((x, y, xt, "labels"), "y_test must be a 1-D array", InvalidValue),
        (
            5,
            "--data must be synthetic[:N], fashion-mnist[:DIR], fashion-mnist-multiscale[:DIR] or imagefolder:DIR, "
            "or data given in Python",
            InvalidType,
        ),
        (torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), "give a test split too", None),
        ((_triples(x, y), (xt, yt)), "must yield (x, y) pairs; item 0 is tuple of 3", InvalidValue),
    ]
    for data, needle, kind in cases:
        assert_api_refused(lambda data=data: _train(small_art, tmp_path, data), needle, kind)
    assert_api_refused(lambda: _train(small_art, tmp_path, (x, y, xt, yt), nproc=2, batch_size=32), "nproc > 1")
    assert not (tmp_path / "run").exists()

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            raise OSError("disk gone")

    assert_api_refused(lambda: in_memory_data((Broken(), Broken())), "reading the train Dataset failed: OSError")


def test_in_memory_data_is_a_stable_description():
    data = in_memory_data(_arrays(64, 32))
    assert isinstance(data, DataSource) and data.in_memory and ":" not in data.describe()
    assert str(in_memory_data(_arrays(64, 32))) == str(data)
    import copy

    assert copy.deepcopy(data).x_train.shape == (64, *SHAPE)


# ----------------------------------------------------------------------------- own models in bench
def test_torch_baseline_of_a_user_onnx_model(tmp_path):
    """A user's ONNX model (MixedNet: BatchNorm, residual add, grouped and depthwise conv, average
    pooling) gets a torch module whose first training step has ORT's loss on the same batch."""
    from accelc.compiler.artifact_dir import load_artifacts
    from accelc.compiler.artifacts import optimizer_hyperparameters
    from accelc.runtime.session import TrainingSession
    from accelc.runtime.torch_engine import TorchSession
    from accelc.torch_baseline import check_same_loss, torch_module_for

    _, shape = export_test_model("mixed", tmp_path / "mixed.onnx")
    info = load_model(tmp_path / "mixed.onnx")
    accelc.compile(tmp_path / "mixed.onnx", tmp_path / "art")
    module = torch_module_for(tmp_path / "mixed.onnx", info)
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == info.param_count
    assert sorted(module.accelc_param_names.values()) == sorted(info.params)
    ort = TrainingSession(tmp_path / "art")
    ds = load_data("synthetic:96", shape, info.num_classes, test_limit=32)
    x, y = ds.x_train[:32], ds.y_train[:32]
    check = check_same_loss(module, ort, x, y)
    for mode in ("train", "eval"):
        assert check[mode]["torch_loss"] == pytest.approx(check[mode]["ort_loss"], rel=1e-6), mode
    eager = TorchSession(module, optimizer_hyperparameters(load_artifacts(tmp_path / "art")[0].optimizer), ort.lr)
    for step, xb, yb in ds.batches(0, 32, 0):
        a, b = ort.train_step(xb, yb).loss, eager.train_step(xb, yb).loss
        assert b == pytest.approx(a, rel=1e-6 if step == 0 else 1e-4), step
    # after the steps, evaluation (BatchNorm running statistics) agrees too
    assert eager.evaluate_batch(ds.x_test, ds.y_test)[0] == pytest.approx(
        ort.evaluate_batch(ds.x_test, ds.y_test)[0], rel=1e-4
    )


class DropNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(8 * 28 * 28, 10)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.conv(x))).flatten(1))


def test_torch_baseline_with_dropout(tmp_path):
    """Dropout exported for training has a mask output; the converted module keeps the whole batch
    (onnx2torch would index the batch's first image as the output otherwise) and, with random masks
    that differ between engines, the loss check compares evaluation mode only."""
    from accelc.runtime.session import TrainingSession
    from accelc.torch_baseline import check_same_loss, torch_module_for

    torch.manual_seed(0)
    accelc.export(DropNet(), torch.zeros(2, *SHAPE), tmp_path / "drop.onnx")
    accelc.compile(tmp_path / "drop.onnx", tmp_path / "art")
    module = torch_module_for(tmp_path / "drop.onnx")
    x, y, _, _ = _arrays(64, 32)
    assert module.train()(torch.from_numpy(x[:16])).shape == (16, 10)
    check = check_same_loss(module, TrainingSession(tmp_path / "art"), x[:16], y[:16])
    assert check["train"] is None and "Dropout" in check["train_skipped"]
    assert check["eval"]["torch_loss"] == pytest.approx(check["eval"]["ort_loss"], rel=1e-6)


class ScaledNet(torch.nn.Module):
    """A layer scale (a parameter used by Mul), which onnx2torch keeps as a constant buffer."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.gamma = torch.nn.Parameter(torch.full((4, 1, 1), 0.5))
        self.fc = torch.nn.Linear(4 * 28 * 28, 10)

    def forward(self, x):
        return self.fc((self.conv(x) * self.gamma).flatten(1))


def test_torch_baseline_trains_a_layer_scale(tmp_path):
    from accelc.compiler.artifact_dir import load_artifacts
    from accelc.compiler.artifacts import optimizer_hyperparameters
    from accelc.runtime.session import TrainingSession
    from accelc.runtime.torch_engine import TorchSession
    from accelc.torch_baseline import torch_module_for

    torch.manual_seed(0)
    accelc.export(ScaledNet(), torch.zeros(2, *SHAPE), tmp_path / "scaled.onnx")
    accelc.compile(tmp_path / "scaled.onnx", tmp_path / "art")
    module = torch_module_for(tmp_path / "scaled.onnx")
    assert "gamma" in module.accelc_param_names.values()
    ort = TrainingSession(tmp_path / "art")
    eager = TorchSession(module, optimizer_hyperparameters(load_artifacts(tmp_path / "art")[0].optimizer), ort.lr)
    x, y, _, _ = _arrays(64, 32)
    for i in range(0, 64, 16):
        assert eager.train_step(x[i : i + 16], y[i : i + 16]).loss == pytest.approx(
            ort.train_step(x[i : i + 16], y[i : i + 16]).loss, rel=1e-5
        )
    gamma = dict(module.named_parameters())[next(k for k, v in module.accelc_param_names.items() if v == "gamma")]
    np.testing.assert_allclose(gamma.detach().numpy(), ort.params["gamma"].numpy(), rtol=1e-5)
    assert not np.allclose(ort.params["gamma"].numpy(), 0.5)  # it trained


def test_torch_baseline_refusals(tmp_path):
    import onnx
    from onnx import helper

    from accelc.torch_baseline import torch_module_for

    export_test_model("cnn3-small", tmp_path / "m.onnx")
    m = onnx.load(tmp_path / "m.onnx")
    # a trainable initialiser read by two layers would become two torch parameters
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
    out = gemm.output[0]
    gemm.output[0] = "g0"
    twin = helper.make_node("Gemm", list(gemm.input), ["g1"], transB=1)
    m.graph.node.extend([twin, helper.make_node("Add", ["g0", "g1"], [out])])
    onnx.save(m, tmp_path / "tied.onnx")
    info = load_model(tmp_path / "tied.onnx")
    assert_api_refused(lambda: torch_module_for(tmp_path / "tied.onnx", info), "would train apart")


@pytest.mark.slow
def test_bench_torch_row_for_a_user_onnx_model(tmp_path):
    """``accelc bench --model my.onnx --configs torch,ort``: the torch configuration runs (no longer
    dropped) and its module's loss on the first batch equals ORT's."""
    from accelc import bench

    # no skip when the feature is missing: a bench that drops the torch row fails below
    export_test_model("mixed", tmp_path / "mixed.onnx")
    r = bench.run_bench(
        str(tmp_path / "mixed.onnx"), "synthetic:128", 1, ["torch", "ort"], tmp_path / "out", batch_size=32,
        test_limit=32, progress=False,
    )  # fmt: skip
    check = r["torch_baseline_check"]["train"]
    assert check["torch_loss"] == pytest.approx(check["ort_loss"], rel=1e-6)
    first = {c: r["configs"][c]["histories"][0][0]["train_loss"] for c in ("torch", "ort")}
    assert first["torch"] == pytest.approx(first["ort"], rel=1e-4)
