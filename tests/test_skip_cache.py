"""skip's frozen-prefix cache (Egeria): where the cut stands, that the variant trained from the
cached activations computes what torch computes with the frozen prefix in evaluation mode (float64,
same weights and batch), and runs that cache, advance it layer by layer, respect its bounds and
resume."""

import json

import numpy as np
import pytest
import torch
from test_freezeout import _train as train_freezeout

import accelc
from accelc.compiler.artifact_dir import load_artifacts
from accelc.compiler.graph import training_graph
from accelc.passes.skip.cache import cut_variant, find_cut, prefix_model
from accelc.passes.skip.rewrite import skip_variant

from conftest import export_test_model, stopped_after


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """name -> (torch module, input shape, artifacts dir) for the zoo vgg and resnet, compiled with
    skip's freezeout rule."""
    d = tmp_path_factory.mktemp("cache")
    out = {}
    for name in ("vgg", "resnet"):
        m, shape = export_test_model(name, d / f"{name}.onnx")
        accelc.compile(d / f"{name}.onnx", d / name, passes=["skip"], pass_options={"skip": {"rule": "freezeout"}})
        out[name] = (m, shape, d / name)
    return out


def _cut(art, skip):
    pruned = skip_variant(art, skip)[0]
    return pruned, find_cut(pruned.training, art.eval, art.info.input_name, set(training_graph(pruned).params))


@pytest.mark.parametrize(
    "name, skip, cut, prefix",
    [
        # vgg: conv+BN layers 0 and 3 frozen: the cut is after the pool that follows them
        ("vgg", ["features.0", "features.3"], "/features/features.6/MaxPool_output_0", ["features"]),
        # resnet: the stem and the first block's first conv frozen: the cut cannot enter the block
        # (its shortcut reads the block's input), so it stands at the block's input
        ("resnet", ["stem", "layers.0.conv1"], None, ["stem", "bn"]),
    ],
)
def test_the_cut_variant_computes_what_torch_computes_with_the_prefix_in_eval_mode(zoo, name, skip, cut, prefix):
    from accelc.runtime.session import TrainingSession

    m, shape, path = zoo[name]
    art, _ = load_artifacts(path)
    pruned, t = _cut(art, skip)
    if cut is not None:
        assert t == cut
    v = cut_variant(pruned, t)
    assert v.train_input == t and v.training.graph.input[0].name == t
    assert art.info.input_name not in {i.name for i in v.training.graph.input}
    sess = TrainingSession(art)
    for k, p in sess.params.items():  # running statistics unlike any batch's: eval and train modes differ
        if k.endswith("running_var"):
            p.mul_(1.7)
        elif k.endswith("running_mean"):
            p.add_(0.2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, *shape)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    feats = sess.infer(prefix_model(art.eval, art.info.input_name, None, t, art.info.shapes(1)), x, t)
    sess.swap(v, "cut")
    loss, grads, _ = sess.compute_gradients(feats, y)
    ref = m.double()
    ref.load_state_dict({k: torch.from_numpy(a).double() for k, a in sess.param_arrays().items()}, strict=False)
    ref.train()
    ancestors = [mod for n, mod in ref.named_modules() if n.split(".")[0] in prefix]
    if name == "vgg":  # the Sequential's first 7 modules (conv, BN, ReLU twice, pool) precede the cut
        ancestors = list(ref.features)[:7]
    for mod in ancestors:
        mod.eval()
    frozen = {p for s in skip for p in _groups(art)[s]}
    for n, p in ref.named_parameters():
        p.requires_grad_(n not in frozen)
    lt = torch.nn.functional.cross_entropy(ref(torch.from_numpy(x).double()), torch.from_numpy(y))
    lt.backward()
    assert abs(loss - lt.item()) < 1e-5 * abs(lt.item())
    trained = {n: p.grad.numpy() for n, p in ref.named_parameters() if p.requires_grad}
    assert set(grads) == set(trained)
    for n, g in grads.items():
        r = trained[n]
        assert np.abs(g - r).max() <= 1e-4 * np.abs(r).max() + 1e-7, n


