"""``--data fashion-mnist-multiscale[:DIR]``: 64×64 canvases of one to three Fashion-MNIST items at
scales 0.5-1.5×, labelled by the largest; deterministic, limit-independent, each split composed
from its own IDX file only, read as untrusted like fashion-mnist."""

import json
import os
import time

import numpy as np
import pytest
from test_data_checks import fashion_dir, idx_bytes, write

from accelc.compiler.errors import AccelcError, InvalidValue
from accelc.runtime.data import Layout, check_data, compose, layout, load_data
from accelc.runtime.data.idx import FASHION_DIR

from conftest import assert_api_refused, assert_refused, run_cli

SHAPE = (1, 64, 64)
SPEC = "fashion-mnist-multiscale"


def constant_dir(d, n_train=40, n_test=12, hw=(28, 28)):
    """An IDX set whose image i is filled with one value: (i % 200 + 20) in the training file,
    (i % 30 + 225) in the test file, so every canvas pixel tells which split it came from."""
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for split, n, base, mod in (("train", n_train, 20, 200), ("t10k", n_test, 225, 30)):
        x = np.broadcast_to((np.arange(n) % mod + base).astype(np.uint8)[:, None, None], (n, *hw)).copy()
        y = rng.integers(0, 10, n, dtype=np.uint8)
        write(d / f"{split}-images-idx3-ubyte.gz", idx_bytes(x.shape, x.tobytes()))
        write(d / f"{split}-labels-idx1-ubyte.gz", idx_bytes(y.shape, y.tobytes()))
    return d


# ----------------------------------------------------------------------------- the layout
def test_layout_items_sizes_positions_and_labels():
    n = 5000
    lay = layout(n, (28, 28), "train")
    assert lay.items.shape == (n, 3) and lay.size.shape == lay.pos.shape == (n, 3, 2)
    assert (lay.items[:, 0] == np.arange(n)).all()  # item 0 is the canvas's own source image
    used = lay.items >= 0
    assert set(lay.count.tolist()) == {1, 2, 3} and used[:, 0].all()
    assert (used[:, 2] <= used[:, 1]).all()  # slots fill in order
    assert (lay.items[used] < n).all()
    s = lay.size[used]
    assert s.min() == 14 and s.max() == 42 and (s[:, 0] == s[:, 1]).all()  # 0.5x..1.5x of 28 px, square
    p = lay.pos[used]
    assert p.min() >= 0 and (p + s).max() <= 64  # fully inside the canvas
    # the label is the class of the largest item, a tie going to the first pasted
    y = np.random.default_rng(0).integers(0, 10, n)
    area = np.where(used, lay.size[..., 0] * lay.size[..., 1], -1)
    for i in range(n):
        best = max(range(3), key=lambda k: (area[i, k], -k))
        assert lay.largest[i] == best
        assert lay.labels(y)[i] == y[lay.items[i, best]]
    assert (area.max(axis=1) == area[np.arange(n), lay.largest]).all()


def test_layout_is_fixed_per_split_and_independent_of_the_rows_built():
    a, b = layout(600, (28, 28), "train"), layout(600, (28, 28), "train")
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("items", "size", "pos"))
    t = layout(600, (28, 28), "test")
    assert not np.array_equal(a.size, t.size)  # each split its own seed
    x = np.random.default_rng(0).integers(0, 256, (600, 28, 28), dtype=np.uint8)
    full = compose(x, a)
    assert np.array_equal(compose(x, a, np.arange(50)), full[:50])
    assert np.array_equal(compose(x, a, [7, 3, 599]), full[[7, 3, 599]])


def test_tie_goes_to_the_first_pasted_and_overlaps_take_the_max():
    """A hand-made layout: two 20-px items of equal area overlapping, a smaller one on top."""
    items = np.array([[0, 1, 2]])
    size = np.array([[[20, 20], [20, 20], [10, 10]]])
    pos = np.array([[[0, 0], [10, 10], [15, 15]]])
    lay = Layout(items, size, pos)
    assert lay.largest.tolist() == [0] and lay.labels(np.array([4, 7, 9])).tolist() == [4]
    lay2 = Layout(np.array([[1, 0, 2]]), size, pos)
    assert lay2.labels(np.array([4, 7, 9])).tolist() == [7]  # the order decides, not the index
    x = np.stack([np.full((10, 10), v, np.uint8) for v in (100, 200, 50)])  # 10-px sources
    c = compose(x, lay)[0, 0] * 255
    assert np.allclose(c[0:10, 0:10], 100) and np.allclose(c[20:30, 20:30], 200)
    assert np.allclose(c[15:20, 15:20], 200)  # max(100, 200, 50), whatever the order
    assert np.allclose(c[10:15, 10:20], 200) and c[30:, :].max() == 0 and c[:, 30:].max() == 0


