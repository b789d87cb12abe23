"""The pass contract and the pass registry.

A pass (in the style of onnx-ir's passes) is a class that declares:

* ``name``, a one-line ``summary`` and the ``paper`` it implements;
* ``options``: typed :class:`Option` objects, each validated the same way whether the value comes
  from the CLI (a string) or from Python (a value);
* ``rank``: where it stands in the composition order (passes run in increasing rank; a list in
  another order is put into this order, with a :class:`PassOrderWarning` saying so);
* ``default``: True for a pass that runs unless turned off (``--no-opt``);
* ``in_place``: True when ``run`` edits the artifacts it is given (the manager then hands it a
  copy, so the unrewritten artifacts stay available to ``ensures``);
* ``requires(artifacts, options)``: preconditions, raising :class:`AccelcError` with the reason;
* ``run(artifacts, options) -> PassResult``: the rewrite, which tags what it adds or changes with
  :mod:`accelc.compiler.provenance`;
* ``ensures(before, after, options)``: the numeric self-check of the rewrite; returns a short
  description of what was checked (or None);
* ``explain(record, plan)``: what the pass did, in a few plain sentences, from its record in
  report.json (the default groups the change records; a pass may say more).

Passes register with :func:`register`; the manager (:mod:`accelc.compiler.manager`) runs them
over every stage of an artifact set and validates every stage after each pass.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from .artifacts import Artifacts
from .checks import got
from .errors import InvalidType, InvalidValue, show


@dataclass
class Option:
    """A documented pass option. ``parse`` turns a CLI string *or* a Python value into the
    option's value and raises ValueError/TypeError (with the reason) when it is not valid."""

    default: Any
    help: str
    parse: Callable[[Any], Any] = str
    flag: str | None = None  # CLI flag, e.g. "--mypass-layers"; default --<pass>-<option>
    choices: tuple | None = None  # shown in --help as {a,b}; taken from a choice(...) parser when not given

    def __post_init__(self):
        if self.choices is None and getattr(self.parse, "choices", None):
            self.choices = tuple(self.parse.choices)


# ---------------------------------------------------------------- option parsers shared by passes
def choice(*values: str):
    """Parser: one of ``values`` ('choose from a, b')."""

    def parse(value):
        if not isinstance(value, str):
            raise TypeError(f"choose from {', '.join(values)}")
        if value not in values:
            raise ValueError(f"choose from {', '.join(values)}")
        return value

    parse.choices = values
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
        raise TypeError("expected comma-separated names")
    return [s.strip() for s in value.split(",") if s.strip()]


@dataclass
class PassResult:
    artifacts: Artifacts
    modified: bool
    changes: list = field(default_factory=list)  # JSON-ready records of what changed

    @classmethod
    def of_graph(cls, art: Artifacts, tg, changes: list) -> "PassResult":
        """The result of rules applied to ``tg`` (the graph view of ``art``'s training model):
        unchanged when no rule changed anything, else the artifacts with the graph written back."""
        if not changes:
            return cls(art, False, [])
        tg.reindex()
        art.training = tg.to_onnx()
        return cls(art, True, changes)


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
    def explain(cls, record: dict, plan: list | None = None) -> list[str]:
        """What the pass did, in a few plain sentences, from its record in report.json (``record``:
        name, options, modified, changes) and the artifacts' plan. The default groups the change
        records (see :func:`describe_changes`) and names a run-time controller the pass planned."""
        out = []
        if record.get("modified"):
            out.append(describe_changes(record.get("changes") or []) or "rewrote the training graph")
        else:
            out.append(describe_changes(record.get("changes") or []) or "changed nothing")
        if any(isinstance(c, dict) and c.get("type") == cls.name for c in plan or []):
            out.append("its run-time controller acts during training (plan.json)")
        return out

    @classmethod
    def details(cls, record: dict) -> list[str]:
        """Lines shown under the pass's line in the compile report and ``accelc inspect`` (e.g.
        per-layer predictions), from its record in report.json; [] by default."""
        return []

    @classmethod
    def flag(cls, option: str) -> str:
        opt = cls.options[option]
        return opt.flag or f"--{cls.name}-{option.replace('_', '-')}"

    @classmethod
    def resolve_options(cls, given: dict | None) -> dict:
        """Every option's value, parsed and validated (CLI strings and Python values alike): the
        option's own parser sees both, so ``tau=-3`` from Python and ``--skip-tau -3`` from the CLI
        are refused with the same message. None stands for "not given" only where the option's
        default is None; elsewhere it is a value of the wrong type, like any other."""
        if given is None:
            given = {}
        if not isinstance(given, dict):
            raise InvalidType(f"options of pass '{cls.name}' must be a dict, got {type(given).__name__}")
        unknown = [k for k in given if k not in cls.options]
        if unknown:
            raise InvalidValue(
                f"pass '{cls.name}' has no option(s) {', '.join(show(k, 60) for k in unknown)}; "
                f"valid: {', '.join(cls.options) or 'none'}"
            )
        out = {}
        for k, opt in cls.options.items():
            if k not in given or (given[k] is None and opt.default is None):
                # a default written as CLI text (e.g. reuse's "288:6,144:8,72:10") is parsed like one
                out[k] = cls.parse_option(k, opt.default) if isinstance(opt.default, str) else opt.default
                continue
            out[k] = cls.parse_option(k, given[k])
        return out

    @classmethod
    def parse_option(cls, option: str, value):
        """One option's value through its parser; InvalidType/InvalidValue naming the flag."""
        try:
            return cls.options[option].parse(value)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError) as e:
            kind = InvalidType if isinstance(e, (TypeError, AttributeError)) else InvalidValue
            raise kind(option_message(cls.flag(option), e, value)) from None


