"""Hostile inputs of round 3 (issue 32, section 4): unbounded inputs (a FIFO as a config file, an
endless IterableDataset), raw exceptions and internal errors (an astronomic --memory-limit, a
symbolic-link loop, the hidden --supervised-by flag, unusual torch tensors and __len__ in data
given in Python, accelc.export into a missing folder / onto a folder / of a module returning a
tuple, Ctrl-C during start-up imports, a node name with a newline), --nproc with --in-process, a
character device called "empty", and a bench configuration that takes a reserved name."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import accelc
from accelc.compiler.errors import InvalidValue

from conftest import ACCELC, assert_api_refused, assert_refused, run_cli

SHAPE = (1, 28, 28)  # cnn3-small's input (the small_art fixture)


def _arrays(n=64, m=32, seed=0):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((n, *SHAPE)).astype(np.float32))
    xt = torch.from_numpy(rng.standard_normal((m, *SHAPE)).astype(np.float32))
    return x, torch.from_numpy(rng.integers(0, 10, n)), xt, torch.from_numpy(rng.integers(0, 10, m))


def _symlink_loop(d: Path) -> Path:
    (d / "loop-b").symlink_to(d / "loop-a")
    (d / "loop-a").symlink_to(d / "loop-b")
    return d / "loop-a"


# ----------------------------------------------------------------------------- unbounded inputs
@pytest.mark.slow
def test_bench_config_file_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "configs.json"
    os.mkfifo(fifo)
    r = run_cli("bench", "--config-file", fifo, "-o", tmp_path / "out", timeout=60)
    assert_refused(r, "is not a regular file", out=tmp_path / "out")


def test_bench_config_file_must_be_a_small_regular_file(tmp_path):
    from accelc.bench import parse_configs

    assert_api_refused(lambda: parse_configs(None, None, "/dev/zero"), "is not a regular file")
    big = tmp_path / "big.json"
    big.write_text('{"configs": ["ort"]}' + " " * (1 << 20))
    assert_api_refused(lambda: parse_configs(None, None, big), "larger than 1 MiB")
    ok = tmp_path / "ok.json"
    ok.write_text('{"configs": ["ort"]}')
    assert list(parse_configs(None, None, ok)) == ["ort"]


class _Endless(torch.utils.data.IterableDataset):
    """Yields (image, label) forever; a safety stop far past any bound keeps a broken test finite."""

    def __init__(self, stop=20_000):
        self.stop, self.read = stop, 0

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            self.read += 1
            if self.read > self.stop:
                raise RuntimeError("read far past any bound")
            yield torch.rand(SHAPE, generator=g), int(torch.randint(0, 10, (1,), generator=g))


def test_endless_iterable_dataset_is_refused_at_the_documented_bound(monkeypatch):
    from accelc.runtime import data

    monkeypatch.setattr(data.arrays, "MAX_STREAM_SAMPLES", 500)
    x, y, xt, yt = _arrays()
    train = _Endless()
    msg = assert_api_refused(
        lambda: data.in_memory_data((train, torch.utils.data.TensorDataset(xt, yt))), "without ending", InvalidValue
    )
    assert "500" in msg and "train_limit" in msg, msg
    assert train.read <= 502  # stopped at the bound, not read on
    # the same through a DataLoader (batches: the bound counts samples)
    loader = torch.utils.data.DataLoader(_Endless(), batch_size=50)
    assert_api_refused(lambda: data.in_memory_data((loader, (xt, yt))), "without ending", InvalidValue)


def test_endless_iterable_dataset_with_train_limit_reads_only_that_many(small_art, tmp_path):
    x, y, xt, yt = _arrays()
    train = _Endless()
    s = accelc.train(
        small_art,
        data=(train, torch.utils.data.TensorDataset(xt, yt)),
        epochs=1,
        batch_size=32,
        run_dir=tmp_path / "run",
        train_limit=64,
        progress=False,
    )
    assert s["final_test_acc"] >= 0 and train.read <= 65


def test_iterable_dataset_with_len_is_read_by_iteration_and_held_to_it(monkeypatch):
    from accelc.runtime import data

    x, y, xt, yt = _arrays()

    class Sized(torch.utils.data.IterableDataset):
        def __init__(self, n, really):
            self.n, self.really = n, really

        def __len__(self):
            return self.n

        def __iter__(self):
            return iter([(x[i], y[i]) for i in range(self.really)])

    d = data.in_memory_data((Sized(64, 64), (xt, yt)))
    assert d.x_train.shape == (64, *SHAPE)
    assert_api_refused(lambda: data.in_memory_data((Sized(10, 64), (xt, yt))), "more than its __len__ (10)")


# ----------------------------------------------------------------------------- raw exceptions
def test_memory_limit_beyond_any_machine_is_refused(tmp_path):
    from accelc.zoo import export_zoo

    m = export_zoo("cnn3-small", tmp_path / "m.onnx")
    for value in (1e300, 1e308, 2e12):
        assert_api_refused(
            lambda v=value: accelc.compile(m, tmp_path / "art", memory_limit_gb=v), "--memory-limit", InvalidValue
        )
    assert not (tmp_path / "art").exists()
    assert_api_refused(lambda: export_zoo("cnn3-small", tmp_path / "x.onnx", memory_limit_gb=1e300), "--memory-limit")


@pytest.mark.slow
def test_memory_limit_beyond_any_machine_is_one_line(tmp_path):
    from accelc.zoo import export_zoo

    m = export_zoo("cnn3-small", tmp_path / "m.onnx")
    assert_refused(run_cli("compile", m, "-o", tmp_path / "art", "--memory-limit", "1e300"), "--memory-limit")
    assert_refused(run_cli("view", m, "--port", "0", "--memory-limit", "1e300"), "--memory-limit")


def test_symlink_loop_as_model_or_output_is_refused(tmp_path):
    from accelc.zoo import export_zoo

    m = export_zoo("cnn3-small", tmp_path / "m.onnx")
    loop = _symlink_loop(tmp_path)
    assert_api_refused(lambda: accelc.compile(loop, tmp_path / "art"), "symbolic link loop")
    assert_api_refused(lambda: accelc.compile(m, loop), "symbolic link loop")
    assert_api_refused(lambda: accelc.compile(m, loop / "art"), "symbolic link loop")
    assert_api_refused(lambda: accelc.inspect(loop), "symbolic link loop")
    assert not (tmp_path / "art").exists()


@pytest.mark.slow
def test_symlink_loop_model_path_is_one_line(tmp_path):
    loop = _symlink_loop(tmp_path)
    assert_refused(run_cli("compile", loop, "-o", tmp_path / "art"), "symbolic link loop", out=tmp_path / "art")


@pytest.mark.slow
def test_hidden_supervised_by_flag_given_by_a_user_is_refused(small_art, tmp_path):
    for extra in (["--in-process"], []):
        r = run_cli(
            "train", small_art, "--data", "synthetic:64", "--epochs", "1", "-o", tmp_path / "run",
            "--supervised-by", "1", *extra,
        )  # fmt: skip
        assert_refused(r, "--supervised-by", out=tmp_path / "run")


def test_train_data_as_unusual_torch_tensors_is_one_line(small_art, tmp_path):
    x, y, xt, yt = _arrays()

    def train(data):
        return lambda: accelc.train(small_art, data=data, epochs=1, batch_size=32, run_dir=tmp_path / "run")

    nested = torch.nested.nested_tensor([x[0], x[1]])
    quant = torch.quantize_per_tensor(x, 0.1, 0, torch.quint8)
    for data, needle in (
        ((x.to_sparse(), y, xt, yt), "x_train is a sparse tensor"),
        ((x, y, xt.reshape(32, -1).to_sparse_csr(), yt), "x_test is a sparse tensor"),
        ((x.to("meta"), y, xt, yt), "x_train is on the meta device"),
        ((x, y, xt, yt.to("meta")), "y_test is on the meta device"),
        ((nested, y[:2], xt, yt), "x_train is a nested tensor"),
        ((quant, y, xt, yt), "x_train is a quantized tensor"),
        ((x, y.bfloat16(), xt, yt), "y_train must hold integer class indices, got torch.bfloat16"),
        (((nested, y[:2]), (xt, yt)), "x_train is a nested tensor"),
    ):
        assert_api_refused(train(data), needle, InvalidValue)

    class NegativeLen(torch.utils.data.Dataset):
        def __len__(self):
            return -1

        def __getitem__(self, i):
            return x[0], 0

    assert_api_refused(train((NegativeLen(), (xt, yt))), "__len__")
    assert not (tmp_path / "run").exists()
    # bf16 images are images: used as float32 (bf16 converts exactly), as float16 ones are
    s = accelc.train(small_art, data=(x.bfloat16(), y, xt, yt), epochs=1, batch_size=32, run_dir=tmp_path / "run",
                     progress=False)  # fmt: skip
    assert s["final_test_acc"] >= 0


class _Head(nn.Module):
    def __init__(self, pair=False):
        super().__init__()
        self.fc, self.pair = nn.Linear(int(np.prod(SHAPE)), 10), pair

    def forward(self, x):
        y = self.fc(x.flatten(1))
        return (y, y.sum(1)) if self.pair else y


def test_export_into_a_missing_folder_or_onto_a_folder_is_refused(tmp_path):
    x = torch.zeros(2, *SHAPE)
    assert_api_refused(lambda: accelc.export(_Head(), x, tmp_path / "missing" / "m.onnx"), "does not exist")
    (tmp_path / "dir").mkdir()
    assert_api_refused(lambda: accelc.export(_Head(), x, tmp_path / "dir"), "is a folder")
    (tmp_path / "file").write_text("x")
    assert_api_refused(lambda: accelc.export(_Head(), x, tmp_path / "file" / "m.onnx"), "is not a folder")
    assert_api_refused(lambda: accelc.export(_Head(), x, _symlink_loop(tmp_path)), "symbolic link loop")
    assert sorted(os.listdir(tmp_path)) == ["dir", "file", "loop-a", "loop-b"]
    assert os.listdir(tmp_path / "dir") == []


def test_export_of_a_module_returning_a_tuple_is_refused(tmp_path):
    x = torch.zeros(2, *SHAPE)
    assert_api_refused(
        lambda: accelc.export(_Head(pair=True), x, tmp_path / "m.onnx"), "returns 2 outputs", InvalidValue
    )
    assert os.listdir(tmp_path) == []
    accelc.export(_Head(), x, tmp_path / "m.onnx")
    assert len(onnx.load(tmp_path / "m.onnx").graph.output) == 1


_INTERRUPT_ON_IMPORT = """
import os, signal, sys

