"""The JSON files accelc reads back (``report.json``, ``plan.json``) and how they are checked.

Every file accelc reads back may have been edited, damaged or replaced since accelc wrote it.
:func:`parse_json` turns bytes into a document or one line saying why it cannot (too large, not
UTF-8, not JSON, nested too deeply, a lone surrogate); :func:`check` validates the document against
a JSON Schema (draft 2020-12, the ``jsonschema`` library) and names the first problem by its field
path, e.g. ``report.json: passes[0].name must be a string``.

The schemas describe what accelc itself writes; fields a reader does not use are allowed but, where
present, have the type accelc writes. Numbers a run depends on must also be finite (the ``finite``
keyword, added to the standard vocabulary here).
"""

from __future__ import annotations

import math
import re

from .errors import AccelcError, show
from .method import installed

MAX_JSON_BYTES = 64 << 20  # report.json of a ResNet-18 is ~60 kB
MAX_DEPTH = 64  # accelc writes at most ~8 levels
INT32 = 2**31 - 1
SHA256 = r"^[0-9a-f]{64}$"
# a stage is a subdirectory of the artifact directory: one plain name, never '.', '..' or a path
STAGE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$"
# the files whose content hashes report.json records (see artifact_dir.HASHED)
HASHED_NAME = r"^(training_model\.onnx|eval_model\.onnx|optimizer_model\.onnx)(\.data)?$|^(checkpoint|plan\.json)$"
LOSSES = ("cross_entropy",)
OPTIMIZERS = ("adamw", "sgd")


# ----------------------------------------------------------------------------- building blocks
def _int(low: int = 0, high: int = INT32) -> dict:
    return {"type": "integer", "minimum": low, "maximum": high}


def _num(low: float | None = None, exclusive: bool = False, high: float | None = None, exclusive_high=False) -> dict:
    s: dict = {"type": "number", "finite": True}
    if low is not None:
        s["exclusiveMinimum" if exclusive else "minimum"] = low
    if high is not None:
        s["exclusiveMaximum" if exclusive_high else "maximum"] = high
    return s


def _enum(*values) -> dict:
    return {"enum": list(values)}


NAME = {"type": "string", "minLength": 1, "maxLength": 4096}
STRINGS = {"type": "array", "items": {"type": "string"}}
NAMES = {"type": "array", "items": NAME}
DIMS = {"type": "array", "items": _int(1), "minItems": 1, "maxItems": 8}

# ----------------------------------------------------------------------------- report.json
MODEL = {
    "type": "object",
    "required": ["input_name", "input_shape", "output_name", "num_classes", "params", "frozen"],
    "properties": {
        "input_name": NAME,
        "input_shape": DIMS,
        "output_name": NAME,
        "num_classes": _int(1),
        "params": {**NAMES, "uniqueItems": True},
        "frozen": {**NAMES, "uniqueItems": True},
        "param_count": _int(0, 2**62),
    },
}

OPTIONS = {
    "type": "object",
    "required": ["loss", "optimizer", "lr", "batch_size"],
    "properties": {
        "loss": _enum(*LOSSES),
        "optimizer": _enum(*OPTIMIZERS),
        "lr": _num(0, exclusive=True),
        "batch_size": _int(1),
    },
}

PASS_RECORD = {
    "type": "object",
    "required": ["name", "modified"],
    "properties": {
        "name": NAME,
        "options": {"type": "object"},
        "modified": {"type": "boolean"},
        "changes": {
            "type": "array",
            "items": {"type": ["object", "string"], "properties": {"summary": {"type": "string"}}},
        },
        "seconds": {"type": ["number", "null"]},
        "check_seconds": {"type": ["number", "null"]},
        "validation": {"type": ["object", "null"]},
    },
}

# the cost model's figures (compiler.cost): every record holds only these numbers
_AMOUNT = {"type": "number", "finite": True, "minimum": 0}
COST = {
    "type": "object",
    "required": ["flops", "bytes"],
    "additionalProperties": False,
    "properties": {k: _AMOUNT for k in ("flops", "flops_bound", "bytes", "bytes_read", "bytes_written")},
}
GRAPH_COSTS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "total": COST,
        "phases": {"type": "object", "additionalProperties": COST},
        "layers": {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": COST}},
        "trainable_elements": _int(0, 2**62),
        "assumptions": STRINGS,
    },
}
COSTS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "before": GRAPH_COSTS,
        "after": GRAPH_COSTS,
        "stages": {"type": "object", "additionalProperties": COST},
    },
}

REPORT = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "accelc report.json",
    "type": "object",
    "required": ["input", "model", "options"],
    "properties": {
        "accelc_version": {"type": "string"},
        "input": {
            "type": "object",
            "properties": {"file": {"type": ["string", "null"]}, "sha256": {"type": "string", "pattern": SHA256}},
        },
        "model": MODEL,
        "options": OPTIONS,
        "fixups": STRINGS,
        "warnings": STRINGS,
        "passes": {"type": "array", "items": PASS_RECORD},
        "plan": {"type": "array", "items": {"type": "object"}},
        "validation": {"type": ["object", "null"]},
        "costs": COSTS,
        "layers": {"type": "array", "items": {"type": "object"}},
        "compile_seconds": {"type": ["number", "null"]},
        "stage_of": {"type": "string"},
        "files": {
            "type": "object",
            "propertyNames": {"pattern": HASHED_NAME},
            "additionalProperties": {"type": "string", "pattern": SHA256},
            "required": ["training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint"],
        },
    },
}

# ----------------------------------------------------------------------------- plan.json
# Each entry is {"type": METHOD, "options": {...}, ...the method's own fields}: the schema of an
# entry is derived from the installed method's Options and its declared plan fields
# (Method.plan_schema); no method is named here.


