"""The pass contract and the pass registry.

A pass (in the style of onnx-ir's passes) is a class that declares:

* ``name``, a one-line ``summary`` and the ``paper`` it implements;
* ``options``: typed :class:`Option` objects, each validated the same way whether the value comes
  from the CLI (a string) or from Python (a value);
* ``rank``: where it stands in the composition order (passes run in increasing rank; a list in
  another order is refused with the order to use);
* ``default``: True for a pass that runs unless turned off (``--no-opt``);
* ``in_place``: True when ``run`` edits the artifacts it is given (the manager then hands it a
  copy, so the unrewritten artifacts stay available to ``ensures``);
* ``requires(artifacts, options)``: preconditions, raising :class:`AccelcError` with the reason;
* ``run(artifacts, options) -> PassResult``: the rewrite, which tags what it adds or changes with
  :mod:`accelc.compiler.provenance`;
* ``ensures(before, after, options)``: the numeric self-check of the rewrite; returns a short
  description of what was checked (or None).

Passes register with :func:`register`; the manager (:mod:`accelc.compiler.manager`) runs them
over every stage of an artifact set and validates every stage after each pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from .artifacts import Artifacts
from .errors import AccelcError


@dataclass
class Option:
    """A documented pass option. ``parse`` turns a CLI string *or* a Python value into the
    option's value and raises ValueError/TypeError (with the reason) when it is not valid."""

    default: Any
    help: str
    parse: Callable[[Any], Any] = str
    flag: str | None = None  # CLI flag, e.g. "--mypass-layers"; default --<pass>-<option>
    choices: tuple | None = None  # shown in --help


# ---------------------------------------------------------------- option parsers shared by passes
def choice(*values: str):
    """Parser: one of ``values`` ('choose from a, b')."""

    def parse(value):
        if not isinstance(value, str) or value not in values:
            raise ValueError(f"choose from {', '.join(values)}")
        return value

    parse.choices = values
    return parse


def _number(value, kind):
    if isinstance(value, bool):
        raise TypeError(f"expected a number, got {value!r}")
    if isinstance(value, str):
        return kind(value.strip())
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"expected an integer, got {value}")
    return kind(value)


def int_at_least(low: int):
    """Parser: an integer >= ``low``."""

    def parse(value):
        v = _number(value, int)
        if v < low:
            raise ValueError(f"must be an integer >= {low}")
        return v

    return parse


def positive_float(value):
    """Parser: a finite number > 0."""
    v = _number(value, float)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError("must be a finite number > 0")
    return v


def fraction(value):
    """Parser: a number in [0, 1)."""
    v = _number(value, float)
    if not 0 <= v < 1:
        raise ValueError("must be in [0, 1)")
    return v


def integer(value):
    """Parser: any integer."""
    return _number(value, int)


def name_list(value):
    """Parser: comma-separated names, or a list of names."""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, str) for v in value):
            raise TypeError("expected a list of names")
        return [v.strip() for v in value if v.strip()]
    if not isinstance(value, str):
        raise TypeError(f"expected comma-separated names, got {value!r}")
    return [s.strip() for s in value.split(",") if s.strip()]


@dataclass
class PassResult:
    artifacts: Artifacts
    modified: bool
    changes: list = field(default_factory=list)  # JSON-ready records of what changed


class Pass:
    name: str = ""
    summary: str = ""
    paper: str = ""
    options: dict[str, Option] = {}
    rank: int = 100
    default: bool = False
    in_place: bool = True

    def requires(self, artifacts: Artifacts, options: dict) -> None:
        """Raise AccelcError (one line, the reason) if the pass cannot run on these artifacts."""

    def run(self, artifacts: Artifacts, options: dict) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def ensures(self, before: Artifacts, after: Artifacts, options: dict) -> str | None:
        """Numeric check of the rewrite; return a short description of what was checked, or None."""
        return None

    @classmethod
    def flag(cls, option: str) -> str:
        opt = cls.options[option]
        return opt.flag or f"--{cls.name}-{option.replace('_', '-')}"

    @classmethod
    def resolve_options(cls, given: dict | None) -> dict:
        """Every option's value, parsed and validated (CLI strings and Python values alike)."""
        given = given or {}
        if not isinstance(given, dict):
            raise AccelcError(f"options of pass '{cls.name}' must be a dict, got {type(given).__name__}")
        unknown = set(given) - set(cls.options)
        if unknown:
            raise AccelcError(
                f"pass '{cls.name}' has no option(s) {sorted(map(str, unknown))}; "
                f"valid: {', '.join(cls.options) or 'none'}"
            )
        out = {}
        for k, opt in cls.options.items():
            if k not in given or given[k] is None:
                out[k] = opt.default
                continue
            try:
                out[k] = opt.parse(given[k])
            except (ValueError, TypeError) as e:
                raise AccelcError(f"bad value {given[k]!r} for {cls.flag(k)}: {e}") from None
        return out


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by name (``--passes NAME``)."""
    if not cls.name or not isinstance(cls.name, str):
        raise ValueError("a pass needs a name")
    for k, opt in cls.options.items():
        if opt.choices is None and getattr(opt.parse, "choices", None):
            opt.choices = opt.parse.choices
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Pass]]:
    """Registered passes, in composition order."""
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[1].rank, kv[0])))


def default_passes() -> list[str]:
    return [n for n, c in registered().items() if c.default]


def order_of(names: list[str]) -> list[str]:
    reg = registered()
    return sorted(names, key=lambda n: (reg[n].rank, n))


def check_order(names: list[str]) -> None:
    """Refuse passes given out of composition order, naming the order to use."""
    want = order_of(names)
    if list(names) != want:
        optional = [n for n, c in registered().items() if not c.default]
        raise AccelcError(
            f"passes compose only in the order {', '.join(optional)}: give --passes "
            f"{','.join(n for n in want if n in optional)} (got {','.join(n for n in names if n in optional)}); "
            f"a pass rewrites what the passes before it made"
        )


def parse_pass_list(value) -> list[str]:
    """``"a,b"``, ``["a"]``, ``"none"`` or None -> checked pass names (raises AccelcError)."""
    if value is None:
        return []
    if isinstance(value, str):
        names = [] if value.strip() in ("", "none") else [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        names = [p.strip() for p in value if p.strip()]
    else:
        raise AccelcError(f"passes must be a comma-separated string or a list of names, got {value!r}")
    reg = registered()
    bad = [n for n in names if n not in reg]
    if bad:
        raise AccelcError(f"unknown pass(es) {', '.join(bad)}; available: {', '.join(reg) or 'none'} (or 'none')")
    if len(set(names)) != len(names):
        raise AccelcError(f"a pass is listed twice in --passes {','.join(names)}")
    check_order([n for n in names if not reg[n].default])
    return names


def get(name: str) -> type[Pass]:
    reg = registered()
    if name not in reg:
        raise AccelcError(f"unknown pass '{name}'; available: {', '.join(reg) or 'none'}")
    return reg[name]
