"""A method is one object.

A :class:`Method` declares everything one paper (or one optimisation) brings to accelc, in its own
folder (``passes/<name>/__init__.py``): its name, its :class:`~accelc.compiler.options.Options`, the
compile-time :class:`~accelc.compiler.pass_api.Pass`, the run-time algorithm (or none), where it
stands in the composition order (``after=``), the node kernels, cost hooks and layer-op kinds its
custom nodes need, and how a run's summary and a benchmark's figure show it. The built-in methods
are listed in ``accelc.passes.METHODS``; :func:`install` puts a set of methods in place once (the
facade installs the built-in ones when ``accelc`` is imported), and a third-party method is one more
object handed to :func:`install` (or registered under the ``accelc.methods`` entry-point group).

Everything that used to be looked up by a method's name in a registry of its own (passes,
algorithms, kernels, costs, layer ops, plan schemas) is read from the installed :class:`MethodSet`.
The composition order is the unique topological order of the ``after`` constraints: a cycle, or two
methods whose order nothing decides (a tie), is an error when the set is installed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from .errors import AccelcError, InvalidValue, show
from .options import Options

ENTRY_POINTS = "accelc.methods"


@dataclass(frozen=True)
class Panel:
    """A method's panel in ``accelc bench``'s controller figure: ``shows(history)`` says whether a
    run's per-epoch history (metrics.jsonl records) has something to draw; ``draw(ax, runs,
    colour)`` draws ``runs`` ([(configuration, history)], those that show) on a matplotlib axis,
    one colour per configuration (``colour[configuration]``)."""

    title: str
    shows: Callable[[list], bool]
    draw: Callable[[Any, list, dict], None]


@dataclass(frozen=True)
class Method:
    """One method (see the module doc). Only ``name``, ``options`` and ``compile`` are required."""

    name: str
    options: type[Options]
    compile: type  # the Pass subclass
    summary: str = ""  # one line for --help and `accelc passes`
    paper: str = ""
    algorithm: type | None = None  # the run-time Algorithm subclass that runs its plan.json entries
    after: tuple[str, ...] = ()  # methods that must run before this one
    before: tuple[str, ...] = ()  # methods that must run after this one (a plug-in between built-ins)
    default: bool = False  # runs unless turned off (--no-<name>)
    kernels: tuple = ()  # runtime KernelProviders for the nodes it adds or marks
    costs: tuple = ()  # (claims(node) -> bool, flops(graph, node) -> (flops, bytes, note)) per custom node kind
    layer_ops: tuple = ()  # (domain, op prefix, layer kind) of custom nodes that carry a layer's weight
    plan_fields: dict = dataclasses.field(default_factory=dict)  # JSON schema of its plan entry's other fields
    run_summary: Callable | None = None  # (report, decisions, options) -> lines under the run's summary
    bench_panel: Panel | None = None  # what `accelc bench` draws of its runs

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.replace("_", "").isalnum() or not self.name[:1].isalpha():
            raise ValueError(f"a method's name is a word of letters, digits and _, got {self.name!r}")
        if not (isinstance(self.options, type) and issubclass(self.options, Options)):
            raise TypeError(f"method '{self.name}': options must be an Options dataclass")
        for k in ("after", "before"):
            if not isinstance(getattr(self, k), tuple):
                object.__setattr__(self, k, tuple(getattr(self, k)))
        # the definitions that carry the name read it from here (flags, messages, plan types)
        self.options.method_name = self.name
        for k, v in (("method", self), ("name", self.name), ("options", self.options), ("default", self.default)):
            setattr(self.compile, k, v)
        self.compile.summary = self.compile.summary or self.summary
        self.compile.paper = self.compile.paper or self.paper
        if self.algorithm is not None:
            self.algorithm.method = self
            self.algorithm.name = self.name

    def plan_entry(self, options: Options, **fields) -> dict:
        """A plan.json controller entry for this method: its options as JSON and its own fields."""
        return {"type": self.name, "options": options.to_json(), **fields}

    def plan_schema(self) -> dict:
        """The JSON schema of this method's plan.json entries (derived from its Options)."""
        return {
            "required": ["options", *self.plan_fields.get("required", [])],
            "properties": {"options": self.options.schema(), **self.plan_fields.get("properties", {})},
        }