def option_message(flag: str, error: BaseException, value) -> str:
    """``--skip-tau must be a finite number > 0, got -3`` from a parser's reason."""
    reason = " ".join(str(error).split()) or type(error).__name__
    reason = show(reason, 160)
    text = f"{flag} {reason}" if reason.startswith(("must ", "needs ")) else f"{flag}: {reason}"
    if "got " not in reason:
        text += f", got {got(value) if not isinstance(value, (list, tuple, dict)) else show(repr(value), 80)}"
    return text


_SKIP_KEYS = {"layer", "action", "summary", "node", "nodes", "functions", "removed_nodes", "frozen_params"}


def describe_changes(changes: list, limit: int = 6) -> str:
    """A pass's change records in one line: records with a ``summary`` "SUBJECT: WHAT" grouped by
    WHAT (``ReluGrad -> Greater/Cast/Mul: 7 nodes``), records with an ``action`` and a ``layer``
    grouped by action, with the settings they share (``reused: c2, c3 (L=144, H=8)``)."""
    groups: dict[str, list[str]] = {}
    shared: dict[str, dict] = {}
    for c in changes if isinstance(changes, list) else []:
        if not isinstance(c, dict):
            continue
        if c.get("action") and c.get("layer"):
            key = str(c["action"])
            subject = str(c["layer"])
            params = {k: v for k, v in c.items() if k not in _SKIP_KEYS and isinstance(v, (str, int, float, bool))}
            if key in shared:
                shared[key] = {k: v for k, v in shared[key].items() if params.get(k) == v}
            else:
                shared[key] = params
        elif c.get("summary"):
            subject, sep, what = str(c["summary"]).partition(": ")
            key, subject = (what, subject) if sep else (subject, "")
        else:
            continue
        groups.setdefault(key, []).append(subject)
    parts = []
    for key, subjects in groups.items():
        subjects = [s for s in subjects if s]
        named = ", ".join(subjects[:limit]) + (f", … ({len(subjects)} in all)" if len(subjects) > limit else "")
        if subjects and (len(named) > 90 or any("/" in s for s in subjects)):
            named = f"{len(subjects)} node{'s' if len(subjects) > 1 else ''}"
        params = ", ".join(f"{k}={v}" for k, v in shared.get(key, {}).items())
        if key in shared:
            parts.append(f"{key}: {named}" + (f" ({params})" if params else ""))
        elif len(subjects) == 1 and not named[0].isdigit():
            parts.append(f"{named}: {key}")
        else:
            parts.append(f"{key}" + (f": {named}" if subjects else ""))
    return "; ".join(parts)