def plan_schema() -> dict:
    typed = [
        {
            "if": {"properties": {"type": {"const": kind}}, "required": ["type"]},
            "then": {"type": "object", **schema},
        }
        for kind, schema in ((m.name, m.plan_schema()) for m in installed() if m.algorithm is not None)
    ]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "accelc plan.json",
        "type": "object",
        "required": ["controllers"],
        "properties": {
            "controllers": {
                "type": "array",
                "maxItems": 64,
                "items": {
                    "type": "object",
                    "required": ["type"],
                    "properties": {
                        "type": {"type": "string", "pattern": r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$"},
                        "stage": {"type": "string", "pattern": STAGE_NAME},
                    },
                    "allOf": typed,
                },
            }
        },
    }


# ----------------------------------------------------------------------------- parsing
def parse_json(data: bytes, what: str, limit: int = MAX_JSON_BYTES):
    """``data`` as a JSON document, or one :class:`AccelcError` line naming ``what`` and the reason."""
    import json

    if len(data) > limit:
        raise AccelcError(f"{what} is {len(data):,} bytes, larger than any file accelc writes ({limit:,}); refused")
    if not data.strip():
        raise AccelcError(f"{what} is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AccelcError(f"{what} is not UTF-8 text (byte {e.start}); not a file accelc wrote") from None
    try:
        doc = json.loads(text)
    except RecursionError:
        raise AccelcError(f"{what} is nested too deeply (more than {MAX_DEPTH} levels)") from None
    except ValueError as e:
        msg = getattr(e, "msg", None) or str(e)
        where = f" at line {e.lineno} column {e.colno}" if hasattr(e, "lineno") else ""
        raise AccelcError(f"{what} is not valid JSON: {show(msg, 120)}{where}") from None
    _walk(doc, what)
    return doc


def _walk(doc, what: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH (validators recurse) and strings Python cannot print."""
    stack = [(doc, 1, "")]
    while stack:
        v, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            raise AccelcError(f"{what} is nested too deeply (more than {MAX_DEPTH} levels, at {show(path, 80)})")
        if isinstance(v, dict):
            for k, x in v.items():
                _text(k, what, path)
                stack.append((x, depth + 1, _join(path, k)))
        elif isinstance(v, list):
            stack.extend((x, depth + 1, _join(path, i)) for i, x in enumerate(v))
        elif isinstance(v, str):
            _text(v, what, path)


def _text(s: str, what: str, path: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise AccelcError(
            f"{what}: {show(path or 'the document', 80)} holds an invalid \\u escape (lone surrogate)"
        ) from None


def _join(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{path}.{key}" if path else key
    return f"{path}[{show(repr(key), 60)}]"


# ----------------------------------------------------------------------------- validation
_CLASS: list = []


def _finite(validator, value, instance, schema):
    from jsonschema import ValidationError

    if value and isinstance(instance, float) and not math.isfinite(instance):
        yield ValidationError(f"{instance!r} is not a finite number")


def _validator(schema: dict):
    if not _CLASS:
        from jsonschema import Draft202012Validator, validators  # only needed when a file is read

        _CLASS.append(validators.extend(Draft202012Validator, {"finite": _finite}))
    return _CLASS[0](schema)


_KIND = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "object": "an object",
    "array": "a list",
    "null": "null",
}


def check(doc, schema: dict, what: str) -> None:
    """Validate ``doc`` against ``schema``; one line naming the field path and what is wrong."""
    from jsonschema.exceptions import best_match

    err = best_match(_validator(schema).iter_errors(doc))
    if err is None:
        return
    path = ""
    for k in err.absolute_path:
        path = _join(path, k)
    raise AccelcError(f"{what}: {_describe(err, path)}")


def _describe(err, path: str) -> str:
    v, val, inst = err.validator, err.validator_value, err.instance
    field = show(path, 100) or "the document"
    if v == "type":
        kinds = [val] if isinstance(val, str) else list(val)
        return f"{field} must be {' or '.join(_KIND.get(k, k) for k in kinds)}, not {_kind(inst)}"
    if v == "required":
        missing = [k for k in val if isinstance(inst, dict) and k not in inst]
        name = show(missing[0] if missing else val[0], 60)
        return f"{field + ' ' if path else ''}is missing the field '{name}'"
    if v == "enum":
        return f"{field} must be one of {', '.join(show(x, 30) for x in val)}, not {show(repr(inst), 60)}"
    if v == "const":
        return f"{field} must be {show(repr(val), 60)}"
    if v in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[v]
        return f"{field} must be {op} {val}, not {show(inst, 40)}"
    if v == "finite":
        return f"{field} must be a finite number, not {show(inst, 40)}"
    if v in ("minItems", "maxItems"):
        return f"{field} must have {'at least' if v == 'minItems' else 'at most'} {val} item(s), not {len(inst)}"
    if v == "minLength":
        return f"{field} must be a non-empty string" if val == 1 else f"{field} must be at least {val} characters"
    if v == "maxLength":
        return f"{field} must be at most {val} characters"
    if v == "uniqueItems":
        return f"{field} must not repeat an item"
    if "propertyNames" in err.schema_path:
        return f"{field} has an unexpected entry {show(repr(inst), 60)}"
    if v == "pattern":
        return f"{field} is malformed: {show(repr(inst), 60)}"
    return f"{field}: {show(err.message, 160)}"


def _kind(inst) -> str:
    if isinstance(inst, bool):
        return "true" if inst else "false"
    if inst is None:
        return "null"
    for t, name in ((str, "a string"), (int, "an integer"), (float, "a number"), (dict, "an object"), (list, "a list")):
        if isinstance(inst, t):
            return name
    return type(inst).__name__
