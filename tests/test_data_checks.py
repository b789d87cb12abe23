"""Issue 15, cause 4 (labels and data) and the dataset half of cause 7 (resources): every hostile
data file is one clear line naming it, labels are checked against the model's class count, and a
dataset too large for memory (a gzip bomb, ``synthetic:100000000``) is refused from its header
before anything large is read or generated."""

import gzip
import os
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest

from accelc.compiler.errors import AccelcError, InvalidType, InvalidValue
from accelc.runtime import data as D
from accelc.runtime.data import check_data, load_data

from conftest import SENTINEL_TEXT, assert_api_refused, assert_refused, run_cli

SHAPE = (1, 28, 28)


# ----------------------------------------------------------------------------- helpers
def idx_bytes(dims, body: bytes, code: int = 0x08, ndim: int | None = None) -> bytes:
    ndim = len(dims) if ndim is None else ndim
    return bytes([0, 0, code, ndim]) + b"".join(int(d).to_bytes(4, "big") for d in dims) + body


def write(path, data: bytes, gz: bool = True):
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


def name(stem, gz):
    return stem + (".gz" if gz else "")


def fashion_dir(d, n_train=20, n_test=5, labels_train=None, labels_test=None, gz=True, hw=(28, 28)):
    """A small valid IDX data set in ``d``; returns ``d``."""
    rng = np.random.default_rng(0)
    d.mkdir(exist_ok=True)
    for split, n, labels in (("train", n_train, labels_train), ("t10k", n_test, labels_test)):
        x = rng.integers(0, 256, (n, *hw), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8) if labels is None else np.asarray(labels, np.uint8)
        write(d / name(f"{split}-images-idx3-ubyte", gz), idx_bytes(x.shape, x.tobytes()), gz)
        write(d / name(f"{split}-labels-idx1-ubyte", gz), idx_bytes(y.shape, y.tobytes()), gz)
    return d