class PassOrderWarning(UserWarning):
    """Passes were given in another order than the composition order; they run in that order."""


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


def in_order(names: list[str], warn: bool = True) -> list[str]:
    """``names`` in composition order; when that differs from the order given, a
    :class:`PassOrderWarning` says which order runs (the CLI prints it as one note line)."""
    want = order_of(names)
    reg = registered()
    optional = [n for n in want if not reg[n].default]
    if warn and [n for n in names if not reg[n].default] != optional:
        warnings.warn(
            f"passes run in the order {','.join(optional)} (each pass rewrites what the passes before it made)",
            PassOrderWarning,
            stacklevel=3,
        )
    return want


def check_order(names: list[str]) -> None:
    """Refuse passes given out of composition order, naming the order to use."""
    want = order_of(names)
    if list(names) != want:
        optional = [n for n, c in registered().items() if not c.default]
        raise InvalidValue(
            f"passes compose only in the order {', '.join(optional)}: give --passes "
            f"{','.join(n for n in want if n in optional)} (got {','.join(n for n in names if n in optional)}); "
            f"a pass rewrites what the passes before it made"
        )


def parse_pass_list(value) -> list[str]:
    """``"a,b"``, ``["a"]``, ``"none"`` or None -> checked pass names, in composition order. A
    string is split at commas (never iterated per character); anything but a string or a
    list/tuple of strings is InvalidType; an unknown or repeated pass InvalidValue. Passes given
    in another order are put into the composition order with a :class:`PassOrderWarning`."""
    if value is None:
        return []
    if isinstance(value, str):
        names = [] if value.strip() in ("", "none") else [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, (list, tuple)):
        if not all(isinstance(p, str) for p in value):
            bad = next(p for p in value if not isinstance(p, str))
            raise InvalidType(
                f"--passes must be a comma-separated string or a list of pass names, got a list holding "
                f"{type(bad).__name__}"
            )
        names = [p.strip() for p in value if p.strip() and p.strip() != "none"]
    else:
        raise InvalidType(
            f"--passes must be a comma-separated string or a list of pass names, got {type(value).__name__}"
        )
    reg = registered()
    bad = [n for n in names if n not in reg]
    if bad:
        raise InvalidValue(
            f"unknown pass(es) {', '.join(show(n, 60) for n in bad)}; available: {', '.join(reg) or 'none'} (or 'none')"
        )
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InvalidValue(f"pass {', '.join(twice)} is listed twice in --passes {','.join(names)}")
    return in_order(names)


def check_pass_options(names: list[str], pass_options, defaults: bool = True) -> dict:
    """``pass_options`` ({pass: {option: value}}) checked against the passes that run (``names``,
    plus the default passes when ``defaults``): every option parsed as the CLI parses its flag.
    Returns the dict unchanged (the manager resolves it again). The messages are those of the CLI:
    options of a pass that is not run are refused as ``--skip-tau given but pass 'skip' is not in
    --passes``."""
    if pass_options is None:
        return {}
    if not isinstance(pass_options, dict):
        raise InvalidType(
            f"pass_options must be a dict of {{pass: {{option: value}}}}, got {type(pass_options).__name__}"
        )
    reg = registered()
    run = set(names) | ({n for n, c in reg.items() if c.default} if defaults else set())
    for pname, given in pass_options.items():
        if not isinstance(pname, str) or pname not in reg:
            raise InvalidValue(
                f"pass_options names unknown pass {show(pname, 60)}; available: {', '.join(reg) or 'none'}"
            )
        cls = reg[pname]
        if given is not None and not isinstance(given, dict):
            raise InvalidType(f"options of pass '{pname}' must be a dict, got {type(given).__name__}")
        if pname not in run:
            some = [k for k in (given or {}) if k in cls.options]
            what = f"{cls.flag(some[0])} given" if some else f"options given for pass '{pname}'"
            raise InvalidValue(f"{what} but pass '{pname}' is not in --passes")
        cls.resolve_options(given)
    return pass_options


def get(name: str) -> type[Pass]:
    reg = registered()
    if name not in reg:
        raise InvalidValue(f"unknown pass '{show(name, 60)}'; available: {', '.join(reg) or 'none'}")
    return reg[name]
