"""The configurations ``accelc bench`` runs: ``--configs`` names (torch, torch-amp, ort, ort-noopt,
ort+PASS[+PASS...], ort+all), the pass flags that apply to them, and ``--config-file``'s named
configurations with options of their own."""

from __future__ import annotations

import json
import os
import re
import stat

from ..compiler import checks
from ..compiler.errors import AccelcError, show
from ..compiler.pass_api import check_pass_options, parse_pass_list, registered

TORCH_ENGINES = {  # the torch configurations, each its own engine
    "torch": "torch eager",
    "torch-amp": "torch eager under bf16 autocast",
    "torch-cl": "torch eager in channels_last",
}
BASELINES = (*TORCH_ENGINES, "ort", "ort-noopt")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
CONFIG_FILE_SCHEMA = {
    "type": "object",
    "required": ["configs"],
    "additionalProperties": False,
    "properties": {
        "configs": {
            "type": "array",
            "maxItems": 64,
            "items": {
                "oneOf": [
                    {"type": "string", "maxLength": 200},
                    {
                        "type": "object",
                        "required": ["name", "passes"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "maxLength": 64},
                            "passes": {"type": "array", "maxItems": 16, "items": {"type": "string", "maxLength": 64}},
                            "options": {"type": "object", "additionalProperties": {"type": "object"}},
                            "opt": {"type": "boolean"},
                        },
                    },
                ]
            },
        }
    },
}


def parse_configs(text=None, pass_options: dict | None = None, config_file=None) -> dict[str, dict]:
    """The configurations to run, by name: ``text`` lists torch, torch-amp, torch-cl, ort, ort-noopt and
    ort+PASS[+PASS...] (ort+all: every pass), comma-separated; ``pass_options`` ({pass: {option:
    value}}, the compile flags ``--skip-tau 1.5`` ...) apply to every configuration that runs the
    pass; ``config_file`` (JSON ``{"configs": [NAME | {"name", "passes", "options", "opt"}]}``) adds
    named configurations with options of their own (e.g. two reuse strategies side by side).
    Returns name -> {"engine": torch|torch-amp|torch-cl|ort, "passes", "options", "opt"}."""
    items: list = []
    if text is not None:
        if not isinstance(text, str):
            raise AccelcError(f"--configs must be a comma-separated string, got {type(text).__name__}")
        if "[" in text:
            raise AccelcError(
                "pass options go in the pass flags (e.g. --skip-tau 1.5, as compile takes them) or in a "
                f"--config-file, not in brackets: {show(text, 80)}"
            )
        items += [c.strip() for c in text.split(",") if c.strip()]
    if config_file is not None:
        items += _read_config_file(config_file)
    out: dict[str, dict] = {}
    shared = dict(pass_options or {})
    used = set()
    for item in items:
        if isinstance(item, str):
            name, spec = item, _named(item)
            given = {p: dict(shared[p]) for p in spec["passes"] if p in shared}
            spec["options"] = given
        else:
            name = item["name"]
            if not NAME.fullmatch(name):
                raise AccelcError(f"configuration name {show(name, 80)}: use letters, digits and _ . + -")
            passes = parse_pass_list(",".join(item["passes"]) if item["passes"] else "none")
            opts = {p: dict(shared.get(p, {}), **dict(item.get("options", {}).get(p, {}))) for p in passes}
            stray = set(item.get("options", {})) - set(passes)
            if stray:
                raise AccelcError(f"configuration {show(name)}: options for pass(es) it does not run: {sorted(stray)}")
            spec = {"engine": "ort", "passes": passes, "options": {p: o for p, o in opts.items() if o}}
            spec["opt"] = bool(item.get("opt", True))
            _check_reserved(name, spec, any(item.get("options", {}).values()))
        check_pass_options(spec["passes"], spec["options"], defaults=spec.get("opt", True))
        if name in out:
            raise AccelcError(f"configuration {show(name)} is listed twice")
        used |= set(spec["passes"])
        out[name] = spec
    if not out:
        raise AccelcError("--configs is empty")
    unused = sorted(set(shared) - used - {n for n, c in registered().items() if c.default})
    if unused:
        cls = registered()[unused[0]]
        flag = cls.flag(next(iter(shared[unused[0]]))) if shared[unused[0]] else unused[0]
        raise AccelcError(f"{flag} given but no configuration runs pass '{unused[0]}'")
    return out