class MethodSet:
    """Installed methods in composition order (see the module doc)."""

    def __init__(self, methods=()):
        methods = list(methods)
        names = [m.name for m in methods]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InvalidValue(f"two methods are named {', '.join(twice)}")
        self.methods: list[Method] = _ordered(methods)
        self.by_name = {m.name: m for m in self.methods}

    def __iter__(self):
        return iter(self.methods)

    def __contains__(self, name) -> bool:
        return name in self.by_name

    def names(self) -> list[str]:
        return [m.name for m in self.methods]

    def get(self, name: str) -> Method:
        if name not in self.by_name:
            raise InvalidValue(f"unknown pass '{show(name, 60)}'; available: {', '.join(self.by_name) or 'none'}")
        return self.by_name[name]

    def index(self, name: str) -> int:
        return self.names().index(name) if name in self.by_name else len(self.methods)

    def kernels(self) -> list:
        return [k for m in self.methods for k in m.kernels]

    def costs(self) -> list:
        return [c for m in self.methods for c in m.costs]

    def layer_ops(self) -> list:
        return [op for m in self.methods for op in m.layer_ops]

    def with_(self, *extra: Method) -> "MethodSet":
        keep = [m for m in self.methods if all(m is not e for e in extra)]
        return MethodSet(keep + list(extra))


def _ordered(methods: list[Method]) -> list[Method]:
    """The unique topological order of the ``after``/``before`` constraints (cycles and ties are
    errors)."""
    names = {m.name for m in methods}
    needs: dict[str, set] = {m.name: set(m.after) for m in methods}
    for m in methods:
        missing = [a for a in m.after + m.before if a not in names]
        if missing:
            raise InvalidValue(f"method '{m.name}' is ordered against {', '.join(missing)}, which is not installed")
        for b in m.before:
            needs[b].add(m.name)
    left = list(methods)
    out: list[Method] = []
    while left:
        ready = [m for m in left if needs[m.name] <= {o.name for o in out}]
        if not ready:
            raise InvalidValue(f"the methods {', '.join(m.name for m in left)} order each other in a cycle (after=)")
        if len(ready) > 1:
            raise InvalidValue(
                f"nothing orders the methods {', '.join(m.name for m in ready)} (a tie): give one of them "
                f"after=(...) or before=(...) naming the other"
            )
        out.append(ready[0])
        left.remove(ready[0])
    return out


_INSTALLED: list[MethodSet] = []


def install(*methods: Method) -> MethodSet:
    """Put ``methods`` in place (in addition to those installed before; the same object twice is
    installed once, another object with an installed name is an error); returns the set."""
    for m in methods:
        if not isinstance(m, Method):
            raise TypeError(f"install() takes Method objects, got {type(m).__name__}")
    current = _INSTALLED[0] if _INSTALLED else MethodSet()
    new = [m for m in methods if all(m is not o for o in current)]
    clash = [m.name for m in new if m.name in current]
    if clash:
        raise InvalidValue(f"a method named {', '.join(clash)} is already installed")
    result = current.with_(*new)
    _INSTALLED[:] = [result]
    return result


def uninstall(*methods: Method) -> MethodSet:
    """Take ``methods`` out of the installed set (for tests and plug-in hosts)."""
    current = installed()
    result = MethodSet([m for m in current if all(m is not o for o in methods)])
    _INSTALLED[:] = [result]
    return result


def installed() -> MethodSet:
    """The installed methods; the first call also installs those registered as entry points."""
    if not _INSTALLED:
        install()
    return _INSTALLED[0]


def load_entry_points(group: str = ENTRY_POINTS) -> list[Method]:
    """Third-party methods registered under ``group`` (each entry point names a Method object)."""
    from importlib.metadata import entry_points

    out = []
    for ep in entry_points(group=group):
        try:
            obj = ep.load()
        except Exception as e:  # a broken plug-in is named, not a traceback
            raise AccelcError(f"the method plug-in '{ep.name}' ({ep.value}) cannot be loaded: {e}") from None
        if not isinstance(obj, Method):
            raise AccelcError(f"the method plug-in '{ep.name}' ({ep.value}) is not an accelc Method")
        out.append(obj)
    return out
