"""Issue 15, cause 6: every file accelc reads back is untrusted.

One artifact directory (rescale + skip: a stage subdirectory and two controller types) is compiled
once per module; each case copies it, damages one file one way, and asserts that loading it
(``load_artifacts``, ``accelc.inspect``) is refused with one AccelcError line naming what is wrong,
never an internal error, never a byte read from outside the directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import onnx
import pytest

import accelc
from accelc.compiler.artifact_dir import load_artifacts
from accelc.compiler.errors import AccelcError
from accelc.zoo import export_zoo

from conftest import SENTINEL_TEXT, assert_refused, run_cli

FILES = (
    "report.json",
    "plan.json",
    "checkpoint",
    "training_model.onnx",
    "eval_model.onnx",
    "optimizer_model.onnx",
    "stage-low/training_model.onnx",
    "stage-low/checkpoint",
    "stage-low/report.json",
)
CHANGED = "was changed after compile (hash differs from report.json); recompile"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    d = tmp_path_factory.mktemp("cause6")
    export_zoo("largekernel", d / "m.onnx", input_shape=(1, 32, 32))
    accelc.compile(
        d / "m.onnx",
        d / "art",
        passes=["rescale", "skip"],
        pass_options={"rescale": {"mode": "kernel"}, "skip": {"rule": "lars"}},
    )  # the kernel mode's stage-low
    return d / "art"


@pytest.fixture
def art(compiled, tmp_path):
    dst = tmp_path / "case" / "art"
    shutil.copytree(compiled, dst, symlinks=True)
    return dst


def refused(d, needle: str = "") -> str:
    """Both readers refuse ``d`` with the same single line; returns it."""
    msgs = []
    for fn in (load_artifacts, accelc.inspect):
        with pytest.raises(AccelcError) as ei:
            fn(d)
        msg = str(ei.value)
        assert "\n" not in msg and "\r" not in msg, msg
        assert needle in msg, msg
        assert SENTINEL_TEXT not in msg, msg
        msgs.append(msg)
    assert msgs[0] == msgs[1], msgs
    return msgs[0]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rehash(d: Path, name: str) -> None:
    """Record ``name``'s current hash in its report.json (a deliberate edit: the hash no longer helps)."""
    sub, _, base = name.rpartition("/")
    rd = d / sub if sub else d
    rep = json.loads((rd / "report.json").read_text())
    rep["files"][base] = sha(rd / base)
    (rd / "report.json").write_text(json.dumps(rep))


def unhash(d: Path) -> None:
    """Make ``d`` look like artifacts from before report.json recorded hashes."""
    for rp in (d / "report.json", d / "stage-low" / "report.json"):
        rep = json.loads(rp.read_text())
        rep.pop("files", None)
        rp.write_text(json.dumps(rep))


# ----------------------------------------------------------------------------- byte-level damage
def _flip(at):
    def m(p: Path, sentinel):
        b = bytearray(p.read_bytes())
        i = int(len(b) * at) if at < 1 else len(b) - 1
        b[i] ^= 0x10
        p.write_bytes(bytes(b))

    return m


def _replace(data: bytes):
    def m(p: Path, sentinel):
        p.write_bytes(data)

    return m


def _truncate(p: Path, sentinel):
    p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 2)])


def _append(p: Path, sentinel):
    p.write_bytes(p.read_bytes() + b"\x00junk")


def _missing(p: Path, sentinel):
    p.unlink()


def _directory(p: Path, sentinel):
    p.unlink()
    p.mkdir()
    (p / "x").write_text("x")


def _symlink_outside(p: Path, sentinel):
    p.unlink()
    p.symlink_to(sentinel)


def _symlink_dangling(p: Path, sentinel):
    p.unlink()
    p.symlink_to(p.parent / "nowhere")


def _symlink_loop(p: Path, sentinel):
    p.unlink()
    p.symlink_to(p.name)


def _fifo(p: Path, sentinel):
    p.unlink()
    os.mkfifo(p)


def _huge(p: Path, sentinel):
    with open(p, "r+b") as fh:  # sparse: 65 MB on paper, nothing on disk
        fh.truncate(65 << 20)


BYTE_DAMAGE = {
    "missing": _missing,
    "empty": _replace(b""),
    "truncated": _truncate,
    "flip_start": _flip(0.0),
    "flip_middle": _flip(0.5),
    "flip_end": _flip(1),
    "appended": _append,
    "directory": _directory,
    "symlink_outside": _symlink_outside,
    "symlink_dangling": _symlink_dangling,
    "symlink_loop": _symlink_loop,
    "fifo": _fifo,
    "not_utf8": _replace(b"\xff\xfe\x00{\x00}"),
    "huge": _huge,
    "deep_nesting": _replace(b"[" * 100_000 + b"]" * 100_000),
}


