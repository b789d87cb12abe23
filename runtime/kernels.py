"""Node kernels: nodes of a training graph that accelc's runtime executes itself, between ORT
segments, and how a method declares them.

A method that adds custom nodes (or marks standard ones for another engine) lists a
:class:`KernelProvider` in its ``Method.kernels``: a name (the key of ``ExecConfig.kernels``), the implementations it
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

from ..compiler.method import installed

ORT = "ort"  # every provider's fallback: leave the node to ONNX Runtime
# A kernel's per-call statistics may hold SKIP_UPDATE: True to ask that this step's optimizer update
# be skipped (e.g. a non-finite gradient under loss scaling); the session then leaves parameters and
# optimizer state as they were.
SKIP_UPDATE = "skip_update"
FRESH, VIEW, UNKNOWN = "fresh", "view", "unknown"  # NodeKernel.memory


class NodeKernel:
    """One node run by accelc. The runner sets ``wanted`` (which outputs anything reads) before
    the first run; ``run`` reads its inputs from ``env`` and stores its outputs with
    :func:`store`. It may return per-call statistics (e.g. milliseconds), which the runner hands
    back in the step result under ``key``."""

    key: str = ""
    # reads 4-D inputs in any memory layout (NCHW or NHWC, torch's channels_last); the runner hands
    # a kernel that does not the NCHW form of each input
    any_layout: bool = False
    # keeps no state from run to run (no statistics, counters or adapted choices): running it an
    # extra time, as the layout measurement does, changes nothing
    stateless: bool = False
    # what its outputs' memory is, for the runner's buffer reuse: FRESH (new tensors, sharing memory
    # with no input and nothing the kernel keeps; and it keeps no input after its run), VIEW (output
    # 0 may share the first input's memory; the kernel keeps nothing), or UNKNOWN (may share any
    # input's, or keep them: nothing it reads or writes is ever reused)
    memory: str = UNKNOWN
    # writes its output over a donated input where it can (see ``donate``); counts how often in
    # ``in_place``
    takes_donations: bool = False

    def __init__(self, node: onnx.NodeProto):
        self.node = node
        self.inputs = list(node.input)
        self.outputs = list(node.output)
        self.wanted = [bool(o) for o in self.outputs]
        self.key = node.name or node.op_type
        # set by the runner: per input, True when this node is the last reader of that input's
        # memory, which nothing else (no view, graph output or buffer of the caller's) shares, so
        # the kernel may write its output there (see :func:`reusable`)
        self.donate: tuple = ()
        self.in_place = 0

    def run(self, env: dict, bound: dict) -> dict | None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class BuildContext:
    """What a kernel factory may use: the graph's initializers (as torch tensors, for the inputs
    kernels read as constants, on ``device``), the implementation chosen for this provider and the
    torch device the graph runs on ("cpu" or "cuda")."""

    initializers: dict
    impl: str
    device: str = "cpu"


@dataclass(frozen=True)
class KernelProvider:
    name: str
    implementations: tuple  # the provider's own, best first; "ort" is implied
    claims: Callable[[onnx.NodeProto], bool]
    build: Callable[[onnx.NodeProto, BuildContext], NodeKernel]
    summary: str = ""
    cpu_only: bool = True  # its kernels run on CPU tensors only: on CUDA the default is "ort"
    generic: bool = False  # claims standard ops: asked after every pass's own provider
    # an exact graph rewrite run before claiming when the provider is active (e.g. fusing a chain
    # of nodes into one its kernel runs in one pass); the result must still run on ORT
    prepare: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None


ALL = "all"  # ``--kernel all=ort``: every provider's choice at once (the whole step on ORT)


def providers() -> dict[str, KernelProvider]:
    """The node-kernel providers: the installed methods' own (``Method.kernels``), in composition
    order, then the runtime's generic one (:mod:`accelc.runtime.aten`), so a node a method marked
    or added is claimed by that method."""
    from . import aten  # the runtime's own provider: torch is loaded only when a graph is run

    out = {}
    for p in installed().kernels():
        if ORT in p.implementations:
            raise ValueError(f"kernel provider '{p.name}': '{ORT}' is implied, do not list it")
        out[p.name] = p
    out[aten.PROVIDER.name] = aten.PROVIDER
    return dict(sorted(out.items(), key=lambda kv: kv[1].generic))


class Bound(dict):
    """The caller's preallocated buffers (output name -> tensor) with the names in ``adopt``,
    whose buffer a kernel's fresh result of the same shape, dtype and strides may replace instead
    of being copied into it (a convolution's weight gradient: ATen's ``convolution_backward``
    cannot write into a given tensor). The names replaced are in ``adopted``; the caller reads
    those tensors back from the dict after the run."""

    def __init__(self, buffers=(), adopt=()):
        super().__init__(buffers)
        self.adopt = frozenset(adopt)
        self.adopted: set = set()


def store(name: str, t, env: dict, bound: dict, fresh: bool = False) -> None:
    """Put a kernel's output into the step's environment; a preallocated (bound) buffer, such as
    a gradient, is written in place, or replaced by ``t`` where the caller allows it (``Bound``)
    and ``fresh`` says that ``t`` is a new tensor nothing else holds."""
    if name in bound:
        b = bound[name]
        if t is b:  # a kernel that wrote straight into the buffer has nothing to copy
            pass
        elif fresh and name in getattr(bound, "adopt", ()) and _same_buffer_kind(t, b):
            bound[name] = b = t
            bound.adopted.add(name)
        else:
            b.copy_(t)
        t = b
    # dense tensors stay in their layout (an NHWC activation stays NHWC); anything else is made dense
    env[name] = t if t.is_contiguous() or is_nhwc(t) else t.contiguous()


def _same_buffer_kind(t, b) -> bool:
    """The same shape, dtype, device and memory order (strides of size-1 dimensions aside: a 1x1
    weight's gradient comes back with channels_last strides on the same memory order)."""
    if t.shape != b.shape or t.dtype != b.dtype or t.device != b.device:
        return False
    return all(n == 1 or x == y for n, x, y in zip(t.shape, t.stride(), b.stride()))


def reusable(t, shape, dtype) -> bool:
    """Whether a donated input tensor ``t`` (see ``NodeKernel.donate``) can take a result of
    ``shape`` and ``dtype`` in place: dense in its layout, and the only tensor on its memory (no
    view of it, nor it a view of a tensor still held, at the time of the call)."""
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        return False
    if not (t.is_contiguous() or is_nhwc(t)) or t.numel() == 0:
        return False
    return _storage_users(t) == 1


def _storage_users(t) -> int:
    """How many tensors share ``t``'s memory (2 or more also when torch cannot say)."""
    import torch

    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return 2
    # the storage object made here holds one reference of its own
    return int(count(t.untyped_storage()._cdata)) - 1


def on_device(t, device: str):
    """A constant as a kernel reads it: floating-point values on the graph's device; integer ones
    (shapes, axes, indices) on the CPU, where shape arithmetic (Shape's output) stays."""
    return t.to(device) if device != "cpu" and t.is_floating_point() else t


def is_nhwc(t) -> bool:
    """A dense 4-D tensor in torch's channels_last (NHWC) memory layout."""
    import torch  # loaded already: only kernels, which run on torch, get here

    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