def write_gzip_bomb(path, dims, block=1 << 20):
    """A valid gzip IDX file of ``dims`` unsigned bytes, all zeros, built chunk by chunk: about 1 MB
    on disk per GiB inflated. After a full flush every block of zeros compresses to the same bytes,
    so one compressed block is written again and again (no GiB is ever held or compressed)."""
    header = bytes([0, 0, 8, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)
    total = int(np.prod(dims, dtype=object))
    zeros = bytes(block)
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    crc = zlib.crc32(header)
    with open(path, "wb") as fh:
        fh.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")
        fh.write(co.compress(header) + co.flush(zlib.Z_FULL_FLUSH))
        left, prev, reuse = total, None, False
        while left >= block:
            if not reuse:
                out = co.compress(zeros) + co.flush(zlib.Z_FULL_FLUSH)
                reuse, prev = out == prev, out
            fh.write(prev)
            crc = zlib.crc32(zeros, crc)
            left -= block
        fh.write(co.compress(bytes(left)) + co.flush())
        crc = zlib.crc32(bytes(left), crc)
        fh.write(struct.pack("<II", crc & 0xFFFFFFFF, (len(header) + total) & 0xFFFFFFFF))
    return path


def png_header_only(path, width, height):
    """A PNG whose header declares ``width`` x ``height`` (a decompression bomb's signature)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(bytes(width + 1) * 4)  # a few rows; the rest never comes
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def refused(spec, needle="", num_classes=10, kind=AccelcError, **kw):
    msg = assert_api_refused(lambda: load_data(spec, SHAPE, num_classes, **kw), needle, kind)
    assert SENTINEL_TEXT not in msg
    return msg


# ----------------------------------------------------------------------------- cause 4: labels
@pytest.mark.cause(4)
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
@pytest.mark.parametrize("bad", [10, 200, 255])
def test_label_out_of_range_is_refused_naming_file_and_index(tmp_path, gz, bad):
    labels = [0, 1, 2, bad] + [3] * 16
    d = fashion_dir(tmp_path / "d", labels_train=labels, gz=gz)
    msg = refused(f"fashion-mnist:{d}", f"has label {bad} (at index 3)")
    assert "train-labels-idx1-ubyte" in msg and "labels must be 0..9" in msg


@pytest.mark.cause(4)
def test_label_out_of_range_in_the_test_split_is_refused(tmp_path):
    d = fashion_dir(tmp_path / "d", labels_test=[0, 1, 12, 3, 4])
    refused(f"fashion-mnist:{d}", "t10k-labels-idx1-ubyte")


@pytest.mark.cause(4)
def test_labels_are_checked_against_the_model_classes(tmp_path):
    d = fashion_dir(tmp_path / "d", labels_train=[14] + [1] * 19)
    # a model with 16 outputs can learn label 14; one with 10 cannot
    ds = load_data(f"fashion-mnist:{d}", SHAPE, 16)
    assert ds.num_classes == 15 and ds.y_train[0] == 14
    refused(f"fashion-mnist:{d}", "has label 14")
    # a model with fewer outputs than Fashion-MNIST's classes is refused before anything is read
    refused(f"fashion-mnist:{d}", "Fashion-MNIST has 10 classes", num_classes=5)


@pytest.mark.cause(4)
def test_valid_fashion_mnist_loads_normalised_within_limits(tmp_path):
    for gz in (True, False):
        d = fashion_dir(tmp_path / f"d{gz}", gz=gz)
        ds = load_data(f"fashion-mnist:{d}", SHAPE, 10, train_limit=7, test_limit=3)
        assert ds.x_train.shape == (7, 1, 28, 28) and ds.x_test.shape == (3, 1, 28, 28)
        assert ds.y_train.dtype == np.int64 and ds.num_classes == 10
        assert abs(float(ds.x_train.mean())) < 1e-5


@pytest.mark.cause(4)
@pytest.mark.parametrize("n_labels", [19, 21])
def test_image_and_label_count_mismatch_is_refused(tmp_path, n_labels):
    d = fashion_dir(tmp_path / "d")
    y = np.zeros(n_labels, np.uint8)
    write(d / "train-labels-idx1-ubyte.gz", idx_bytes(y.shape, y.tobytes()))
    refused(f"fashion-mnist:{d}", f"holds 20 images but '{d / 'train-labels-idx1-ubyte.gz'}' holds {n_labels} labels")


# ----------------------------------------------------------------------------- cause 4: damaged IDX files
def _good_images(n=20):
    x = np.arange(n * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(n, 28, 28)
    return idx_bytes(x.shape, x.tobytes())


def _corrupt_gzip(d):
    blob = bytearray(gzip.compress(_good_images()))
    for i in range(30, 60):
        blob[i] ^= 0x5A
    return bytes(blob)


def _bad_crc(d):
    blob = bytearray(gzip.compress(_good_images()))
    blob[-8] ^= 0xFF  # the CRC32 in the trailer
    return bytes(blob)


HOSTILE_IMAGES = {
    # id: (bytes of train-images-idx3-ubyte[.gz] (already compressed when gz), gz, needle)
    "corrupt_gzip": (_corrupt_gzip, True, "gzip stream"),
    "bad_crc": (_bad_crc, True, "gzip stream"),
    "truncated_gzip": (lambda d: gzip.compress(_good_images())[:-40], True, "truncated"),
    "gz_name_not_gzip": (lambda d: _good_images(), True, "is named .gz but is not a gzip file"),
    "trailing_garbage_after_gzip": (
        lambda d: gzip.compress(_good_images()) + b"garbage!",
        True,
        "after its gzip stream",
    ),
    "dims_255": (lambda d: gzip.compress(idx_bytes([20] * 255, b"")), True, "has 255 dimensions"),
    "dtype_float32": (lambda d: gzip.compress(idx_bytes((20, 28, 28), b"", code=0x0D)), True, "holds float32 values"),
    "dtype_unknown": (lambda d: gzip.compress(idx_bytes((20, 28, 28), b"", code=0x41)), True, "unknown type code 0x41"),
    "bad_magic": (lambda d: gzip.compress(b"\x01\x02\x08\x03" + bytes(100)), True, "bad magic number"),
    "empty_file": (lambda d: b"", False, "bad magic number"),
    "images_1d": (lambda d: gzip.compress(idx_bytes((20 * 784,), bytes(20 * 784))), True, "has 1 dimension;"),
    "images_4d": (lambda d: gzip.compress(idx_bytes((20, 1, 28, 28), bytes(20 * 784))), True, "has 4 dimensions"),
    "header_ends_early": (lambda d: gzip.compress(bytes([0, 0, 8, 3, 0, 0])), True, "header ends early"),
    "zero_images": (lambda d: gzip.compress(idx_bytes((0, 28, 28), b"")), True, "holds no images"),
    "zero_width": (lambda d: gzip.compress(idx_bytes((20, 28, 0), b"")), True, "images of size 28x0"),
    "short_data_gz": (lambda d: gzip.compress(_good_images()[:-100]), True, "is truncated"),
    "short_data_plain": (lambda d: _good_images()[:-100], False, "is truncated"),
    "trailing_data_gz": (lambda d: gzip.compress(_good_images() + b"xx"), True, "has trailing data"),
    "trailing_data_plain": (lambda d: _good_images() + b"xx", False, "has trailing data"),
    "directory": (None, False, "not a regular file"),
}


@pytest.mark.cause(4)
@pytest.mark.parametrize("case", list(HOSTILE_IMAGES))
def test_hostile_idx_image_files_are_refused_naming_the_file(tmp_path, case):
    make, gz, needle = HOSTILE_IMAGES[case]
    d = fashion_dir(tmp_path / "d", gz=gz)
    target = d / name("train-images-idx3-ubyte", gz)
    target.unlink()
    if make is None:
        target.mkdir()
    else:
        target.write_bytes(make(d))
    msg = refused(f"fashion-mnist:{d}", needle)
    assert str(target) in msg


@pytest.mark.cause(4)
@pytest.mark.parametrize("case", ["labels_3d", "labels_dtype"])
def test_idx_labels_with_wrong_rank_or_dtype_are_refused(tmp_path, case):
    d = fashion_dir(tmp_path / "d")
    code, dims = (0x08, (20, 1, 1)) if case == "labels_3d" else (0x0C, (20,))
    write(d / "train-labels-idx1-ubyte.gz", idx_bytes(dims, bytes(20 * (4 if code == 0x0C else 1)), code=code))
    needle = "must be 1-D (N)" if case == "labels_3d" else "labels must be unsigned bytes"
    refused(f"fashion-mnist:{d}", needle)


@pytest.mark.cause(4)
def test_data_file_linked_outside_is_refused_without_echoing_it(tmp_path, sentinel):
    d = fashion_dir(tmp_path / "d", gz=False)
    (d / "train-images-idx3-ubyte").unlink()
    (d / "train-images-idx3-ubyte").symlink_to(sentinel)
    refused(f"fashion-mnist:{d}", "not an IDX file")
    d2 = fashion_dir(tmp_path / "d2", gz=True)
    (d2 / "train-images-idx3-ubyte.gz").unlink()
    (d2 / "train-images-idx3-ubyte.gz").symlink_to(sentinel)
    refused(f"fashion-mnist:{d2}", "not a gzip file")
    imgs = _folder(tmp_path / "imgs")
    (imgs / "a" / "link.png").symlink_to(sentinel)
    refused(f"imagefolder:{imgs}", "symbolic link out of the image folder")


@pytest.mark.cause(4)
def test_data_path_with_control_characters_is_escaped(tmp_path):
    d = fashion_dir(tmp_path / "evil\nname\x1b[31m", labels_train=[99] * 20)
    msg = refused(f"fashion-mnist:{d}", "has label 99")
    assert "\x1b" not in msg and "\\n" in msg


# ----------------------------------------------------------------------------- cause 4: image folders
def _folder(d, n=3):
    from PIL import Image

    for k, cls in enumerate(["a", "b"]):
        (d / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((10, 12, 3), 40 * k + i, np.uint8)).save(d / cls / f"{i}.png")
    return d


@pytest.mark.cause(4)
@pytest.mark.parametrize(
    "case,needle",
    [
        ("bomb_pil_limit", "too large to decode safely"),  # over PIL's own limit: DecompressionBombError
        ("bomb_pil_warning", "too large to decode safely"),  # PIL's warning zone, made an error
        ("bomb_our_limit", "over the limit of 50,000,000"),  # under PIL's limits, over ours
        ("garbage", "cannot read image"),
        ("truncated", "cannot read image"),
    ],
)
def test_hostile_imagefolder_images_are_refused_fast_naming_the_file(tmp_path, case, needle):
    d = _folder(tmp_path / "imgs")
    f = d / "b" / "zz.png"
    if case == "bomb_pil_limit":
        png_header_only(f, 100_000, 100_000)
    elif case == "bomb_pil_warning":
        png_header_only(f, 10_000, 10_000)
    elif case == "bomb_our_limit":
        png_header_only(f, 60_000, 1_000)
    elif case == "garbage":
        f.write_bytes(b"not an image at all" * 10)
    else:
        from PIL import Image

        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(f)
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    t = time.time()
    msg = refused(f"imagefolder:{d}", needle)
    assert str(f) in msg and time.time() - t < 5


@pytest.mark.cause(4)
def test_imagefolder_with_one_image_is_refused(tmp_path):
    from PIL import Image

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "imgs" / "a" / "0.png")
    refused(f"imagefolder:{tmp_path / 'imgs'}", "need at least 2")


# ----------------------------------------------------------------------------- cause 4 / 11: limits
@pytest.mark.cause(4)
@pytest.mark.parametrize(
    "kw,kind,needle",
    [
        ({"train_limit": 0}, InvalidValue, "--train-limit must be a positive"),
        ({"train_limit": -5}, InvalidValue, "--train-limit must be a positive"),
        ({"test_limit": 0}, InvalidValue, "--test-limit must be a positive"),
        ({"test_limit": -5}, InvalidValue, "--test-limit must be a positive"),
        ({"test_limit": True}, InvalidType, "--test-limit must be a positive integer, got"),
        ({"train_limit": "5"}, InvalidType, "--train-limit must be a positive integer, got"),
        ({"train_limit": 2.5}, InvalidType, "--train-limit must be a positive integer, got"),
    ],
)
def test_bad_train_and_test_limits_are_refused(kw, kind, needle):
    refused("synthetic:50", needle, kind=kind, **kw)


@pytest.mark.cause(4)
def test_malformed_data_specs_are_refused():
    refused("synthetic:abc", "needs an integer N", kind=InvalidValue)
    refused("synthetic:-3", "needs N > 0", kind=InvalidValue)
    refused("mnist", "unknown --data", kind=InvalidValue)
    assert_api_refused(lambda: load_data(5, SHAPE, 10), "--data must be a string", InvalidType)
    assert_api_refused(lambda: load_data("synthetic:10", (20,), 10), "(C, H, W) input")
    assert_api_refused(lambda: load_data("synthetic:10", SHAPE, 0), "class count")


# ----------------------------------------------------------------------------- cause 7: memory
def _bomb_dir(d, gib=1.0):
    """A data set whose training images are a valid gzip file of about 1 MB per GiB it inflates to."""
    d = fashion_dir(d)
    n = int(gib * (1 << 30)) // 784
    bomb = write_gzip_bomb(d / "train-images-idx3-ubyte.gz", (n, 28, 28))
    write_gzip_bomb(d / "train-labels-idx1-ubyte.gz", (n,))
    assert bomb.stat().st_size < gib * (3 << 20)
    return d


def _refused_cheaply(fn, needle):
    """Refused in under 2 s with under 16 MB allocated: decided from the header, nothing inflated."""
    tracemalloc.start()
    t = time.time()
    try:
        msg = assert_api_refused(fn, needle)
        elapsed, (_, peak) = time.time() - t, tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 2 and peak < 16 << 20, (elapsed, peak)
    return msg


@pytest.mark.cause(7)
def test_gzip_bomb_is_refused_from_its_header(tmp_path):
    """A gzip file of about 1 MB declaring 1 GiB of images: refused as a bomb from its sizes alone,
    whatever the memory limit."""
    d = _bomb_dir(tmp_path / "d")
    msg = _refused_cheaply(lambda: load_data(f"fashion-mnist:{d}", SHAPE, 10, memory_limit_gb=1000.0), "gzip bomb?")
    assert "train-images-idx3-ubyte.gz' would inflate from" in msg and "to 1024.0 MB" in msg


@pytest.mark.cause(7)
def test_idx_declared_size_over_memory_limit_is_refused_before_inflating(tmp_path, monkeypatch):
    """The main check: the size the IDX header declares against the memory limit, before inflating."""
    monkeypatch.setattr(D.idx, "MAX_GZIP_EXPANSION", 10**6)  # only the memory check left to refuse it
    d = _bomb_dir(tmp_path / "d")
    msg = _refused_cheaply(
        lambda: load_data(f"fashion-mnist:{d}", SHAPE, 10, memory_limit_gb=0.5), "over the limit of 512.0 MB"
    )
    assert "loading the IDX data" in msg and "--memory-limit" in msg


@pytest.mark.cause(7)
def test_idx_header_larger_than_gzip_can_hold_is_refused(tmp_path):
    d = fashion_dir(tmp_path / "d")
    write(d / "train-images-idx3-ubyte.gz", idx_bytes((1 << 24, 100, 100), bytes(1000)))
    refused(f"fashion-mnist:{d}", "more than a", memory_limit_gb=1000.0)


@pytest.mark.cause(7)
def test_gzip_within_limit_but_truncated_is_refused_after_bounded_reads(tmp_path):
    """Declared size within the limit but the stream is shorter: read in bounded chunks, then refused."""
    d = fashion_dir(tmp_path / "d")
    noise = np.random.default_rng(0).integers(0, 256, 200_000, np.uint8).tobytes()  # incompressible
    blob = gzip.compress(idx_bytes((50_000, 28, 28), noise))
    (d / "train-images-idx3-ubyte.gz").write_bytes(blob)
    write(d / "train-labels-idx1-ubyte.gz", idx_bytes((50_000,), bytes(50_000)))
    refused(f"fashion-mnist:{d}", "is truncated: its header declares 39200000 bytes of data, it holds fewer")


@pytest.mark.cause(7)
def test_train_limit_checks_only_kept_labels_but_verifies_the_file(tmp_path):
    d = fashion_dir(tmp_path / "d", n_train=200, labels_train=[1] * 199 + [250])
    # the label out of range is past the limit: not kept, so not an error; the file is still verified
    ds = load_data(f"fashion-mnist:{d}", SHAPE, 10, train_limit=50)
    assert len(ds.x_train) == 50
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_good_images(200))[:-30])
    refused(f"fashion-mnist:{d}", "truncated", train_limit=50)


@pytest.mark.cause(7)
@pytest.mark.parametrize("spec", ["synthetic:100000000", "synthetic:5000000000000"])
def test_synthetic_data_over_memory_limit_is_refused_fast(spec):
    t = time.time()
    msg = refused(spec, "generating synthetic data", memory_limit_gb=4.0)
    assert "over the limit of 4.0 GB" in msg and time.time() - t < 2


@pytest.mark.cause(7)
def test_synthetic_memory_estimate_bounds_the_real_peak():
    """The estimate is an upper bound of what generating really allocates (numpy allocations are
    traced), and not wildly above it."""
    shape, n, n_test = SHAPE, 2500, 500
    tracemalloc.start()
    try:
        D.synthetic(shape, 10, n, n_test)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    est = D._synthetic_bytes(shape, n, n_test)
    assert peak <= est <= 2 * peak, (peak, est)
    refused(f"synthetic:{n}", "generating synthetic data", memory_limit_gb=est / 2 / (1 << 30), test_limit=n_test)


@pytest.mark.cause(7)
def test_imagefolder_over_memory_limit_is_refused(tmp_path):
    d = _folder(tmp_path / "imgs")
    refused(f"imagefolder:{d}", "loading 6 images", memory_limit_gb=1e-6)


# ----------------------------------------------------------------------------- check_data (pre-flight)
@pytest.mark.cause(4)
def test_check_data_refuses_from_headers_without_decoding(tmp_path):
    """check_data: the same refusals from headers and labels alone, nothing decoded, nothing kept."""
    d = fashion_dir(tmp_path / "ok", n_train=300)
    assert check_data(f"fashion-mnist:{d}", SHAPE, 10, test_limit=2) is None
    # a damaged image body is load_data's to find; check_data reads image headers only
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_good_images(300))[:-40])
    assert check_data(f"fashion-mnist:{d}", SHAPE, 10) is None
    refused(f"fashion-mnist:{d}", "truncated")

    bad = fashion_dir(tmp_path / "labels", labels_train=[3] * 19 + [201])
    assert_api_refused(lambda: check_data(f"fashion-mnist:{bad}", SHAPE, 10), "has label 201 (at index 19)")
    assert_api_refused(lambda: check_data(f"fashion-mnist:{bad}", SHAPE, 10, train_limit=0), "--train-limit")
    assert_api_refused(
        lambda: check_data("synthetic:100000000", SHAPE, 10, memory_limit_gb=4.0), "generating synthetic data"
    )
    dims = fashion_dir(tmp_path / "dims")
    write(dims / "train-images-idx3-ubyte.gz", idx_bytes([20] * 255, b""))
    assert_api_refused(lambda: check_data(f"fashion-mnist:{dims}", SHAPE, 10), "has 255 dimensions")

    imgs = _folder(tmp_path / "imgs")
    assert check_data(f"imagefolder:{imgs}", SHAPE, 10) is None
    png_header_only(imgs / "a" / "bomb.png", 60_000, 1_000)
    assert_api_refused(lambda: check_data(f"imagefolder:{imgs}", SHAPE, 10), "over the limit of 50,000,000")
    assert_api_refused(lambda: check_data(f"imagefolder:{imgs}", SHAPE, 1), "has 2 classes; the model outputs 1")


@pytest.mark.cause(7)
def test_check_data_refuses_gzip_bomb_cheaply(tmp_path, monkeypatch):
    d = _bomb_dir(tmp_path / "d")
    _refused_cheaply(lambda: check_data(f"fashion-mnist:{d}", SHAPE, 10), "gzip bomb?")
    monkeypatch.setattr(D.idx, "MAX_GZIP_EXPANSION", 10**6)
    _refused_cheaply(lambda: check_data(f"fashion-mnist:{d}", SHAPE, 10, memory_limit_gb=0.5), "over the limit")


# ----------------------------------------------------------------------------- CLI (end to end)
@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from accelc.zoo import export_zoo

    d = tmp_path_factory.mktemp("art")
    export_zoo("cnn3-small", d / "m.onnx")
    r = run_cli("compile", d / "m.onnx", "-o", d / "art")
    assert r.returncode == 0, r.stderr
    return d / "art"


@pytest.mark.cause(4)
@pytest.mark.slow
def test_cli_train_refuses_label_out_of_range_in_one_line(tmp_path, artifacts):
    d = fashion_dir(tmp_path / "d", labels_train=[200] * 20)
    r = run_cli("train", artifacts, "--data", f"fashion-mnist:{d}", "--epochs", "1", "-o", tmp_path / "run")
    assert_refused(r, "has label 200 (at index 0)", out=tmp_path / "run")


@pytest.mark.cause(7)
@pytest.mark.slow
def test_cli_train_refuses_gzip_bomb_in_one_line(tmp_path, artifacts):
    d = _bomb_dir(tmp_path / "d")
    t = time.time()
    r = run_cli("train", artifacts, "--data", f"fashion-mnist:{d}", "--epochs", "1", "-o", tmp_path / "run")
    assert_refused(r, "gzip bomb?", out=tmp_path / "run")
    assert time.time() - t < 60


@pytest.mark.cause(4)
def test_data_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    from accelc.runtime.data import load_data

    d = tmp_path / "fm"
    d.mkdir()
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        os.mkfifo(d / name)
    with pytest.raises(AccelcError, match="not a regular file"):
        load_data(f"fashion-mnist:{d}", (1, 28, 28), 10)


@pytest.mark.cause(4)
@pytest.mark.parametrize("what", ["image", "class_folder"])
def test_imagefolder_symlink_out_of_the_folder_is_refused(tmp_path, sentinel, what):
    from PIL import Image

    from accelc.runtime.data import load_data

    outside = tmp_path / "elsewhere"
    (outside / "cls").mkdir(parents=True)
    for i in range(3):
        Image.new("L", (8, 8), 40 * i).save(outside / "cls" / f"{i}.png")
    d = tmp_path / "data"
    for c in ("a", "b"):
        (d / c).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 30 * i).save(d / c / f"{i}.png")
    if what == "image":
        (d / "a" / "x.png").symlink_to(outside / "cls" / "0.png")
    else:
        (d / "c").symlink_to(outside / "cls")
    with pytest.raises(AccelcError, match="symbolic link out of the image folder") as e:
        load_data(f"imagefolder:{d}", (1, 8, 8), 10)
    assert "\n" not in str(e.value)