def test_layout_refuses_sources_too_large_for_the_canvas():
    with pytest.raises(ValueError, match="at most 42x42"):
        layout(10, (43, 28))


# ----------------------------------------------------------------------------- loading
def test_load_shapes_dtype_range_and_determinism(tmp_path):
    d = fashion_dir(tmp_path / "d", n_train=60, n_test=16)
    ds = load_data(f"{SPEC}:{d}", SHAPE, 10)
    assert ds.name == SPEC and ds.num_classes == 10
    assert ds.x_train.shape == (60, 1, 64, 64) and ds.x_test.shape == (16, 1, 64, 64)
    assert ds.x_train.dtype == ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == np.int64 and np.isfinite(ds.x_train).all()
    assert abs(float(ds.x_train.mean())) < 1e-4 and abs(float(ds.x_train.std()) - 1) < 1e-3  # normalised
    again = load_data(f"{SPEC}:{d}", SHAPE, 10)
    assert np.array_equal(ds.x_train, again.x_train) and np.array_equal(ds.x_test, again.x_test)
    assert np.array_equal(ds.y_train, again.y_train) and np.array_equal(ds.y_test, again.y_test)
    # the labels are the layout's, from the source labels
    from accelc.runtime.data.idx import fashion_mnist

    _, ytr, _, yte = fashion_mnist(str(d))
    assert np.array_equal(ds.y_train, layout(60, (28, 28), "train").labels(ytr))
    assert np.array_equal(ds.y_test, layout(16, (28, 28), "test").labels(yte))
    # another model input: fitted like fashion-mnist (resized, channel replicated)
    small = load_data(f"{SPEC}:{d}", (3, 32, 32), 10, train_limit=8)
    assert small.x_train.shape == (8, 3, 32, 32) and np.array_equal(small.y_train, ds.y_train[:8])


def _unnormalised(x):
    """Images up to the loader's affine normalisation: (x - min) / (max - min) over the array."""
    return (x - x.min()) / (x.max() - x.min())


def test_canvas_i_does_not_depend_on_the_limits_or_the_validation_split(tmp_path):
    d = fashion_dir(tmp_path / "d", n_train=50, n_test=20)
    full = load_data(f"{SPEC}:{d}", SHAPE, 10)
    part = load_data(f"{SPEC}:{d}", SHAPE, 10, train_limit=12, test_limit=5)
    assert np.array_equal(part.y_train, full.y_train[:12]) and np.array_equal(part.y_test, full.y_test[:5])
    # the same canvases, normalised with other statistics: equal up to an affine map
    both = np.concatenate([part.x_train, part.x_test])
    ref = np.concatenate([full.x_train[:12], full.x_test[:5]])
    assert np.allclose(_unnormalised(both), _unnormalised(ref), atol=1e-5)
    val = load_data(f"{SPEC}:{d}", SHAPE, 10, train_limit=10, val_split=15)
    assert len(val.x_train) == 10 and len(val.x_val) == 15
    assert np.array_equal(val.y_val, full.y_train[35:]) and np.array_equal(val.y_train, full.y_train[:10])
    assert np.allclose(_unnormalised(val.x_val), _unnormalised(full.x_train[35:]), atol=1e-5)