def _meaning(spec: dict) -> str:
    if spec["engine"] != "ort":
        return TORCH_ENGINES.get(spec["engine"], spec["engine"])
    opt = "" if spec.get("opt", True) else " without the opt pass"
    return f"ORT with passes {'+'.join(spec['passes'])}{opt}" if spec["passes"] else f"plain ORT{opt}"


def _check_reserved(name: str, spec: dict, own_options: bool) -> None:
    """A --config-file entry may take a name --configs gives a meaning (torch, torch-amp, ort,
    ort-noopt, ort+PASS...) only to mean exactly that: the report compares against the rows of
    those names (ratios, the ort-best target), so an entry named 'ort' that ran skip would make
    every comparison silently wrong."""
    if name not in BASELINES and not name.startswith("ort+"):
        return
    try:
        meant = _named(name)
    except AccelcError:
        meant = None
    if (
        meant is not None
        and not own_options
        and (meant["engine"], meant["passes"], bool(meant["opt"])) == (spec["engine"], spec["passes"], spec["opt"])
    ):
        return
    means = _meaning(meant) if meant is not None else "the passes named after 'ort+'"
    raise AccelcError(
        f"configuration name '{show(name)}' is reserved for {means}"
        + (" (pass options: the pass flags)" if meant is not None and own_options else "")
        + f"; this entry runs {_meaning(spec)}{' with options of its own' if own_options else ''}: give it another name"
    )


def _named(c: str) -> dict:
    """A configuration given by name (see :func:`parse_configs`)."""
    if c in TORCH_ENGINES:
        return {"engine": c, "passes": [], "options": {}, "opt": False}
    if c in ("ort", "ort-noopt"):
        return {"engine": "ort", "passes": [], "options": {}, "opt": c == "ort"}
    m = re.fullmatch(r"ort\+([\w+]+)", c)
    if not m:
        raise AccelcError(
            f"unknown configuration {show(c, 80)}; use {', '.join(BASELINES)}, ort+PASS[+PASS...] or ort+all "
            "(pass options: the pass flags or --config-file)"
        )
    every = [n for n, cls in registered().items() if not cls.default]
    names = parse_pass_list(every if m.group(1) == "all" else m.group(1).replace("+", ","))
    return {"engine": "ort", "passes": names, "options": {}, "opt": True}


def config_passes(c: str) -> tuple[list[str], dict]:
    """A named configuration's passes: ('ort+skip') -> (['skip'], {})."""
    spec = _named(c)
    return spec["passes"], spec["options"]


MAX_CONFIG_FILE = 1 << 20  # bytes of a --config-file (64 configurations take a few KB)


def _not_regular(path, mode: int) -> AccelcError:
    what = "a folder" if stat.S_ISDIR(mode) else "a FIFO, device or socket"
    return AccelcError(f"--config-file '{show(path)}' is not a regular file ({what}); give a JSON file")


def _read_config_bytes(path) -> bytes:
    """The bytes of a --config-file: a regular file of at most MAX_CONFIG_FILE bytes. Anything else
    is refused before it is opened (a FIFO would block the open forever, a device never end), and
    again on the open file (the path may have been swapped in between)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise AccelcError(f"--config-file '{show(path)}': {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise _not_regular(path, st.st_mode)
            if st.st_size > MAX_CONFIG_FILE:
                raise AccelcError(f"--config-file '{show(path)}' is larger than 1 MiB")
            os.set_blocking(fh.fileno(), True)
            raw = fh.read(MAX_CONFIG_FILE + 1)  # bounded even if it grows while read
    except OSError as e:
        raise AccelcError(f"--config-file '{show(path)}': {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_FILE:
        raise AccelcError(f"--config-file '{show(path)}' is larger than 1 MiB")
    return raw


def _read_config_file(path) -> list:
    import jsonschema

    checks.path_like("--config-file", path)
    raw = _read_config_bytes(path)
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AccelcError(f"--config-file '{show(path)}' is not valid JSON ({show(str(e), 120)})") from None
    try:
        jsonschema.validate(doc, CONFIG_FILE_SCHEMA)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "the top level"
        raise AccelcError(f"--config-file '{show(path)}': at {show(where)}: {show(e.message, 200)}") from None
    return doc["configs"]