@pytest.mark.cause(6)
@pytest.mark.parametrize("kind", list(BYTE_DAMAGE))
@pytest.mark.parametrize("name", FILES)
def test_damaged_artifact_file_is_refused_naming_it(art, sentinel, name, kind):
    BYTE_DAMAGE[kind](art / name, sentinel)
    msg = refused(art)
    assert Path(name).name in msg or "stage-low" in msg, msg
    if kind == "symlink_outside":
        assert "outside the artifact directory" in msg
    if name != "report.json" and not name.endswith("report.json") and kind.startswith(("flip", "trunc", "app")):
        assert CHANGED in msg


@pytest.mark.cause(6)
def test_changed_model_is_named_in_one_line(art):
    m = onnx.load(str(art / "training_model.onnx"))
    m.graph.node.pop()
    (art / "training_model.onnx").write_bytes(m.SerializeToString())
    msg = refused(art, CHANGED)
    assert msg == f"'{art / 'training_model.onnx'}' {CHANGED}"


# ----------------------------------------------------------------------------- report.json fields
def _set(path, value):
    def m(doc):
        *head, last = path
        for k in head:
            doc = doc[k]
        doc[last] = value

    return m


def _drop(path):
    def m(doc):
        *head, last = path
        for k in head:
            doc = doc[k]
        del doc[last]

    return m


def _nest(levels):
    def m(doc):
        x = []
        for _ in range(levels):
            x = [x]
        doc["extra"] = x

    return m


REPORT_EDITS = {
    # wrong types
    "root_list": (lambda doc: doc.clear() or doc.update({"__root__": []}), "the document must be an object"),
    "passes_string": (_set(["passes"], "opt"), "passes must be a list"),
    "pass_name_int": (_set(["passes", 0, "name"], 5), "passes[0].name must be a string"),
    "pass_modified_str": (_set(["passes", 0, "modified"], "yes"), "passes[0].modified must be true or false"),
    "change_summary_int": (_set(["passes", 0, "changes", 0, "summary"], 3), "passes[0].changes[0].summary"),
    "model_list": (_set(["model"], []), "model must be an object"),
    "input_shape_str": (_set(["model", "input_shape"], "1,32,32"), "model.input_shape must be a list"),
    "input_shape_negative": (_set(["model", "input_shape"], [1, -5, 32]), "model.input_shape[1] must be >= 1"),
    "input_shape_float": (_set(["model", "input_shape"], [1, 32.5, 32]), "model.input_shape[1] must be an integer"),
    "num_classes_zero": (_set(["model", "num_classes"], 0), "model.num_classes must be >= 1"),
    "num_classes_bool": (_set(["model", "num_classes"], True), "model.num_classes must be an integer"),
    "num_classes_huge": (_set(["model", "num_classes"], 10**30), "model.num_classes must be <="),
    "params_dict": (_set(["model", "params"], {"a": 1}), "model.params must be a list"),
    "params_repeat": (_set(["model", "params"], ["c1.weight", "c1.weight"]), "model.params must not repeat"),
    "lr_negative": (_set(["options", "lr"], -1), "options.lr must be > 0"),
    "lr_string": (_set(["options", "lr"], "0.1"), "options.lr must be a number"),
    "lr_nan": (_set(["options", "lr"], math.nan), "options.lr must be a finite number"),
    "lr_inf": (_set(["options", "lr"], math.inf), "options.lr must be a finite number"),
    "batch_zero": (_set(["options", "batch_size"], 0), "options.batch_size must be >= 1"),
    "batch_float": (_set(["options", "batch_size"], 1.5), "options.batch_size must be an integer"),
    "optimizer_unknown": (_set(["options", "optimizer"], "adam"), "options.optimizer must be one of adamw, sgd"),
    "sha_int": (_set(["input", "sha256"], 5), "input.sha256 must be a string"),
    "files_list": (_set(["files"], []), "files must be an object"),
    "files_bad_hash": (_set(["files", "checkpoint"], "zz"), "files.checkpoint is malformed"),
    "files_escape": (_set(["files", "../../outside/secret.txt"], "0" * 64), "files has an unexpected entry"),
    # missing keys
    "no_model": (_drop(["model"]), "is missing the field 'model'"),
    "no_options": (_drop(["options"]), "is missing the field 'options'"),
    "no_input": (_drop(["input"]), "is missing the field 'input'"),
    "no_input_name": (_drop(["model", "input_name"]), "model is missing the field 'input_name'"),
    "no_params": (_drop(["model", "params"]), "model is missing the field 'params'"),
    "no_lr": (_drop(["options", "lr"]), "options is missing the field 'lr'"),
    "no_pass_name": (_drop(["passes", 0, "name"]), "passes[0] is missing the field 'name'"),
    "no_checkpoint_hash": (_drop(["files", "checkpoint"]), "files is missing the field 'checkpoint'"),
    # fields that no longer match the graphs
    "input_name_other": (_set(["model", "input_name"], "nope"), "is not an input of the graphs"),
    "output_name_other": (_set(["model", "output_name"], "nope"), "is not an output of eval_model.onnx"),
    "input_shape_other": (_set(["model", "input_shape"], [3, 32, 32]), "does not match eval_model.onnx's input"),
    "input_rank_other": (_set(["model", "input_shape"], [1024]), "does not match eval_model.onnx's input"),
    "num_classes_other": (_set(["model", "num_classes"], 7), "does not match eval_model.onnx's output"),
    "params_unknown": (_set(["model", "params"], ["nope"]), "names 'nope', which no graph holds"),
    "params_dropped": (_set(["model", "params"], ["c1.weight"]), "model.params lacks"),
    "frozen_unknown": (_set(["model", "frozen"], ["nope"]), "model.frozen names 'nope'"),
    # nesting and text
    "nested_200": (_nest(200), "nested too deeply"),
    "nested_100000": (None, "nested too deeply"),
    "lone_surrogate": (None, "lone surrogate"),
    "huge_integer": (None, "is not valid JSON"),
    "nan_literal_lr": (None, "options.lr must be a finite number"),
    "trailing_garbage": (None, "is not valid JSON"),
    "bom": (None, "is not valid JSON"),
}


