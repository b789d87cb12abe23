"""Options: one typed definition per method.

A method's options are a frozen dataclass derived from :class:`Options`, each field declared with
:func:`option` (its default, help text, parser and CLI flag). Everything else comes from that one
definition: the CLI flags (``--<method>-<option>``), the Python validation (the same parser sees a
CLI string and a Python value, so ``tau=-3`` and ``--skip-tau -3`` get the same message), the
JSON schema of the options' form in ``plan.json``, and the run-time algorithm's typed settings
(``self.options.tau``). A value is parsed once, where it enters: the facade parses what the user
gave, :meth:`Options.from_plan` what a plan file holds.

Parsers are plain functions ``value -> value`` raising ValueError/TypeError with the reason; the
shared ones below carry a ``schema`` attribute (their JSON-schema fragment) from which the plan
schema is derived (a parser without one accepts any JSON value there and checks it when parsed).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from .checks import got
from .errors import InvalidType, InvalidValue, show

OPTION = "accelc.option"  # the field metadata key holding an option's Option


@dataclass
class Option:
    """A documented option. ``parse`` turns a CLI string *or* a Python value into the option's
    value and raises ValueError/TypeError (with the reason) when it is not valid."""

    default: Any
    help: str
    parse: Callable[[Any], Any] = str
    flag: str | None = None  # CLI flag, e.g. "--mypass-layers"; default --<method>-<option>
    choices: tuple | None = None  # shown in --help as {a,b}; taken from a choice(...) parser when not given

    def __post_init__(self):
        if self.choices is None and getattr(self.parse, "choices", None):
            self.choices = tuple(self.parse.choices)

    def schema(self) -> dict:
        """The JSON schema of the option's parsed value (``null`` allowed when the default is None)."""
        s = dict(getattr(self.parse, "schema", None) or {})
        if s.get("type") == "number":
            s["finite"] = True  # JSON's NaN and Infinity are no option values
        if self.default is None and s:
            return {"anyOf": [{"type": "null"}, s]}
        return s


def option(default, help: str, parse: Callable[[Any], Any] = str, flag: str | None = None, choices=None):
    """A field of an :class:`Options` dataclass: ``tau: float = option(2.0, "the threshold", positive_float)``."""
    opt = Option(default, help, parse, flag, choices)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={OPTION: opt})
    return dataclasses.field(default=default, metadata={OPTION: opt})


def _jsonable(v):
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


@dataclass(frozen=True)
class Options:
    """Base of a method's options (see the module doc). Instances are immutable and hold parsed
    values; read them as attributes (``opts.tau``) or, for generic code, as a mapping
    (``opts["tau"]``, ``dict(opts)``)."""

    method_name: ClassVar[str] = ""  # the method's name, for flags and messages (set by the Method)

    # ------------------------------------------------------------------ the definition
    @classmethod
    def fields(cls) -> dict[str, Option]:
        """Option name -> its :class:`Option`, in declaration order."""
        return {f.name: f.metadata[OPTION] for f in dataclasses.fields(cls) if OPTION in f.metadata}

    @classmethod
    def flag(cls, name: str) -> str:
        opt = cls.fields()[name]
        return opt.flag or f"--{cls.method_name}-{name.replace('_', '-')}"

    @classmethod
    def schema(cls) -> dict:
        """The JSON schema of the options' form in plan.json (every option present, no other key)."""
        fields = cls.fields()
        return {
            "type": "object",
            "required": list(fields),
            "additionalProperties": False,
            "properties": {k: o.schema() for k, o in fields.items()},
        }

    # ------------------------------------------------------------------ parsing
    @classmethod
    def parse_one(cls, name: str, value, where: str | None = None):
        """One option's value through its parser; InvalidType/InvalidValue naming the flag (or,
        for a value read from a file, ``where`` and the option's name)."""
        try:
            return cls.fields()[name].parse(value)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError) as e:
            kind = InvalidType if isinstance(e, (TypeError, AttributeError)) else InvalidValue
            label = cls.flag(name) if where is None else f"{where} '{name}'"
            raise kind(option_message(label, e, value)) from None

    @classmethod
    def parse(cls, given=None, where: str | None = None) -> "Options":
        """The options from what a user gave ({option: value}, CLI strings and Python values alike;
        an instance is returned as it is). None stands for "not given" only where the option's
        default is None; elsewhere it is a value of the wrong type, like any other."""
        if isinstance(given, cls):
            return given
        if given is None:
            given = {}
        if isinstance(given, Options):
            given = dict(given)
        if not isinstance(given, dict):
            raise InvalidType(f"options of pass '{cls.method_name}' must be a dict, got {type(given).__name__}")
        fields = cls.fields()
        unknown = [k for k in given if k not in fields]
        if unknown:
            raise InvalidValue(
                f"pass '{cls.method_name}' has no option(s) {', '.join(show(k, 60) for k in unknown)}; "
                f"valid: {', '.join(fields) or 'none'}"
            )
        values = {}
        for k, opt in fields.items():
            if k not in given or (given[k] is None and opt.default is None):
                # a default written as CLI text (e.g. reuse's "288:6,144:8,72:10") is parsed like one
                values[k] = cls.parse_one(k, opt.default) if isinstance(opt.default, str) else opt.default
            else:
                values[k] = cls.parse_one(k, given[k], where)
        return cls(**values)

    @classmethod
    def from_plan(cls, value, where: str) -> "Options":
        """The options a plan file holds (checked against :meth:`schema` when the file was read),
        through their parsers: an option missing takes its default, a bad value is an AccelcError
        naming ``where`` and the option (``plan.json: the reuse controller's 'margin' must be ...``)."""
        if value is not None and not isinstance(value, dict):
            raise InvalidType(f"{where} options must be an object, got {type(value).__name__}")
        return cls.parse(value, where)

    def to_json(self) -> dict:
        return {k: _jsonable(getattr(self, k)) for k in self.fields()}

    # ------------------------------------------------------------------ read as a mapping
    def __getitem__(self, name: str):
        if name not in self.fields():
            raise KeyError(name)
        return getattr(self, name)

    def get(self, name: str, default=None):
        return getattr(self, name) if name in self.fields() else default

    def keys(self):
        return self.fields().keys()

    def items(self):
        return [(k, getattr(self, k)) for k in self.fields()]

    def __iter__(self):
        return iter(self.fields())

    def __len__(self) -> int:
        return len(self.fields())