class _CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == "onnx":  # Ctrl-C while accelc's start-up imports run
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, _CtrlC())
"""


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["module", "console-script"])
def test_ctrl_c_during_start_up_imports_is_one_line(tmp_path, entry):
    (tmp_path / "sitecustomize.py").write_text(_INTERRUPT_ON_IMPORT)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    if entry == "module":
        cmd = ACCELC
    else:
        script = Path(sys.executable).parent / "accelc"
        if not script.exists():
            pytest.skip("no console script installed beside this interpreter")
        cmd = [sys.executable, str(script)]
    r = subprocess.run(cmd + ["passes"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 130, r.stderr[-2000:]
    assert r.stderr == "accelc: interrupted\n" and r.stdout == "", r.stderr[-2000:]


def _node_name_with_newline(tmp_path) -> Path:
    """cnn3-small with a Relu named across two lines given a second input (the checker refuses it)."""
    from accelc.zoo import export_zoo

    m = onnx.load(export_zoo("cnn3-small", tmp_path / "m.onnx"))
    relu = next(n for n in m.graph.node if n.op_type == "Relu")
    relu.name = "evil\nname: injected"
    relu.input.append(relu.input[0])
    p = tmp_path / "nl.onnx"
    onnx.save(m, p)
    return p


def test_error_message_keeps_a_node_name_with_a_newline_whole(tmp_path):
    p = _node_name_with_newline(tmp_path)
    msg = assert_api_refused(lambda: accelc.compile(p, tmp_path / "art"), "fails the ONNX checker")
    assert "Node(evil\\nname: injected) with schema(::Relu:14) has input size 2" in msg, msg


def test_internal_error_line_is_never_cut_at_a_newline(monkeypatch, capsys, tmp_path):
    from accelc import api, cli

    def broken(*a, **k):
        raise RuntimeError("node 'evil\nname' broke")

    monkeypatch.setattr(api, "compile", broken)
    assert cli.main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "art")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "node 'evil\\nname' broke" in err, err


@pytest.mark.slow
def test_error_line_keeps_a_node_name_with_a_newline_whole(tmp_path):
    p = _node_name_with_newline(tmp_path)
    assert_refused(run_cli("compile", p, "-o", tmp_path / "art"), "Node(evil\\nname: injected) with schema")


# ----------------------------------------------------------------------------- smaller
@pytest.mark.slow
def test_nproc_with_in_process_is_refused(small_art, tmp_path):
    r = run_cli("train", small_art, "--data", "synthetic:64", "--epochs", "1", "--batch-size", "32",
                "-o", tmp_path / "run", "--nproc", "2", "--in-process")  # fmt: skip
    assert_refused(r, "--in-process", out=tmp_path / "run")


def test_character_device_is_not_called_empty(tmp_path):
    for fn in (lambda: accelc.inspect("/dev/zero"), lambda: accelc.compile("/dev/zero", tmp_path / "art")):
        msg = assert_api_refused(fn, "is not a regular file")
        assert "empty" not in msg
    fifo = tmp_path / "m.onnx"
    os.mkfifo(fifo)
    assert_api_refused(lambda: accelc.inspect(fifo), "is not a regular file")
    assert not (tmp_path / "art").exists()


@pytest.mark.slow
def test_character_device_as_model_is_one_line(tmp_path):
    assert_refused(run_cli("compile", "/dev/zero", "-o", tmp_path / "art"), "is not a regular file", tmp_path / "art")


# ----------------------------------------------------------------------------- silent wrong result
def _config_file(tmp_path, *configs) -> Path:
    p = tmp_path / "configs.json"
    p.write_text(json.dumps({"configs": list(configs)}))
    return p


def test_bench_configuration_with_a_reserved_name_must_mean_it(tmp_path):
    from accelc.bench import parse_configs

    for entry in (
        {"name": "ort", "passes": ["skip"]},
        {"name": "ort", "passes": [], "opt": False},
        {"name": "ort-noopt", "passes": []},
        {"name": "torch", "passes": []},
        {"name": "torch-amp", "passes": []},
        {"name": "ort+skip", "passes": ["reuse"]},
        {"name": "ort+all", "passes": ["skip"]},
        {"name": "ort+skip", "passes": ["skip"], "options": {"skip": {"tau": 1.5}}},
    ):
        msg = assert_api_refused(lambda e=entry: parse_configs(None, None, _config_file(tmp_path, e)), "reserved")
        assert entry["name"] in msg, msg
    # a reserved name that says exactly what it means is that configuration
    same = parse_configs(None, None, _config_file(tmp_path, {"name": "ort", "passes": []}))
    assert same["ort"] == parse_configs("ort")["ort"]
    same = parse_configs(None, None, _config_file(tmp_path, {"name": "ort+skip", "passes": ["skip"]}))
    assert same["ort+skip"] == parse_configs("ort+skip")["ort+skip"]
    # any other name is the user's
    own = parse_configs(None, None, _config_file(tmp_path, "ort", {"name": "skip-only", "passes": ["skip"]}))
    assert own["ort"]["passes"] == [] and own["skip-only"]["passes"] == ["skip"]


@pytest.mark.slow
def test_bench_configuration_with_a_reserved_name_is_one_line(tmp_path):
    f = _config_file(tmp_path, {"name": "ort", "passes": ["skip"]})
    assert_refused(run_cli("bench", "--config-file", f, "-o", tmp_path / "out"), "reserved", out=tmp_path / "out")