def _groups(art):
    from accelc.passes.skip.rewrite import layer_groups

    return layer_groups(training_graph(art))


def test_prefix_model_from_an_earlier_cut_equals_the_one_from_the_images(zoo):
    from accelc.runtime.session import TrainingSession

    _, shape, path = zoo["vgg"]
    art, _ = load_artifacts(path)
    _, a = _cut(art, ["features.0"])
    _, b = _cut(art, ["features.0", "features.3", "features.7"])
    shapes = art.info.shapes(1)
    sess = TrainingSession(art)
    x = np.random.default_rng(1).standard_normal((40, *shape)).astype(np.float32)
    fa = sess.infer(prefix_model(art.eval, art.info.input_name, None, a, shapes), x, a, chunk=16)
    step = prefix_model(art.eval, art.info.input_name, a, b, shapes)
    assert step.graph.input[0].name == a and "input" not in {i.name for i in step.graph.input}
    fb = sess.infer(step, fa, b, chunk=16)
    direct = sess.infer(prefix_model(art.eval, art.info.input_name, None, b, shapes), x, b)
    assert fb.shape == direct.shape == (40, *shapes[b][1:])
    np.testing.assert_allclose(fb, direct, rtol=1e-5, atol=1e-6)
    # a later tensor is not computed from an earlier one backwards
    assert prefix_model(art.eval, art.info.input_name, b, a, shapes) is None


def _train(path, run_dir, **kw):
    """A 4-epoch budget (256 synthetic images, batch 32, linear schedule) of the freezeout tests' run."""
    return train_freezeout(path, run_dir, epochs=4, **kw)


@pytest.fixture(scope="module")
def cached_art(tmp_path_factory, zoo):
    d = tmp_path_factory.mktemp("cached")
    out = {}
    for label, opts in {
        "on": {"cache_min_epochs": 0.5},
        "tiny": {"cache_mb": 0.5, "cache_min_epochs": 0.5},
        "off": {"cache": False},
    }.items():
        accelc.compile(
            zoo["vgg"][2].parent / "vgg.onnx",
            d / label,
            passes=["skip"],
            pass_options={"skip": {"rule": "freezeout", "t0": 0.25, **opts}},
        )
        out[label] = d / label
    return out


