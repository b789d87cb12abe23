"""CLI conventions (issue 19): --version, global flags before or after the subcommand, examples in
every subcommand's help, choices shown as choices, no RST markup in help, one default learning
rate, passes given out of order put into order with a note."""

import re
import subprocess
import sys
import warnings

import pytest

from accelc import cli
from accelc.compiler.compile import DEFAULT_LR, VERSION
from accelc.compiler.pass_api import PassOrderWarning, parse_pass_list, registered

RST = re.compile(r"``|:(func|class|mod|meth|attr|data|exc):`|`[^`'\s][^`']*`")


def subparsers() -> dict:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {"": parser, **action.choices}


def test_every_subcommand_help_has_examples_and_no_rst():
    helps = {name: p.format_help() for name, p in subparsers().items()}
    assert set(helps) >= {"", "export", "compile", "passes", "inspect", "view", "train", "bench"}
    for name, text in helps.items():
        assert "examples:\n  accelc " in text, name
        assert not RST.search(text), (name, RST.search(text).group(0))


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"accelc {VERSION}"


@pytest.mark.parametrize(
    "flag, dest", [("-q", "quiet"), ("--quiet", "quiet"), ("-v", "verbose"), ("--verbose", "verbose")]
)
def test_global_flags_before_and_after_the_subcommand(flag, dest):
    parser = cli.build_parser()
    for argv in (
        [flag, "passes"],
        ["passes", flag],
        [flag, "compile", "m.onnx", "-o", "x"],
        ["compile", "m.onnx", flag, "-o", "x"],
    ):
        assert getattr(parser.parse_args(argv), dest) is True, argv
    assert getattr(parser.parse_args(["passes"]), dest) is False


def test_quiet_before_and_after_is_quiet(tmp_path, capsys):
    for i, argv in enumerate((["-q", "export", "cnn3-small"], ["export", "cnn3-small", "-q"])):
        assert cli.main(argv + ["-o", str(tmp_path / f"m{i}.onnx")]) == 0
        assert capsys.readouterr().out == ""
    assert cli.main(["export", "cnn3-small", "-o", str(tmp_path / "m2.onnx")]) == 0
    assert "wrote" in capsys.readouterr().out


def test_choices_shown_as_choices_and_passes_listed():
    text = subparsers()["compile"].format_help()
    assert "--skip-policy {prefix,suffix,any}" in text
    assert "--skip-tau-mode {relative,absolute,growth}" in text
    assert "--reuse-strategy {fixed,lh,off}" in text
    dest_like = re.compile(r"\b(%s)_[A-Z_]+\b" % "|".join(n.upper() for n in registered()))  # SKIP_TAU_MODE
    assert not dest_like.search(text), dest_like.search(text).group(0)
    # every option with a choice(...) parser exposes its choices, and the help shows them
    for cls in registered().values():
        for opt in cls.options.fields().values():
            if getattr(opt.parse, "choices", None):
                assert opt.choices == tuple(opt.parse.choices)
                assert "{" + ",".join(opt.choices) + "}" in text
    passes_help = " ".join(text.split("\n  --passes PASS[,PASS...]")[1].split("--no-opt")[0].split())
    for name, cls in registered().items():
        if not cls.default:
            assert name in passes_help


def test_one_default_learning_rate():
    parser = cli.build_parser()
    assert parser.parse_args(["compile", "m.onnx", "-o", "x"]).lr == DEFAULT_LR
    assert parser.parse_args(["bench"]).lr == DEFAULT_LR
    assert parser.parse_args(["train", "art"]).lr is None  # the one compiled in


def test_passes_out_of_order_are_put_into_order():
    with pytest.warns(PassOrderWarning, match="passes run in the order rescale,reuse,skip"):
        assert parse_pass_list("skip,rescale,reuse") == ["rescale", "reuse", "skip"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_pass_list("rescale,skip") == ["rescale", "skip"]  # in order: no note


def test_cli_notes_the_order_in_one_line(tmp_path, capsys):
    from accelc.zoo import export_zoo

    export_zoo("cnn3-small", tmp_path / "m.onnx")
    argv = ["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "art"), "--passes", "skip,reuse", "--no-validate"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "accelc: note: passes run in the order reuse,skip (each pass rewrites what the passes before it made)"
    ]
    import json

    report = json.loads((tmp_path / "art" / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["opt", "reuse", "skip"]
    assert cli.main(argv + ["--force", "-q"]) == 0  # -q: errors only
    assert capsys.readouterr() == ("", "")


@pytest.mark.slow
def test_help_loads_neither_torch_nor_onnxruntime():
    code = (
        "import sys\nfrom accelc.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "[]", r.stderr
