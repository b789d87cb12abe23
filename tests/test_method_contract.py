"""The contract every built-in method keeps, parametrised over ``accelc.passes.METHODS`` (in the
style of Composer's algorithm-settings tests): on the tiny hand-made graph of
:mod:`test_passes_unit` the method's pass modifies the graph, the manager validates the result and
the pass's own ``ensures`` check passes; its options round-trip CLI ↔ Python ↔ plan.json; its
algorithm's state round-trips through a checkpoint; its run summary renders. ``SETTINGS`` holds
what a method needs to act on the tiny graph (a new method adds a line there, or none)."""

import json

import onnx
import pytest
from test_passes_unit import artifacts, tiny

import accelc
from accelc.cli import build_parser
from accelc.cli.args import PassArgs
from accelc.cli.summary import training_summary
from accelc.compiler import schemas
from accelc.compiler.artifact_dir import load_artifacts
from accelc.compiler.manager import PassManager
from accelc.compiler.pass_api import Pass, check_pass_options, default_passes
from accelc.passes import METHODS
from accelc.runtime import checkpoint as ckpt

# what each method needs to change the tiny graph: (tiny()'s arguments, the method's options)
SETTINGS = {
    "rescale": ({"k1": 5, "hw": 16}, {"mode": "kernel", "factor": 2, "min_kernel": 5, "switch": "epoch:1"}),
    "reuse": ({"hw": 6}, {"layers": "c2", "choose": "all"}),
    "skip": ({}, {"rule": "lars", "min_epochs": 1, "tau_mode": "absolute", "tau": 1e-9}),
}
IDS = [m.name for m in METHODS]
WITH_ALGORITHM = [m for m in METHODS if m.algorithm is not None]


def _setting(m):
    return SETTINGS.get(m.name, ({}, {}))


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_the_pass_modifies_the_tiny_graph_validated_and_checked(method):
    shape, opts = _setting(method)
    manager = PassManager([method.name], {method.name: opts}, validate_each=True)
    art, records = manager.run(artifacts(**shape))
    (rec,) = records
    assert rec["name"] == method.name and rec["modified"], rec
    assert manager.validation["training_step"]  # the final artifacts (and every stage) validated
    if method.compile.ensures is not Pass.ensures:  # its own numeric self-check ran and said what it checked
        assert rec["validation"].get("self_check"), rec
    for entry in art.plan:  # what it planned is what plan.json's schema (derived from its options) accepts
        schemas.check({"controllers": [entry]}, schemas.plan_schema(), "plan.json")


def _cli_text(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(":".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for v in value)
    return str(value)


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_options_round_trip_cli_python_and_plan_json(method):
    defaults = method.options.parse(None)
    # Python: the same values given as values, and as the JSON plan.json stores
    assert method.options.parse(dict(defaults)) == defaults
    stored = json.loads(json.dumps(defaults.to_json()))
    schemas.check(stored, method.options.schema(), "plan.json options")
    assert method.options.from_plan(stored, "plan.json") == defaults
    # CLI: every option with a default, written as its flag's text, parses to the same values
    argv = ["compile", "m.onnx", "-o", "out"] + ([] if method.default else ["--passes", method.name])
    given = [(k, o) for k, o in method.options.fields().items() if o.default is not None]
    for k, o in given:
        argv += [method.options.flag(k), _cli_text(getattr(defaults, k))]
    a = build_parser().parse_args(argv)
    names = [method.name] + default_passes()
    from_cli = check_pass_options(names, PassArgs.options(a, names))
    if given:
        assert from_cli[method.name] == defaults


def _trained(method, tmp_path):
    shape, opts = _setting(method)
    model = tmp_path / "m.onnx"
    onnx.save(tiny(**shape), model)
    accelc.compile(model, tmp_path / "art", passes=[method.name], pass_options={method.name: opts})
    hw = shape.get("hw", 8)
    s = accelc.train(
        tmp_path / "art", data="synthetic:64", epochs=2, batch_size=16, run_dir=tmp_path / "run", progress=False
    )
    assert s["history"] and len(s["history"]) == 2, hw
    return s


@pytest.mark.slow
@pytest.mark.parametrize("method", WITH_ALGORITHM, ids=[m.name for m in WITH_ALGORITHM])
def test_the_algorithm_state_round_trips_and_the_summary_renders(method, tmp_path):
    s = _trained(method, tmp_path)
    _, meta = ckpt.load(tmp_path / "run")
    state = meta["controllers"][method.name]
    art, _ = load_artifacts(tmp_path / "art")
    (entry,) = [e for e in art.plan if e["type"] == method.name]
    fresh = method.algorithm(art, entry)
    fresh.load_state_dict(json.loads(json.dumps(state)))
    assert fresh.state_dict() == state
    plan = json.loads((tmp_path / "art" / "plan.json").read_text())["controllers"]
    lines = training_summary(s, plan)
    assert any(line.startswith(method.name) for line in lines), lines


def test_every_method_folder_is_listed_and_packaged():
    """A method folder under passes/ is one entry in METHODS and one package in pyproject's list
    (what a wheel ships; an editable install would not notice a missing one)."""
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parent.parent
    folders = sorted(p.parent.name for p in (root / "passes").glob("*/__init__.py"))
    assert sorted(m.name for m in METHODS) == folders
    packages = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {f"accelc.passes.{f}" for f in folders} <= set(packages)


def test_every_package_folder_is_in_the_wheel():
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parent.parent
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, folder in setup["package-dir"].items():
        for init in (root / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(root / folder).parts
            found.add(".".join((name, *rel)))
    assert found <= set(setup["packages"]), sorted(found - set(setup["packages"]))
