"""Node kernels: nodes of a training graph that accelc's runtime executes itself, between ORT
segments, and the registry through which a pass declares them.

A pass that adds custom nodes (or marks standard ones for another engine) registers a
:class:`KernelProvider`: a name (the key of ``ExecConfig.kernels``), the implementations it
offers, a predicate that says which nodes it claims, and a factory that builds a
:class:`NodeKernel` for a claimed node. The runtime knows nothing else about it: when a graph has
claimed nodes, the :class:`~accelc.runtime.executor.SegmentedRunner` cuts it into ORT segments
around them and runs the kernels in between. ``"ort"`` is always an implementation too: the node
stays inside ORT (custom nodes then need a form ORT can run, e.g. an ONNX local function).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx

ORT = "ort"  # every provider's fallback: leave the node to ONNX Runtime
# A kernel's per-call statistics may hold SKIP_UPDATE: True to ask that this step's optimizer update
# be skipped (e.g. a non-finite gradient under loss scaling); the session then leaves parameters and
# optimizer state as they were.
SKIP_UPDATE = "skip_update"


class NodeKernel:
    """One node run by accelc. The runner sets ``wanted`` (which outputs anything reads) before
    the first run; ``run`` reads its inputs from ``env`` and stores its outputs with
    :func:`store`. It may return per-call statistics (e.g. milliseconds), which the runner hands
    back in the step result under ``key``."""

    key: str = ""

    def __init__(self, node: onnx.NodeProto):
        self.node = node
        self.inputs = list(node.input)
        self.outputs = list(node.output)
        self.wanted = [bool(o) for o in self.outputs]
        self.key = node.name or node.op_type

    def run(self, env: dict, bound: dict) -> dict | None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class BuildContext:
    """What a kernel factory may use: the graph's initializers (as torch tensors, for the inputs
    kernels read as constants) and the implementation chosen for this provider."""

    initializers: dict
    impl: str


@dataclass(frozen=True)
class KernelProvider:
    name: str
    implementations: tuple  # the provider's own, best first; "ort" is implied
    claims: Callable[[onnx.NodeProto], bool]
    build: Callable[[onnx.NodeProto, BuildContext], NodeKernel]
    summary: str = ""
    cpu_only: bool = True  # on CUDA the default is "ort"
    generic: bool = False  # claims standard ops: asked after every pass's own provider
    # an exact graph rewrite run before claiming when the provider is active (e.g. fusing a chain
    # of nodes into one its kernel runs in one pass); the result must still run on ORT
    prepare: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None


_PROVIDERS: dict[str, KernelProvider] = {}


def register_kernel(provider: KernelProvider) -> KernelProvider:
    """Declare a node kernel (called by a pass package on import). Re-registering a name replaces it."""
    if ORT in provider.implementations:
        raise ValueError(f"kernel provider '{provider.name}': '{ORT}' is implied, do not list it")
    _PROVIDERS[provider.name] = provider
    return provider


ALL = "all"  # ``--kernel all=ort``: every provider's choice at once (the whole step on ORT)


def providers() -> dict[str, KernelProvider]:
    """The registered providers, the passes' own first and the generic ones (the runtime's
    :mod:`accelc.runtime.aten`) last, so a node a pass marked or added is claimed by that pass."""
    if not _BUILTIN:
        _BUILTIN.append(True)
        from . import aten  # noqa: F401  (registers the runtime's own provider)
    return dict(sorted(_PROVIDERS.items(), key=lambda kv: kv[1].generic))


_BUILTIN: list = []


def store(name: str, t, env: dict, bound: dict) -> None:
    """Put a kernel's output into the step's environment; a preallocated (bound) buffer, such as
    a gradient, is written in place."""
    if name in bound:
        bound[name].copy_(t)
        t = bound[name]
    env[name] = t.contiguous()
