"""Compiler foundation: --passes none equals plain generate_artifacts, cost model, inspect, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

import accelc
from accelc.zoo import export_zoo

from conftest import run_cli


def _structure(m: onnx.ModelProto):
    g = m.graph
    # ORT's gradient builder writes node attributes in no fixed order (two plain runs differ), so
    # attributes are compared as a name-sorted list; everything else is compared as serialised.
    return (
        [
            (
                n.op_type,
                n.domain,
                n.name,
                list(n.input),
                list(n.output),
                n.doc_string,
                sorted((a.name, a.SerializeToString()) for a in n.attribute),
            )
            for n in g.node
        ],
        [i.SerializeToString() for i in g.input],
        [o.SerializeToString() for o in g.output],
        [t.SerializeToString() for t in g.initializer],
        [(o.domain, o.version) for o in m.opset_import],
    )


@pytest.mark.slow
@pytest.mark.parametrize("model", ["cnn3-small", "vgg"])
def test_passes_none_is_plain_generate_artifacts(tmp_path, model):
    # Each in a fresh process: ORT numbers generated names (onnx::loss::N) with a process-wide counter.
    export_zoo(model, tmp_path / "m.onnx")
    assert run_cli("compile", tmp_path / "m.onnx", "-o", tmp_path / "art", "--no-opt").returncode == 0
    code = (
        "import sys; from accelc.compiler.artifacts import ort_generate; "
        "from accelc.compiler.model import load_model; ort_generate(load_model(sys.argv[1]), sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.onnx"), str(tmp_path / "plain")], check=True)
    for f in ("training_model.onnx", "optimizer_model.onnx"):
        ours, plain = onnx.load(str(tmp_path / "art" / f)), onnx.load(str(tmp_path / "plain" / f))
        assert _structure(ours) == _structure(plain), f
        assert ours.ir_version <= 10
    assert (tmp_path / "art" / "checkpoint").read_bytes() == (tmp_path / "plain" / "checkpoint").read_bytes()
    ours, plain = (
        onnx.load(str(tmp_path / "art" / "eval_model.onnx")),
        onnx.load(str(tmp_path / "plain" / "eval_model.onnx")),
    )
    if model == "cnn3-small":  # no BatchNorm: the eval model is untouched too
        assert _structure(ours) == _structure(plain)
    else:  # the only difference: BatchNorm nodes use running statistics
        so, sp = _structure(ours)[0], _structure(plain)[0]
        diff = [(a[0], b[0]) for a, b in zip(so, sp) if a != b]
        assert diff and all(d == ("BatchNormalization", "BatchNormalization") for d in diff)
        assert all(len(n.output) == 1 for n in ours.graph.node if n.op_type == "BatchNormalization")


def test_artifacts_load_in_plain_ort_training_api(tmp_path):
    from onnxruntime.training import api

    export_zoo("cnn3-small", tmp_path / "m.onnx")
    accelc.compile(tmp_path / "m.onnx", tmp_path / "art")
    d = tmp_path / "art"
    state = api.CheckpointState.load_checkpoint(str(d / "checkpoint"))
    module = api.Module(str(d / "training_model.onnx"), state, str(d / "eval_model.onnx"))
    opt = api.Optimizer(str(d / "optimizer_model.onnx"), module)
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    y = np.zeros(8, dtype=np.int64)
    module.train()
    l0 = float(module(x, y)[0])
    opt.step()
    module.lazy_reset_grad()
    assert np.isfinite(l0)


@pytest.mark.slow
def test_conv_flops_match_hand_computation(tmp_path):
    export_zoo("cnn3-small", tmp_path / "m.onnx")
    r = run_cli("inspect", tmp_path / "m.onnx", "--json")
    assert r.returncode == 0, r.stderr
    layers = json.loads(r.stdout)["layers"]
    assert [l["name"] for l in layers] == ["c1", "c2", "c3", "fc"]
    c2 = layers[1]
    # c2: 16->32 channels, 3x3, on 14x14 (after one 2x2 pool of 28x28), batch 64, with bias
    n, cout, cin, k, h, w = 64, 32, 16, 3, 14, 14
    macs = n * cout * h * w * cin * k * k
    assert c2["flops_fwd"] == 2 * macs + n * cout * h * w
    # backward: input gradient and weight gradient (2 MACs-worth each) + bias gradient, plus one
    # add per parameter element in the gradient accumulators
    n_params = cout * cin * k * k + cout
    assert c2["flops_bwd"] == 2 * macs + 2 * macs + n * cout * h * w + n_params
    # c1 reads the data input: ORT builds no input gradient for it
    c1 = layers[0]
    macs1 = 64 * 16 * 28 * 28 * 1 * 9
    assert c1["flops_bwd"] == 2 * macs1 + 64 * 16 * 28 * 28 + (16 * 9 + 16)
    assert c2["params"] == ["c2.weight", "c2.bias"] and c2["param_count"] == 32 * 16 * 9 + 32


def test_report_json(tmp_path):
    export_zoo("vgg", tmp_path / "m.onnx")
    rep = accelc.compile(tmp_path / "m.onnx", tmp_path / "art")
    on_disk = json.loads((tmp_path / "art" / "report.json").read_text())
    assert on_disk["input"]["sha256"] == rep["input"]["sha256"] and len(rep["input"]["sha256"]) == 64
    assert on_disk["options"] == {"loss": "cross_entropy", "optimizer": "adamw", "lr": 0.001, "batch_size": 64}
    assert (
        on_disk["costs"]["before"]["phases"]["backward"]["flops"]
        > on_disk["costs"]["before"]["phases"]["forward"]["flops"]
    )
    assert str(tmp_path) not in (tmp_path / "art" / "report.json").read_text()  # no absolute paths
    assert any("IR version" in f for f in on_disk["fixups"])


@pytest.mark.slow
def test_folded_batchnorm_is_reported(tmp_path):
    import torch

    from accelc.zoo import zoo_module

    m, shape = zoo_module("vgg")
    m.eval()
    torch.onnx.export(
        m,
        torch.zeros(1, *shape),
        str(tmp_path / "folded.onnx"),
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "N"}, "output": {0: "N"}},
        dynamo=False,
    )
    r = run_cli("compile", tmp_path / "folded.onnx", "-o", tmp_path / "art")
    assert "folded" in r.stderr or "eval mode" in r.stderr, r.stderr


BAD_INPUTS = {
    "missing": None,
    "directory": "dir",
    "empty": b"",
    "random": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
    "text": b"hello, this is not a model\n",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_model_input_one_line_exit_2(tmp_path, case):
    p = tmp_path / f"{case}.onnx"
    v = BAD_INPUTS[case]
    if v == "dir":
        p.mkdir()
    elif v is not None:
        p.write_bytes(v)
    out = tmp_path / "out"
    for cmd in (["compile", p, "-o", out], ["inspect", p]):
        r = run_cli(*cmd)
        assert r.returncode == 2, (cmd, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("accelc: error:"), r.stderr
        assert "Traceback" not in r.stderr
        assert not out.exists()
        assert not [f for f in os.listdir(tmp_path) if f.startswith(".out")]


@pytest.mark.slow
def test_truncated_model_and_bad_flags(tmp_path):
    export_zoo("cnn3-small", tmp_path / "m.onnx")
    data = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "t.onnx").write_bytes(data[: len(data) // 2])
    cases = [
        (["compile", tmp_path / "t.onnx", "-o", tmp_path / "o"], ""),
        (["compile", tmp_path / "m.onnx", "-o", tmp_path / "o", "--passes", "nosuchpass"], "nosuchpass"),
        (["compile", tmp_path / "m.onnx", "-o", tmp_path / "o", "--optimizer", "lamb"], "lamb"),
        (["compile", tmp_path / "m.onnx", "-o", tmp_path / "o", "--lr", "-1"], "--lr"),
        (["compile", tmp_path / "m.onnx", "-o", tmp_path / "m.onnx"], "input"),
        (["export", "nosuchmodel", "-o", tmp_path / "x.onnx"], "nosuchmodel"),
    ]
    for args, needle in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
        assert not (tmp_path / "o").exists()
    r = run_cli("compile", tmp_path / "m.onnx", "-o", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    r = run_cli("compile", tmp_path / "m.onnx", "-o", tmp_path / "o")
    assert r.returncode == 2 and "--force" in r.stderr
    r = run_cli("compile", tmp_path / "m.onnx", "-o", tmp_path / "o", "--force")
    assert r.returncode == 0, r.stderr
    r = run_cli("compile", tmp_path / "t.onnx", "-o", tmp_path / "bad", "-v")
    assert r.returncode == 2 and "Traceback" in r.stderr  # -v shows one


@pytest.mark.slow
def test_help_explains_every_flag():
    r = run_cli("compile", "--help")
    assert r.returncode == 0
    for flag in ("--passes", "--loss", "--optimizer", "--lr", "--force", "-o"):
        assert flag in r.stdout
    for sub in ("export", "compile", "passes", "inspect", "view", "train", "bench"):
        assert sub in run_cli("--help").stdout
