"""Issue 15, cause 11: flags and the Python API agree.

One validation layer (accelc.compiler.checks, the pass Option parsers) serves the CLI and the
Python API: every bad argument is refused up front -- before a file is read or written -- with an
AccelcError (an InvalidValue/ValueError or InvalidType/TypeError) whose one-line message names the
CLI flag, and the CLI prints exactly ``accelc: error: `` + that message.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import accelc
from accelc import api, checks
from accelc.compiler.errors import AccelcError, InvalidType, InvalidValue
from accelc.compiler.pass_api import check_pass_options, get, parse_pass_list

from conftest import SENTINEL_TEXT, assert_api_refused, assert_refused, run_cli

GOOD_TRAIN = dict(
    epochs=1,
    batch_size=8,
    seed=0,
    lr=None,
    threads=None,
    train_limit=None,
    test_limit=None,
    device="cpu",
    data="synthetic:64",
)


def _no_output(path: Path):
    assert not path.exists(), f"{path} was created"
    assert not [f for f in path.parent.iterdir() if f.name.startswith("." + path.name)], list(path.parent.iterdir())


def _refused(fn, needle, kind):
    msg = assert_api_refused(fn, needle, kind)
    assert SENTINEL_TEXT not in msg
    return msg


# ----------------------------------------------------------------------------- train
TRAIN_CASES = [
    ("lr=-1", {"lr": -1.0}, "--lr must be a positive finite number up to 1e+12, got -1.0", ValueError),
    ("lr=0", {"lr": 0}, "--lr must be a positive finite number up to 1e+12, got 0", ValueError),
    ("lr=nan", {"lr": math.nan}, "--lr must be a positive finite number up to 1e+12, got nan", ValueError),
    ("lr=inf", {"lr": math.inf}, "--lr must be a positive finite number up to 1e+12, got inf", ValueError),
    ("lr=str", {"lr": "0.1"}, "--lr must be a positive finite number up to 1e+12, got str", TypeError),
    ("seed=-1", {"seed": -1}, "--seed must be an integer in 0..4294967295, got -1", ValueError),
    ("seed=2**70", {"seed": 2**70}, f"--seed must be an integer in 0..4294967295, got {2**70}", ValueError),
    ("seed=float", {"seed": 1.5}, "--seed must be an integer in 0..4294967295, got float", TypeError),
    ("seed=bool", {"seed": True}, "--seed must be an integer", TypeError),
    ("test-limit=-5", {"test_limit": -5}, "--test-limit must be a positive integer, got -5", ValueError),
    ("train-limit=0", {"train_limit": 0}, "--train-limit must be a positive integer, got 0", ValueError),
    ("threads=-1", {"threads": -1}, "--threads must be in 1..", ValueError),
    ("threads=10**6", {"threads": 10**6}, "--threads must be in 1..", ValueError),
    ("threads=str", {"threads": "2"}, "--threads must be an integer, got str", TypeError),
    ("epochs=0", {"epochs": 0}, "--epochs must be a positive integer up to 1000000, got 0", ValueError),
    ("epochs=float", {"epochs": 2.0}, "--epochs must be a positive integer up to 1000000, got float", TypeError),
    ("batch-size=-1", {"batch_size": -1}, "--batch-size must be a positive integer up to 1048576, got -1", ValueError),
    ("device", {"device": "tpu"}, "--device must be one of cpu, cuda, got 'tpu'", ValueError),
    ("lr-schedule", {"lr_schedule": "cosine"}, "--lr-schedule takes constant, linear or linear:W", ValueError),
    ("lr-schedule=int", {"lr_schedule": 1}, "--lr-schedule takes constant, linear or linear:W", TypeError),
    ("layout", {"layout": "nwhc"}, "--layout must be one of auto, nchw, nhwc, got 'nwhc'", ValueError),
    ("layout=int", {"layout": 4}, "--layout must be one of auto, nchw, nhwc, got int", TypeError),
    ("data=int", {"data": 5}, "--data must be synthetic[:N]", TypeError),
    ("data=unknown", {"data": "mnist"}, "unknown --data mnist", ValueError),
    ("data=synthetic:x", {"data": "synthetic:x"}, "--data synthetic:N needs an integer N, got x", ValueError),
    ("data=synthetic:-3", {"data": "synthetic:-3"}, "--data synthetic:N needs N > 0", ValueError),
    ("data=imagefolder:", {"data": "imagefolder:"}, "--data imagefolder:DIR needs a folder", ValueError),
    ("memory-limit=-1", {"memory_limit_gb": -1}, "--memory-limit must be a positive number of GB, got -1", ValueError),
    ("memory-limit=str", {"memory_limit_gb": "2"}, "--memory-limit must be a number of GB, got str", TypeError),
]


@pytest.mark.cause(11)
@pytest.mark.parametrize("kw,needle,kind", [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_bad_train_args_are_refused_before_anything_is_read(kw, needle, kind, tmp_path, sentinel):
    run = tmp_path / "run"
    # the artifact directory is a file outside the case: refusing first means it is never read
    _refused(lambda: accelc.train(sentinel, run_dir=run, **kw), needle, kind)
    _no_output(run)
    args = {**GOOD_TRAIN, **kw}
    assert _refused(lambda: api.check_train_args(**args), needle, kind)


@pytest.mark.cause(11)
@pytest.mark.parametrize(
    "kw,needle,kind",
    [
        ({"run_dir": None}, "-o must be a path", TypeError),
        ({"run_dir": ""}, "-o must be a non-empty path", ValueError),
        ({"run_dir": "a\x00b"}, "-o must not contain a NUL byte", ValueError),
        ({"resume": "yes"}, "resume must be True or False, got str", TypeError),
        ({"force": 1}, "force must be True or False, got int", TypeError),
        ({"kernels": ["conv=ort"]}, "kernels must be a dict, got list", TypeError),
        ({"kernels": {"conv": 1}}, "kernels must map kernel names", TypeError),
        ({"algorithms": "skip"}, "algorithms must be a list", TypeError),
    ],
    ids=[
        "run_dir-none",
        "run_dir-empty",
        "run_dir-nul",
        "resume-str",
        "force-int",
        "kernels-list",
        "kernels-value",
        "algorithms-str",
    ],
)
def test_bad_api_only_train_args_are_refused_with_their_type(kw, needle, kind, tmp_path, sentinel):
    _refused(lambda: accelc.train(sentinel, **kw), needle, kind)
    _refused(lambda: accelc.train(5), "artifacts must be a path", TypeError)


@pytest.mark.cause(11)
def test_check_train_args_accepts_good_values():
    assert api.check_train_args(**GOOD_TRAIN) is None
    ok = dict(GOOD_TRAIN, epochs=np.int64(2), seed=2**32 - 1, lr=np.float32(0.01), threads=1, train_limit=5)
    assert api.check_train_args(**ok, memory_limit_gb=1.5) is None
    for data in ("synthetic", "fashion-mnist", "fashion-mnist:/x", "imagefolder:/x"):
        assert api.check_train_args(**dict(GOOD_TRAIN, data=data)) is None


# ----------------------------------------------------------------------------- compile
COMPILE_CASES = [
    (
        "passes=int",
        {"passes": 5},
        "--passes must be a comma-separated string or a list of pass names, got int",
        TypeError,
    ),
    ("passes=[int]", {"passes": ["skip", 1]}, "got a list holding int", TypeError),
    ("passes=dict", {"passes": {"skip": 1}}, "got dict", TypeError),
    (
        "passes=nope",
        {"passes": ["nope"]},
        "unknown pass(es) nope; available: opt, rescale, reuse, amp, skip",
        ValueError,
    ),
    ("passes=str-nope", {"passes": "skip,nope"}, "unknown pass(es) nope", ValueError),
    ("passes=dup", {"passes": ["skip", "skip"]}, "pass skip is listed twice in --passes skip,skip", ValueError),
    (
        "tau=-3",
        {"passes": "skip", "pass_options": {"skip": {"tau": -3}}},
        "--skip-tau must be a finite number > 0, got -3",
        ValueError,
    ),
    (
        "tau=abc",
        {"passes": "skip", "pass_options": {"skip": {"tau": "abc"}}},
        "--skip-tau: expected a number, got abc",
        ValueError,
    ),
    (
        "tau=None",
        {"passes": "skip", "pass_options": {"skip": {"tau": None}}},
        "--skip-tau: expected a number, got None",
        TypeError,
    ),
    (
        "tau=list",
        {"passes": "skip", "pass_options": {"skip": {"tau": [1]}}},
        "--skip-tau: expected a number",
        TypeError,
    ),
    (
        "policy=5",
        {"passes": "skip", "pass_options": {"skip": {"policy": 5}}},
        "--skip-policy: choose from prefix, suffix, any, got 5",
        TypeError,
    ),
    (
        "every=1.5",
        {"passes": "skip", "pass_options": {"skip": {"every": 1.5}}},
        "--skip-every: expected an integer, got 1.5",
        ValueError,
    ),
    (
        "every=bool",
        {"passes": "skip", "pass_options": {"skip": {"every": True}}},
        "--skip-every: expected an integer",
        TypeError,
    ),
    ("H=0", {"passes": "reuse", "pass_options": {"reuse": {"H": 0}}}, "--reuse-H must be in 1..20, got 0", ValueError),
    (
        "unknown-option",
        {"passes": "skip", "pass_options": {"skip": {"nope": 1}}},
        "pass 'skip' has no option(s) nope",
        ValueError,
    ),
    (
        "option-of-pass-not-run",
        {"pass_options": {"skip": {"tau": 3}}},
        "--skip-tau given but pass 'skip' is not in --passes",
        ValueError,
    ),
    (
        "opt-options-with-no-opt",
        {"opt": False, "pass_options": {"opt": {"rules": "x"}}},
        "--opt-rules given but pass 'opt'",
        ValueError,
    ),
    ("options-of-unknown-pass", {"pass_options": {"nope": {}}}, "pass_options names unknown pass nope", ValueError),
    ("pass_options=str", {"passes": "skip", "pass_options": "skip"}, "pass_options must be a dict", TypeError),
    (
        "pass_options=value-str",
        {"passes": "skip", "pass_options": {"skip": "tau"}},
        "options of pass 'skip' must be a dict",
        TypeError,
    ),
    ("lr=inf", {"lr": math.inf}, "--lr must be a positive finite number up to 1e+12, got inf", ValueError),
    ("lr=-1", {"lr": -1.0}, "--lr must be a positive finite number up to 1e+12, got -1.0", ValueError),
    ("lr=None", {"lr": None}, "--lr must be a positive finite number up to 1e+12, got NoneType", TypeError),
    ("batch-size=0", {"batch_size": 0}, "--batch-size must be a positive integer up to 1048576, got 0", ValueError),
    (
        "batch-size=str",
        {"batch_size": "a"},
        "--batch-size must be a positive integer up to 1048576, got str",
        TypeError,
    ),
    ("optimizer", {"optimizer": "lamb"}, "--optimizer must be one of adamw, sgd, got 'lamb'", ValueError),
    ("loss", {"loss": 3}, "--loss must be one of cross_entropy, got int", TypeError),
    ("force=str", {"force": "yes"}, "force must be True or False", TypeError),
    ("opt=None", {"opt": None}, "opt must be True or False", TypeError),
    ("memory-limit=0", {"memory_limit_gb": 0}, "--memory-limit must be a positive number of GB, got 0", ValueError),
]


@pytest.mark.cause(11)
@pytest.mark.parametrize("kw,needle,kind", [c[1:] for c in COMPILE_CASES], ids=[c[0] for c in COMPILE_CASES])
def test_bad_compile_args_are_refused_before_anything_is_read(kw, needle, kind, tmp_path, sentinel):
    out = tmp_path / "art"
    # the model is a file outside the case: refusing first means it is never read
    _refused(lambda: accelc.compile(sentinel, out, **kw), needle, kind)
    _no_output(out)


@pytest.mark.cause(11)
@pytest.mark.parametrize(
    "model,out,needle,kind",
    [
        (5, "art", "model must be a path (str or os.PathLike), got int", TypeError),
        (b"m.onnx", "art", "model must be a path (str or os.PathLike), got bytes", TypeError),
        ("", "art", "model must be a non-empty path", ValueError),
        ("m.onnx", None, "-o must be a path (str or os.PathLike), got NoneType", TypeError),
        ("m.onnx", "a\nb\x00", "-o must not contain a NUL byte, got a\\nb\\x00", ValueError),
    ],
    ids=["model-int", "model-bytes", "model-empty", "out-none", "out-nul"],
)
def test_compile_refuses_paths_that_are_not_paths(model, out, needle, kind):
    _refused(lambda: accelc.compile(model, out), needle, kind)


@pytest.mark.cause(11)
def test_inspect_refuses_paths_that_are_not_paths():
    _refused(lambda: accelc.inspect(5), "path must be a path (str or os.PathLike), got int", TypeError)
    _refused(lambda: accelc.inspect(""), "path must be a non-empty path", ValueError)


@pytest.mark.cause(11)
def test_pass_lists_parse_the_same_as_string_or_list():
    # a string is split at commas, never iterated per character (the old KeyError: 's')
    assert parse_pass_list("skip") == ["skip"]
    assert parse_pass_list(" rescale , skip ") == ["rescale", "skip"] == parse_pass_list(("rescale", "skip"))
    assert parse_pass_list("none") == parse_pass_list([]) == parse_pass_list(None) == []
    # parsed once, where they enter: the typed options the manager takes as they are
    assert check_pass_options(["skip"], {"skip": {"tau": 1.5}})["skip"].tau == 1.5
    assert check_pass_options([], {"opt": {"rules": []}})["opt"].rules == []


@pytest.mark.cause(11)
def test_options_parse_the_same_from_python_and_from_cli_strings():
    skip, reuse = get("skip"), get("reuse")
    assert skip.resolve_options({"tau": "1.5", "every": "2"}) == skip.resolve_options({"tau": 1.5, "every": 2})
    assert skip.resolve_options({"every": 2.0})["every"] == 2  # an integral float is an integer
    assert skip.resolve_options({"layers": None})["layers"] is None  # None is "not given" where the default is None
    assert reuse.resolve_options({"H": np.int64(4)})["H"] == 4
    for py, cli in ((-3, "-3"), ("abc", "abc"), (0, "0")):
        a = assert_api_refused(lambda v=py: skip.resolve_options({"tau": v}))
        b = assert_api_refused(lambda v=cli: skip.resolve_options({"tau": v}))
        assert a == b, (a, b)


# ----------------------------------------------------------------------------- export
EXPORT_CASES = [
    ("num-classes=0", {"num_classes": 0}, "--num-classes must be a positive integer up to 1048576, got 0", ValueError),
    (
        "num-classes=-3",
        {"num_classes": -3},
        "--num-classes must be a positive integer up to 1048576, got -3",
        ValueError,
    ),
    (
        "num-classes=str",
        {"num_classes": "10"},
        "--num-classes must be a positive integer up to 1048576, got str",
        TypeError,
    ),
    ("num-classes=huge", {"num_classes": 10**9}, "up to 1048576", ValueError),
    ("num-classes=2**70", {"num_classes": 2**70}, "up to 1048576", ValueError),
    ("num-classes=memory", {"num_classes": 1 << 20, "input_shape": "3,1024,1024"}, "needs about", ValueError),
    ("seed=-1", {"seed": -1}, "--seed must be an integer in 0..4294967295, got -1", ValueError),
    ("seed=2**70", {"seed": 2**70}, "--seed must be an integer in 0..4294967295", ValueError),
    (
        "input-shape-too-small",
        {"input_shape": (1, 4, 4)},
        "--input-shape 1,4,4 is too small for model 'cnn3-small': the step after layer 'c3' fails",
        ValueError,
    ),
    ("input-shape-min-named", {"input_shape": "1,7,7"}, "the smallest input it runs at is 1,8,8", ValueError),
    (
        "input-shape-not-square",
        {"input_shape": (1, 28, 16)},
        "does not fit model 'cnn3-small': layer 'fc' fails",
        ValueError,
    ),
    (
        "input-shape-zero",
        {"input_shape": "0,28,28"},
        "--input-shape must be three positive integers C,H,W, got 0,28,28",
        ValueError,
    ),
    (
        "input-shape-two",
        {"input_shape": (28, 28)},
        "--input-shape must be three positive integers C,H,W, got 28,28",
        ValueError,
    ),
    (
        "input-shape-text",
        {"input_shape": "a,b,c"},
        "--input-shape must be three positive integers C,H,W, got a,b,c",
        ValueError,
    ),
    ("input-shape-float", {"input_shape": (1, 28.0, 28)}, "--input-shape must be three positive integers", TypeError),
    ("input-shape-huge", {"input_shape": (3, 12000, 12000)}, "needs about", ValueError),
    ("name-unknown", {"name": "alexnet"}, "unknown model 'alexnet'; the zoo has", ValueError),
    ("name-int", {"name": 3}, "the zoo model name must be a string, got int", TypeError),
    ("path-none", {"path": None}, "-o must be a path", TypeError),
    (
        "memory-limit-nan",
        {"memory_limit_gb": math.nan},
        "--memory-limit must be a positive number of GB, got nan",
        ValueError,
    ),
]


@pytest.mark.cause(11)
@pytest.mark.parametrize("kw,needle,kind", [c[1:] for c in EXPORT_CASES], ids=[c[0] for c in EXPORT_CASES])
def test_bad_export_zoo_args_are_refused_and_write_nothing(kw, needle, kind, tmp_path):
    from accelc.zoo import export_zoo

    out = tmp_path / "m.onnx"
    kw = {"name": "cnn3-small", "path": out, **kw}
    _refused(lambda: export_zoo(**kw), needle, kind)
    _no_output(out)


@pytest.mark.cause(11)
def test_export_zoo_other_shapes_still_export(tmp_path):
    from accelc.zoo import export_zoo

    export_zoo("cnn3-small", tmp_path / "a.onnx", "1,8,8", num_classes=3, seed=2**32 - 1)
    export_zoo("largekernel", tmp_path / "b.onnx", (1, 24, 24))
    assert (tmp_path / "a.onnx").stat().st_size > 0 and (tmp_path / "b.onnx").stat().st_size > 0
    # an ill-sized largekernel input (23 is not below its minimum) names the failing layer
    _refused(lambda: export_zoo("largekernel", tmp_path / "c.onnx", (1, 23, 23)), "layer 'fc' fails", ValueError)


@pytest.mark.cause(11)
def test_api_export_refuses_bad_module_input_and_path(tmp_path):
    import torch

    out = tmp_path / "m.onnx"
    lin = torch.nn.Linear(3, 2)
    _refused(
        lambda: accelc.export("net", torch.zeros(2, 3), out), "module must be a torch.nn.Module, got str", TypeError
    )
    _refused(lambda: accelc.export(lin, [[0.0] * 3], out), "example_input must be a torch.Tensor, got list", TypeError)
    _refused(
        lambda: accelc.export(lin, torch.tensor(1.0), out), "example_input must have a batch dimension", ValueError
    )
    _refused(lambda: accelc.export(lin, torch.zeros(2, 3), 7), "path must be a path", TypeError)
    msg = _refused(
        lambda: accelc.export(lin, torch.zeros(2, 4), out),
        "cannot export Linear with an example input of shape 2,4",
        ValueError,
    )
    assert "mat1 and mat2" in msg
    _no_output(out)


@pytest.mark.cause(11)
def test_validators_raise_value_or_type_errors_prefixed_by_the_flag():
    for fn, args in (
        (checks.positive_float, ("--x", -1)),
        (checks.positive_int, ("--x", 0)),
        (checks.seed, ("--x", -1)),
        (checks.choice, ("--x", "c", ("a", "b"))),
        (checks.input_shape, ("--x", "1,2")),
    ):
        with pytest.raises(InvalidValue) as ei:
            fn(*args)
        assert isinstance(ei.value, (AccelcError, ValueError)) and str(ei.value).startswith("--x ")
    for fn, args in (
        (checks.positive_float, ("--x", "1")),
        (checks.positive_int, ("--x", 1.0)),
        (checks.seed, ("--x", None)),
        (checks.choice, ("--x", 1, ("a",))),
        (checks.path_like, ("--x", 1)),
    ):
        with pytest.raises(InvalidType) as ei:
            fn(*args)
        assert isinstance(ei.value, TypeError) and str(ei.value).startswith("--x ")
    assert checks.positive_float("--x", np.float32(0.5)) == 0.5
    assert checks.seed("--x", np.uint32(2**32 - 1)) == 2**32 - 1
    assert checks.input_shape("--x", " 1, 2 ,3") == (1, 2, 3)


# ----------------------------------------------------------------------------- CLI parity
def _api_message(fn) -> str:
    with pytest.raises(AccelcError) as ei:
        fn()
    return str(ei.value)


@pytest.mark.cause(11)
@pytest.mark.slow
def test_cli_prints_the_same_message_as_the_api(tmp_path, sentinel):
    """The same bad value through the CLI and the Python API gives the same one line."""
    from accelc.zoo import export_zoo

    out = tmp_path / "out"
    cases = [
        (
            ["compile", sentinel, "-o", out, "--lr", "-1"],
            lambda: accelc.compile(sentinel, out, lr=-1.0),
        ),
        (
            ["compile", sentinel, "-o", out, "--passes", "skip", "--skip-tau", "-3"],
            lambda: accelc.compile(sentinel, out, passes="skip", pass_options={"skip": {"tau": -3}}),
        ),
        (
            ["compile", sentinel, "-o", out, "--passes", "skip,nope"],
            lambda: accelc.compile(sentinel, out, passes=["skip", "nope"]),
        ),
        (
            ["export", "cnn3-small", "-o", out, "--num-classes", "0"],
            lambda: export_zoo("cnn3-small", out, num_classes=0),
        ),
        (
            ["export", "cnn3-small", "-o", out, "--input-shape", "1,4,4"],
            lambda: export_zoo("cnn3-small", out, (1, 4, 4)),
        ),
        (
            ["train", sentinel, "--in-process", "-o", out, "--seed", str(2**70)],
            lambda: accelc.train(sentinel, run_dir=out, seed=2**70),
        ),
        (
            ["train", sentinel, "--in-process", "-o", out, "--device", "tpu"],
            lambda: accelc.train(sentinel, run_dir=out, device="tpu"),
        ),
        (
            ["train", sentinel, "--in-process", "-o", out, "--threads", "-1"],
            lambda: accelc.train(sentinel, run_dir=out, threads=-1),
        ),
        (
            ["train", sentinel, "--in-process", "-o", out, "--lr", "nan", "--test-limit", "5"],
            lambda: accelc.train(sentinel, run_dir=out, lr=math.nan, test_limit=5),
        ),
    ]
    for argv, fn in cases:
        msg = _api_message(fn)
        r = run_cli(*argv)
        assert_refused(r, out=out)
        assert r.stderr == f"accelc: error: {msg}\n", (argv, r.stderr, msg)