def _raw_report(kind: str, text: str) -> str:
    if kind == "nested_100000":
        return text[:-1].rstrip().rstrip("}") + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    if kind == "lone_surrogate":
        return text.replace('"input_name": "input"', '"input_name": "\\ud800"', 1)
    if kind == "huge_integer":
        return text.replace('"batch_size": 64', '"batch_size": ' + "9" * 5000, 1)
    if kind == "nan_literal_lr":
        return text.replace('"lr": 0.001', '"lr": NaN', 1)
    if kind == "trailing_garbage":
        return text + "\n}{"
    if kind == "bom":
        return "\ufeff" + text
    raise AssertionError(kind)


@pytest.mark.cause(6)
@pytest.mark.parametrize("kind", list(REPORT_EDITS))
def test_malformed_report_json_is_refused(art, kind):
    edit, needle = REPORT_EDITS[kind]
    rp = art / "report.json"
    text = rp.read_text()
    if edit is None:
        rp.write_text(_raw_report(kind, text))
    else:
        doc = json.loads(text)
        edit(doc)
        rp.write_text(json.dumps(doc.get("__root__", doc) if kind == "root_list" else doc, indent=1))
    msg = refused(art, needle)
    assert "report.json" in msg, msg


@pytest.mark.cause(6)
def test_malformed_stage_report_json_is_refused(art):
    rp = art / "stage-low" / "report.json"
    doc = json.loads(rp.read_text())
    doc["options"]["batch_size"] = "64"
    rp.write_text(json.dumps(doc))
    refused(art, "stage-low/report.json': options.batch_size must be an integer")


# ----------------------------------------------------------------------------- plan.json fields
PLAN_EDITS = {
    "controllers_missing": (lambda p: p.pop("controllers"), "is missing the field 'controllers'"),
    "controllers_object": (lambda p: p.update(controllers={}), "controllers must be a list"),
    "controller_int": (lambda p: p["controllers"].__setitem__(0, 5), "controllers[0] must be an object"),
    "type_missing": (lambda p: p["controllers"][0].pop("type"), "controllers[0] is missing the field 'type'"),
    "type_int": (lambda p: p["controllers"][0].update(type=5), "controllers[0].type must be a string"),
    "stage_parent": (lambda p: p["controllers"][0].update(stage=".."), "controllers[0].stage is malformed"),
    "stage_path": (lambda p: p["controllers"][0].update(stage="../outside"), "controllers[0].stage is malformed"),
    "stage_absolute": (lambda p: p["controllers"][0].update(stage="/etc"), "controllers[0].stage is malformed"),
    "stage_absent": (lambda p: p["controllers"][0].update(stage="stage-nope"), "is missing (plan.json names"),
    "rescale_factor_zero": (
        lambda p: p["controllers"][0]["options"].update(factor=0),
        "controllers[0].options.factor must be >= 1",
    ),
    "rescale_params_list": (lambda p: p["controllers"][0].update(params=[]), "controllers[0].params must be an"),
    "rescale_switch_bad": (
        lambda p: p["controllers"][0]["options"].update(switch="later"),
        "controllers[0].options.switch is malformed",
    ),
    "rescale_no_params": (lambda p: p["controllers"][0].pop("params"), "is missing the field 'params'"),
    "skip_tau_string": (
        lambda p: p["controllers"][1]["options"].update(tau="2"),
        "controllers[1].options.tau must be a number",
    ),
    "skip_tau_nan": (
        lambda p: p["controllers"][1]["options"].update(tau=math.nan),
        "controllers[1].options.tau must be a finite",
    ),
    "skip_every_negative": (
        lambda p: p["controllers"][1]["options"].update(every=-1),
        "controllers[1].options.every must be >= 0",
    ),
    "skip_policy_unknown": (
        lambda p: p["controllers"][1]["options"].update(policy="all"),
        "controllers[1].options.policy must be one",
    ),
    "nested_deep": (lambda p: p["controllers"][1].update(extra=json.loads("[" * 500 + "]" * 500)), "nested too"),
}