def test_a_run_caches_the_frozen_prefix_layer_by_layer(cached_art, tmp_path):
    s = _train(cached_art["on"], tmp_path / "on")
    rep = s["controllers"]["skip"]
    made = [e for e in rep["cache"] if not e.get("refused") and not e.get("skipped")]
    assert len(made) >= 3
    # the first conv's output is not worth caching: cheap to compute, 32 channels wide to store
    skipped = [e for e in rep["cache"] if e.get("skipped")]
    assert skipped and skipped[0]["tensor"] == "/features/features.2/Relu_output_0"
    assert skipped[0]["flop_per_byte"] < 32 <= min(d["flop_per_byte"] for d in s["decisions"] if d["action"] == "cache")
    assert any(d["action"] == "cache-skipped" for d in s["decisions"])
    assert made[0]["from"] == "images"
    for before, after in zip(made, made[1:]):  # each from the previous cut: only the layers between
        assert after["from"] == before["tensor"] and after["step"] > before["step"]
    steps = 4 * (256 // 32)
    for e in made:  # moved only while enough of the budget remained (0.5 epochs here)
        assert (1 - e["step"] / steps) * 4 >= 0.5
        assert e["mib"] == pytest.approx(256 * np.prod(e["shape"]) * 4 / 2**20)
    assert rep["cached_from"] == made[-1]["tensor"]
    cached = {k: v for k, v in rep["ms_per_step_by_skip_set"].items() if "[cached" in k}
    assert cached
    assert all(np.isfinite(m["train_loss"]) for m in s["history"])
    decisions = [d for d in s["decisions"] if d["action"] == "cache"]
    assert [d["tensor"] for d in decisions] == [e["tensor"] for e in made]
    # the cost model sees the forward leave the step too
    off = _train(cached_art["off"], tmp_path / "off")
    assert rep["epochs"][-1]["flops_per_step"] < off["controllers"]["skip"]["epochs"][-1]["flops_per_step"]
    assert off["controllers"]["skip"]["cache"] == []
    assert s["history"][0]["train_loss"] == off["history"][0]["train_loss"]  # nothing frozen in epoch 1


def test_a_cache_over_the_memory_bound_is_refused_with_its_size(cached_art, tmp_path):
    s = _train(cached_art["tiny"], tmp_path / "tiny")
    rep = s["controllers"]["skip"]
    refused = [d for d in s["decisions"] if d["action"] == "cache-refused"]
    assert refused and "MiB > --skip-cache-mb 0.5" in refused[0]["why"]
    made = [e for e in rep["cache"] if not e.get("refused") and not e.get("skipped")]
    assert all(e["mib"] <= 0.5 for e in made)  # only cuts that fit


def test_a_resumed_run_computes_the_cache_again_and_ends_alike(cached_art, tmp_path, monkeypatch):
    whole = _train(cached_art["on"], tmp_path / "whole")
    cut = stopped_after(monkeypatch, 3, lambda: _train(cached_art["on"], tmp_path / "split"))
    assert cut["controllers"]["skip"]["cached_from"]  # stopped with a cache in use
    resumed = _train(cached_art["on"], tmp_path / "split", resume=True)
    new = resumed["controllers"]["skip"]["cache"][len(cut["controllers"]["skip"]["cache"]) :]
    new = [e for e in new if "from" in e]
    assert new[0]["from"] == "images"  # made again from the restored parameters
    np.testing.assert_allclose(
        [m["test_loss"] for m in resumed["history"]], [m["test_loss"] for m in whole["history"]], rtol=1e-5
    )
    state = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert state["controllers"]["skip"]["cached_from"] == whole["controllers"]["skip"]["cached_from"]


@pytest.mark.parametrize("bad", [{"cut": 3}, {"cache_log": [1]}, {"cache_log": {}}])
def test_a_malformed_cache_state_is_refused_on_load(zoo, bad):
    from accelc.passes.skip.algorithm import LarsSkip

    art, _ = load_artifacts(zoo["vgg"][2])
    with pytest.raises((TypeError, ValueError)):
        LarsSkip(art, art.plan[0]).load_state_dict({"log": [], **bad})


def test_training_inputs_of_the_wrong_length_are_refused():
    """The loop takes a step's rows from what an algorithm says the variant trains on; an array
    with another number of rows than the training images is refused by name."""
    from types import SimpleNamespace

    from accelc.compiler.errors import AccelcError
    from accelc.runtime.algorithm import Algorithm
    from accelc.runtime.data import synthetic
    from accelc.runtime.engine import EngineBase, StepResult
    from accelc.runtime.spec import TrainSpec
    from accelc.runtime.train import Trainer

    root = SimpleNamespace(info=SimpleNamespace(input_shape=(1, 8, 8)))
    seen = []

    class Engine(EngineBase):
        artifacts = root

        def swap(self, artifacts, name, update=None):
            self.artifacts = artifacts

        def train_step(self, x, y):
            seen.append(np.asarray(x).copy())
            return StepResult(1.0, np.zeros((len(y), 10), np.float32))

        def evaluate_batch(self, x, y):
            return 1.0, np.zeros((len(y), 10), np.float32)

    class A(Algorithm):
        name = "feeds"

        def __init__(self, rows):
            super().__init__(None, {})
            self.rows = rows

        def training_inputs(self, state):
            return np.arange(self.rows * 3, dtype=np.float32).reshape(self.rows, 3)

    ds = synthetic((1, 8, 8), 10, 128, 32)
    spec = TrainSpec(run_dir=None, epochs=1, batch_size=32, progress=False)
    Trainer(spec, Engine(), ds, algorithms=[A(128)]).run()
    assert seen and all(x.shape == (32, 3) for x in seen)
    order = ds.order(0, 0)[:32]
    np.testing.assert_array_equal(seen[0][:, 0], order * 3)  # the batch's rows, in the data order
    with pytest.raises(AccelcError, match="feeds: its training inputs have 100 rows for 128 images"):
        Trainer(spec, Engine(), ds, algorithms=[A(100)]).run()
