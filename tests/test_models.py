"""Constructs of torchvision's and timm's CNNs, each in a few lines of torch: they compile with the
default passes, train in accelc's runtime, and their gradients equal torch's (float64 judging
where float32 is ill-conditioned)."""

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import accelc
from accelc.compiler.artifact_dir import load_artifacts
from accelc.compiler.errors import AccelcError
from accelc.compiler.graph import TrainingGraph
from accelc.passes.reuse.rewrite import layer_settings
from accelc.runtime.session import TrainingSession

from conftest import off_gradients


class Fire(nn.Module):
    """SqueezeNet's fire module: Concat -> Conv (ORT's ConcatTraining has an int64 side output)."""

    def __init__(self, dropout=False):
        super().__init__()
        self.sq, self.e1, self.e3 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(16, 8, 3, padding=1)
        self.drop = nn.Dropout(0.5) if dropout else nn.Identity()
        self.fc1, self.fc2 = nn.Linear(8 * 8 * 8, 32), nn.Linear(32, 10)

    def forward(self, x):
        h = F.relu(self.sq(x))
        h = torch.cat([F.relu(self.e1(h)), F.relu(self.e3(h))], 1)
        h = self.drop(F.relu(self.c(h))).flatten(1)
        return self.fc2(self.drop(F.relu(self.fc1(h))))


class Mobile(nn.Module):
    """MobileNetV3 / ConvNeXt pieces: HardSwish, HardSigmoid gating, a channels-last LayerNorm, GELU
    and a layer scale (an nn.Parameter used through Mul)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.ln = nn.LayerNorm(8)
        self.gamma = nn.Parameter(torch.full((8, 1, 1), 0.5))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = F.hardswish(self.c1(x))
        h = F.hardsigmoid(self.c2(h)) * h
        h = self.ln(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * self.gamma
        return self.fc(F.gelu(h).mean((2, 3)))


def _export(module, tmp_path, shape=(3, 8, 8)):
    torch.manual_seed(0)
    accelc.export(module, torch.zeros(2, *shape), tmp_path / "m.onnx")
    return tmp_path / "m.onnx"


def _batch(shape=(3, 8, 8), n=4):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, *shape)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)


def _torch_grads(module, x, y, dtype):
    m = copy.deepcopy(module).train().to(dtype)
    loss = F.cross_entropy(m(torch.from_numpy(x).to(dtype)), torch.from_numpy(y))
    loss.backward()
    return float(loss), {k: p.grad.numpy() for k, p in m.named_parameters()}


def _check_gradients(module, art, x, y):
    loss, grads, _ = TrainingSession(art).compute_gradients(x, y)
    tloss, t32 = _torch_grads(module, x, y, torch.float32)
    assert abs(loss - tloss) <= 1e-4 * max(1.0, abs(tloss))
    assert set(grads) == set(t32)  # every parameter torch trains is trained
    assert not off_gradients(grads, t32, _torch_grads(module, x, y, torch.float64)[1])


def test_concat_feeding_a_conv_trains_in_the_segmented_executor(tmp_path):
    torch.manual_seed(0)
    module = Fire()
    accelc.compile(_export(module, tmp_path), tmp_path / "art")
    sess = TrainingSession(tmp_path / "art")
    assert sess.runner is not None  # convs on oneDNN between ORT segments, ConcatTraining inside one
    x, y = _batch()
    _check_gradients(module, tmp_path / "art", x, y)
    assert np.isfinite(sess.train_step(x, y).loss)


def test_active_dropout_does_not_fail_the_self_checks(tmp_path):
    """opt's and skip's self-checks run the graph before and after their rewrite: random ops are
    seeded alike on both sides, so dropout's masks agree."""
    path = _export(Fire(dropout=True), tmp_path)
    for passes in ([], ["skip"]):
        opts = {"skip": {"layers": "sq"}} if passes else None
        rep = accelc.compile(path, tmp_path / f"art{len(passes)}", passes=passes, pass_options=opts)
        assert all("self_check" in p["validation"] for p in rep["passes"])