@pytest.mark.cause(6)
@pytest.mark.parametrize("kind", list(PLAN_EDITS))
def test_edited_plan_json_is_refused_as_changed_then_by_schema(art, kind):
    edit, needle = PLAN_EDITS[kind]
    pp = art / "plan.json"
    doc = json.loads(pp.read_text())
    assert [c["type"] for c in doc["controllers"]] == ["rescale", "skip"]
    edit(doc)
    pp.write_text(json.dumps(doc))
    msg = refused(art, CHANGED)  # report.json vouches for plan.json
    assert "plan.json" in msg
    rehash(art, "plan.json")  # a deliberate edit with its hash updated: the schema still applies
    msg = refused(art, needle)
    assert "plan.json" in msg, msg


# ----------------------------------------------------------------------------- the directory itself
def _stage_outside(d: Path, sentinel):
    outside = sentinel.parent / "stage"
    shutil.copytree(d / "stage-low", outside)
    shutil.rmtree(d / "stage-low")
    (d / "stage-low").symlink_to(outside)


def _stage_self(d: Path, sentinel):
    shutil.rmtree(d / "stage-low")
    (d / "stage-low").symlink_to(".")


def _stage_file(d: Path, sentinel):
    shutil.rmtree(d / "stage-low")
    (d / "stage-low").write_text("x")


def _stage_missing(d: Path, sentinel):
    shutil.rmtree(d / "stage-low")


def _model_outside_same_bytes(d: Path, sentinel):
    """Even a byte-identical file is refused when the link leads outside."""
    target = sentinel.parent / "training_model.onnx"
    shutil.copy(d / "training_model.onnx", target)
    (d / "training_model.onnx").unlink()
    (d / "training_model.onnx").symlink_to(target)


DIR_DAMAGE = {
    "stage_symlink_outside": (_stage_outside, "points outside the artifact directory"),
    "stage_symlink_self": (_stage_self, "points outside the artifact directory"),
    "stage_is_file": (_stage_file, "is not a directory"),
    "stage_missing": (_stage_missing, "is missing (plan.json names the stage 'stage-low')"),
    "model_symlink_outside_identical": (_model_outside_same_bytes, "points outside the artifact directory"),
}


@pytest.mark.cause(6)
@pytest.mark.parametrize("kind", list(DIR_DAMAGE))
def test_damaged_directory_layout_is_refused(art, sentinel, kind):
    fn, needle = DIR_DAMAGE[kind]
    fn(art, sentinel)
    refused(art, needle)


@pytest.mark.cause(6)
def test_artifact_path_missing_a_file_or_dangling_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nope")
    for path, needle in (("nope", "no such file"), ("file", "artifact directory"), ("dangling", "symbolic link")):
        with pytest.raises(AccelcError, match=needle):
            load_artifacts(tmp_path / path)
        with pytest.raises(AccelcError):  # not a directory: inspect reads it as an ONNX file
            accelc.inspect(tmp_path / path)
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "is not an accelc artifact directory (missing training_model.onnx")


@pytest.mark.cause(6)
def test_symlinks_inside_the_artifact_directory_are_fine(art, tmp_path):
    """A link to the directory, or a file linked to another inside it, reads as the files themselves."""
    (art / "checkpoint").rename(art / "ckpt")
    (art / "checkpoint").symlink_to("ckpt")
    (tmp_path / "link").symlink_to(art)
    a, report = load_artifacts(tmp_path / "link")
    assert set(a.stages) == {"stage-low"} and report["files"]["checkpoint"]
    view = accelc.inspect(tmp_path / "link")
    assert view["verified"] and view["warnings"] == [] and view["layers"]