def test_each_split_is_composed_from_its_own_file_only(tmp_path):
    """Training image i is filled with 20 + i, test image i with 225 + i (constant images, which
    resizing keeps constant): every pixel of a canvas names the split and image it came from."""
    d = constant_dir(tmp_path / "d")
    tr, te = layout(40, (28, 28), "train"), layout(12, (28, 28), "test")
    assert tr.items.max() < 40 and te.items.max() < 12
    from accelc.runtime.data.idx import fashion_mnist

    xtr, _, xte, _ = fashion_mnist(str(d))
    ctr = np.round(compose((xtr[:, 0] * 255).round().astype(np.uint8), tr) * 255)
    cte = np.round(compose((xte[:, 0] * 255).round().astype(np.uint8), te) * 255)
    vtr, vte = set(np.unique(ctr).tolist()) - {0.0}, set(np.unique(cte).tolist()) - {0.0}
    assert vtr <= set(range(20, 60)) and len(vtr) > 30  # training images 0..39 only
    assert vte <= set(range(225, 237)) and len(vte) > 8  # test images 0..11 only
    # the loader builds these canvases (one normalisation, with the training statistics, for both)
    ds = load_data(f"{SPEC}:{d}", SHAPE, 10)
    got = _unnormalised(np.concatenate([ds.x_train, ds.x_test]))
    assert np.allclose(got, _unnormalised(np.concatenate([ctr, cte])), atol=1e-5)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "spec, needle, kind",
    [
        (f"{SPEC}:", f"--data {SPEC}:DIR needs a folder", InvalidValue),
        (f"{SPEC}: ", f"--data {SPEC}:DIR needs a folder", InvalidValue),
        (f"{SPEC}:/nonexistent/ms", "Fashion-MNIST folder '/nonexistent/ms' not found", AccelcError),
    ],
)
def test_bad_specs_are_one_clear_line(spec, needle, kind):
    msg = assert_api_refused(lambda: load_data(spec, SHAPE, 10), needle, kind)
    assert_api_refused(lambda: check_data(spec, SHAPE, 10), needle, kind)
    if "not found" in msg:
        assert f"--data {SPEC}:DIR" in msg


def test_api_form_check_knows_the_kind():
    from accelc.compiler import checks

    assert checks.data_spec("--data", SPEC) == SPEC and checks.data_spec("--data", f"{SPEC}:/x") == f"{SPEC}:/x"
    assert_api_refused(lambda: checks.data_spec("--data", f"{SPEC}:"), "needs a folder", InvalidValue)
    msg = assert_api_refused(lambda: checks.data_spec("--data", "mnist"), "unknown --data", InvalidValue)
    assert "fashion-mnist-multiscale[:DIR]" in msg


def test_damaged_files_labels_sizes_and_memory_are_refused(tmp_path):
    d = fashion_dir(tmp_path / "bad", labels_train=[0, 1, 12] + [3] * 17)
    msg = assert_api_refused(lambda: check_data(f"{SPEC}:{d}", SHAPE, 10), "has label 12 (at index 2)")
    assert "train-labels-idx1-ubyte" in msg
    big = fashion_dir(tmp_path / "big", hw=(50, 50))
    assert_api_refused(lambda: load_data(f"{SPEC}:{big}", SHAPE, 10), "must be at most 42x42")
    d2 = fashion_dir(tmp_path / "trunc")
    p = d2 / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:40])
    assert_api_refused(lambda: load_data(f"{SPEC}:{d2}", SHAPE, 10), "t10k-images-idx3-ubyte.gz")
    ok = fashion_dir(tmp_path / "ok")
    assert_api_refused(
        lambda: load_data(f"{SPEC}:{ok}", SHAPE, 10, memory_limit_gb=1e-4), "over the limit", InvalidValue
    )
    assert_api_refused(lambda: load_data(f"{SPEC}:{ok}", SHAPE, 5), "Fashion-MNIST has 10 classes")


# ----------------------------------------------------------------------------- the real data
HAVE_FASHION = os.path.isfile(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")) or os.path.isfile(
    os.path.join(FASHION_DIR, "train-images-idx3-ubyte")
)


@pytest.mark.skipif(not HAVE_FASHION, reason="Fashion-MNIST not installed")
def test_real_fashion_mnist_small_limits_are_fast():
    t = time.perf_counter()
    ds = load_data(SPEC, SHAPE, 10, train_limit=500, test_limit=100)
    assert time.perf_counter() - t < 30
    assert ds.x_train.shape == (500, 1, 64, 64) and ds.x_test.shape == (100, 1, 64, 64)
    assert len(set(ds.y_train.tolist())) == 10


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FASHION, reason="Fashion-MNIST not installed")
def test_cli_train_on_a_64px_model(tmp_path):
    import accelc
    from accelc.zoo import export_zoo

    export_zoo("largekernel", tmp_path / "m.onnx", (1, 64, 64))
    accelc.compile(tmp_path / "m.onnx", tmp_path / "art")
    args = ["--data", SPEC, "--train-limit", 256, "--test-limit", 64, "--epochs", 1, "--layout", "nchw"]
    r = run_cli("train", tmp_path / "art", *args, "-o", tmp_path / "run")  # nchw: no layout timing
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["data"] == SPEC and s["epochs"] == 1
    bad = run_cli("train", tmp_path / "art", "--data", f"{SPEC}:", "-o", tmp_path / "run2")
    assert_refused(bad, "needs a folder", out=tmp_path / "run2")
