"""The pass contract: the compile-time half of a :class:`~accelc.compiler.method.Method`.

A pass (in the style of onnx-ir's passes) is a class whose name, options and default come from its
Method, and which implements:

* ``in_place``: True when ``run`` edits the artifacts it is given (the manager then hands it a
  copy, so the unrewritten artifacts stay available to ``ensures``);
* ``requires(artifacts, options)``: preconditions, raising :class:`AccelcError` with the reason;
* ``run(artifacts, options) -> PassResult``: the rewrite, which tags what it adds or changes with
  :mod:`accelc.compiler.provenance`; ``options`` is the method's parsed
  :class:`~accelc.compiler.options.Options`;
* ``ensures(before, after, options)``: the numeric self-check of the rewrite; returns a short
  description of what was checked (or None);
* ``explain(record, plan)``: what the pass did, in a few plain sentences, from its record in
  report.json (the default groups the change records; a pass may say more).

The passes that can run are those of the installed methods (:func:`registered`), in their
composition order (a list in another order is put into this order, with a
:class:`PassOrderWarning` saying so); the manager (:mod:`accelc.compiler.manager`) runs them over
every stage of an artifact set and validates the result.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from .artifacts import Artifacts
from .errors import InvalidType, InvalidValue, show
from .method import installed
from .options import (  # noqa: F401  (the option vocabulary passes declare theirs with)
    Option,
    Options,
    choice,
    fraction,
    int_at_least,
    integer,
    name_list,
    option,
    option_message,
    positive_float,
)


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
    """The compile-time half of a method; ``name``, ``options`` and ``default`` are its
    :class:`~accelc.compiler.method.Method`'s (set when the Method is declared)."""

    method = None  # the Method this pass belongs to
    name: str = ""
    summary: str = ""
    paper: str = ""
    options: type[Options] = Options
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
    def flag(cls, name: str) -> str:
        return cls.options.flag(name)

    @classmethod
    def resolve_options(cls, given) -> Options:
        """The pass's options parsed from what was given (see :meth:`Options.parse`)."""
        return cls.options.parse(given)


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


def registered() -> dict[str, type[Pass]]:
    """The installed methods' passes, in composition order."""
    return {m.name: m.compile for m in installed()}


def default_passes() -> list[str]:
    return [m.name for m in installed() if m.default]


def order_of(names: list[str]) -> list[str]:
    methods = installed()
    return sorted(names, key=methods.index)


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
    plus the default passes when ``defaults``): every option parsed as the CLI parses its flag, once.
    Returns {pass: its parsed Options} (the manager takes them as they are). The messages are those of the CLI:
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
    parsed = {}
    for pname, given in pass_options.items():
        if not isinstance(pname, str) or pname not in reg:
            raise InvalidValue(
                f"pass_options names unknown pass {show(pname, 60)}; available: {', '.join(reg) or 'none'}"
            )
        cls = reg[pname]
        if given is not None and not isinstance(given, (dict, Options)):
            raise InvalidType(f"options of pass '{pname}' must be a dict, got {type(given).__name__}")
        if pname not in run:
            some = [k for k in (given or {}) if k in cls.options.fields()]
            what = f"{cls.flag(some[0])} given" if some else f"options given for pass '{pname}'"
            raise InvalidValue(f"{what} but pass '{pname}' is not in --passes")
        parsed[pname] = cls.options.parse(given)
    return parsed


def get(name: str) -> type[Pass]:
    return installed().get(name).compile