# ----------------------------------------------------------------------------- deliberate edits
FORGED = {
    "truncated": _truncate,
    "flip_start": _flip(0.0),
    "flip_middle": _flip(0.5),
    "flip_end": _flip(1),
    "empty": _replace(b""),
    "garbage": _replace(os.urandom(64)),
}


@pytest.mark.cause(6)
@pytest.mark.parametrize("kind", list(FORGED))
@pytest.mark.parametrize("name", ["training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"])
def test_model_edited_with_hash_updated_loads_or_is_refused_in_one_line(art, sentinel, name, kind):
    """Someone edited a model and report.json's hash: never an internal error (either the file still
    reads as a model and loads, or one line says why not)."""
    FORGED[kind](art / name, sentinel)
    rehash(art, name)
    for fn, path in ((load_artifacts, art), (accelc.inspect, art), (accelc.inspect, art / name)):
        try:
            fn(path)
        except AccelcError as e:  # a model file inspected alone is judged as a model (no file name needed)
            assert "\n" not in str(e) and (name in str(e) or path != art), str(e)


@pytest.mark.cause(6)
def test_swapped_graphs_with_hashes_updated_are_refused(art):
    """Training and eval graph swapped, or the eval graph in both places (hashes forged)."""
    t, e = (art / "training_model.onnx").read_bytes(), (art / "eval_model.onnx").read_bytes()
    (art / "training_model.onnx").write_bytes(e)
    (art / "eval_model.onnx").write_bytes(t)
    rehash(art, "training_model.onnx")
    rehash(art, "eval_model.onnx")
    refused(art, "eval_model.onnx' holds a training graph")
    (art / "eval_model.onnx").write_bytes(e)
    rehash(art, "eval_model.onnx")
    refused(art, "training_model.onnx' is not a training graph")


# ----------------------------------------------------------------------------- artifacts without hashes
@pytest.mark.cause(6)
def test_unhashed_artifacts_are_refused(art):
    """Without the hashes report.json records, nothing could notice an edited graph: refused."""
    unhash(art)
    assert "no file hashes" in refused(art)


@pytest.mark.cause(6)
@pytest.mark.parametrize("name", ["training_model.onnx", "checkpoint", "plan.json"])
def test_a_file_dropped_from_the_hash_record_is_refused(art, name):
    import json

    report = json.loads((art / "report.json").read_text())
    del report["files"][name]
    (art / "report.json").write_text(json.dumps(report))
    msg = refused(art)
    assert "missing the field" in msg or "records no hash" in msg, msg


# ----------------------------------------------------------------------------- the command line
@pytest.mark.cause(6)
@pytest.mark.slow
def test_cli_inspect_refuses_a_changed_training_model(art):
    _flip(0.5)(art / "training_model.onnx", None)
    assert_refused(run_cli("inspect", art), CHANGED)
    assert_refused(run_cli("inspect", art, "--json"), CHANGED)


@pytest.mark.cause(6)
@pytest.mark.slow
def test_cli_inspect_refuses_a_deeply_nested_report(art):
    (art / "report.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_refused(run_cli("inspect", art), "nested too deeply")


@pytest.mark.cause(6)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["checkpoint", "plan.json"])
def test_cli_train_refuses_damaged_artifacts(art, tmp_path, sentinel, name):
    _truncate(art / name, sentinel)
    run = tmp_path / "run"
    r = run_cli("train", art, "--epochs", "1", "--data", "synthetic:64", "--batch-size", "32", "-o", run)
    assert_refused(r, CHANGED, out=run)


@pytest.mark.cause(6)
@pytest.mark.parametrize("edit", ["node_removed", "input_rewired"])
def test_graph_edited_with_hashes_forged_is_refused_on_load(art, edit):
    """A deliberate edit with report.json's hashes recomputed still cannot reach a training step
    broken: a node reading what nothing produces is refused when the artifacts are loaded."""
    import json

    import onnx

    from accelc.compiler.artifact_dir import write_report

    m = onnx.load(str(art / "training_model.onnx"))
    g = m.graph
    if edit == "node_removed":
        i = next(k for k, n in enumerate(g.node) if n.op_type == "Gemm" or "Grad" in n.op_type)
        del g.node[i]
    else:
        g.node[len(g.node) // 2].input[0] = "nowhere"
    onnx.save(m, str(art / "training_model.onnx"))
    write_report(art, json.loads((art / "report.json").read_text()))
    msg = refused(art)
    assert "produce" in msg, msg