def option_message(flag: str, error: BaseException, value) -> str:
    """``--skip-tau must be a finite number > 0, got -3`` from a parser's reason."""
    reason = " ".join(str(error).split()) or type(error).__name__
    reason = show(reason, 160)
    text = f"{flag} {reason}" if reason.startswith(("must ", "needs ")) else f"{flag}: {reason}"
    if "got " not in reason:
        text += f", got {got(value) if not isinstance(value, (list, tuple, dict)) else show(repr(value), 80)}"
    return text


# ---------------------------------------------------------------- parsers shared by methods
def with_schema(schema: dict, choices=None):
    """Decorator: give a parser its JSON-schema fragment (and choices for --help)."""

    def mark(fn):
        fn.schema = schema
        if choices is not None:
            fn.choices = tuple(choices)
        return fn

    return mark


def choice(*values: str):
    """Parser: one of ``values`` ('choose from a, b')."""

    @with_schema({"enum": list(values)}, values)
    def parse(value):
        if not isinstance(value, str):
            raise TypeError(f"choose from {', '.join(values)}")
        if value not in values:
            raise ValueError(f"choose from {', '.join(values)}")
        return value

    return parse


def _number(value, kind):
    """``value`` (a CLI string or a Python number) as ``kind`` (int or float); TypeError for a
    value of another type, ValueError for text that is not such a number."""
    what = "an integer" if kind is int else "a number"
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            raise ValueError(f"expected {what}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"expected {what}")
    if kind is int and not isinstance(value, numbers.Integral):
        if not (math.isfinite(value) and float(value).is_integer()):
            raise ValueError(f"expected {what}")
    return kind(value)


def int_at_least(low: int):
    """Parser: an integer >= ``low``."""

    @with_schema({"type": "integer", "minimum": low})
    def parse(value):
        v = _number(value, int)
        if v < low:
            raise ValueError(f"must be an integer >= {low}")
        return v

    return parse


@with_schema({"type": "number", "exclusiveMinimum": 0})
def positive_float(value):
    """Parser: a finite number > 0."""
    v = _number(value, float)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError("must be a finite number > 0")
    return v


@with_schema({"type": "number", "minimum": 0, "exclusiveMaximum": 1})
def fraction(value):
    """Parser: a number in [0, 1)."""
    v = _number(value, float)
    if not 0 <= v < 1:
        raise ValueError("must be in [0, 1)")
    return v


@with_schema({"type": "number", "exclusiveMinimum": 0, "maximum": 1})
def part(value):
    """Parser: a number in (0, 1] (a part of a whole, e.g. of a run's epochs)."""
    v = _number(value, float)
    if not 0 < v <= 1:
        raise ValueError("must be in (0, 1]")
    return v


@with_schema({"type": "integer"})
def integer(value):
    """Parser: any integer."""
    return _number(value, int)


@with_schema({"type": "array", "items": {"type": "string"}})
def name_list(value):
    """Parser: comma-separated names, or a list of names."""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, str) for v in value):
            raise TypeError("expected a list of names")
        return [v.strip() for v in value if v.strip()]
    if not isinstance(value, str):
        raise TypeError("expected comma-separated names")
    return [s.strip() for s in value.split(",") if s.strip()]


@with_schema({"type": "boolean"})
def boolean(value):
    """Parser: a bool, or yes/no text (true/false, on/off, 1/0)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.strip().lower() in ("true", "yes", "on", "1")
    raise TypeError("expected true or false")