def test_stochastic_depth_in_training_mode_compiles_and_trains(tmp_path):
    """timm's DropPath / torchvision's StochasticDepth export RandomUniformLike (no gradient needed:
    it reads only a shape), which ORT trains; the self-checks seed it alike on both sides."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            h = F.relu(self.c1(x))
            keep = (torch.rand_like(h[:, :1, :1, :1]) + 0.8).floor()  # DropPath, p = 0.2
            h = h + F.relu(self.c2(h)) * keep / 0.8
            return self.fc(h.mean((2, 3)))

    torch.manual_seed(0)
    path = _export(Block().train(), tmp_path)
    assert any(n.op_type == "RandomUniformLike" for n in onnx.load(path).graph.node)
    rep = accelc.compile(path, tmp_path / "art", passes=["skip"], pass_options={"skip": {"layers": "c1"}})
    assert all("self_check" in p["validation"] for p in rep["passes"])
    sess = TrainingSession(tmp_path / "art")
    x, y = _batch()
    assert all(np.isfinite(sess.train_step(x, y).loss) for _ in range(2))


def test_hardswish_hardsigmoid_layernorm_gelu_and_layer_scale(tmp_path):
    torch.manual_seed(0)
    module = Mobile()
    rep = accelc.compile(_export(module, tmp_path), tmp_path / "art")
    fixups = " ".join(rep["fixups"])
    assert "HardSwish" in fixups and "HardSigmoid" in fixups and "LayerNormalization" in fixups
    assert "gamma" in rep["model"]["params"] and not rep["warnings"]
    _check_gradients(module, tmp_path / "art", *_batch())


def test_a_parameter_the_export_lost_is_reported(tmp_path):
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.spare, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 4), nn.Linear(4, 10)

        def forward(self, x):
            return self.fc(self.c(x).mean((2, 3)))

    rep = accelc.compile(_export(Unused(), tmp_path), tmp_path / "art")
    assert any("spare.weight" in w and "will not train" in w for w in rep["warnings"])


def test_an_op_ort_cannot_differentiate_is_named(tmp_path):
    class Rounding(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 10)

        def forward(self, x):
            return self.fc(torch.round(self.c(x)).mean((2, 3)))

    with pytest.raises(AccelcError, match="cannot differentiate op 'Round'"):
        accelc.compile(_export(Rounding(), tmp_path), tmp_path / "art")


@pytest.mark.parametrize("head", ["global_pool", "flatten_dropout"])
def test_rescale_heads(head, tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 8, 5, padding=2)
            self.drop = nn.Dropout()
            self.fc = nn.Linear(8 if head == "global_pool" else 8 * 8 * 8, 10)

        def forward(self, x):
            h = F.relu(self.c(x))
            if head == "global_pool":
                return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))
            return self.fc(self.drop(F.max_pool2d(h, 2).flatten(1)))

    kernel = {"rescale": {"mode": "kernel"}}  # the kernel mode resamples the head
    rep = accelc.compile(
        _export(Net(), tmp_path, (3, 16, 16)), tmp_path / "art", passes=["rescale"], pass_options=kernel
    )
    art, _ = load_artifacts(tmp_path / "art")
    assert art.stages["stage-low"].info.input_shape == (3, 8, 8)
    params = rep["plan"][0]["params"]
    assert ("fc.weight" in params) == (head == "flatten_dropout")  # a global-pooling head needs nothing


def test_export_keeps_the_state_dict_metadata(tmp_path):
    """torchvision's MNASNet reads its version from state_dict()._metadata when loaded back."""

    class Versioned(nn.Module):
        _version = 2

        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 10)

        def forward(self, x):
            return self.fc(self.c(x).mean((2, 3)))

        def _load_from_state_dict(self, state, prefix, local_metadata, *args):
            if local_metadata.get("version") not in (1, 2):
                raise ValueError("version should be set to 1 or 2")
            super()._load_from_state_dict(state, prefix, local_metadata, *args)

    assert _export(Versioned(), tmp_path).exists()


def test_reuse_leaves_a_layer_of_unknown_input_size_exact(tmp_path):
    torch.manual_seed(0)
    accelc.compile(_export(Fire(), tmp_path), tmp_path / "art", opt=False)
    art, _ = load_artifacts(tmp_path / "art")
    known = TrainingGraph(art.training, art.info.shapes(64))
    unknown = TrainingGraph(art.training, {})  # as if the sizes were known only at run time
    assert set(layer_settings(known, None, 144, 8, "image", "exact", 0)) == {"e1", "e3", "c"}
    assert layer_settings(unknown, None, 144, 8, "image", "exact", 0) == {}
    with pytest.raises(AccelcError, match="known only at run time"):
        layer_settings(unknown, ["c"], 144, 8, "image", "exact", 0)


def test_batchnorm_step_moves_only_running_statistics(tmp_path):
    """The remedy for BatchNorm statistics gathered under another variant (e.g. reused convs):
    forward+backward passes that move the running statistics and nothing else."""
    from accelc.zoo import export_zoo

    export_zoo("vgg", tmp_path / "m.onnx")
    accelc.compile(tmp_path / "m.onnx", tmp_path / "art")
    sess = TrainingSession(tmp_path / "art")
    before = sess.param_arrays()
    sess.batchnorm_step(*_batch((1, 28, 28), 8))
    after = sess.param_arrays()
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all("running_" in k for k in changed), changed
