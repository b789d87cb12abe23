"""Provenance: what a pass added or changed, written on the node (or initializer) itself.

Every node a pass adds or changes carries ``metadata_props`` under these keys, so Netron shows
what happened and the runtime can read per-node settings. This module is the only place that
spells the keys; passes call :func:`tag` (ONNX protos) or ``TrainingGraph.tag`` (graph view).
"""

from __future__ import annotations

PASS = "accelc.pass"  # which pass made or changed it
LAYER = "accelc.layer"  # the layer it belongs to
NOTE = "accelc.note"  # one sentence on what it does
EXEC = "accelc.exec"  # an execution hint for accelc's runtime (e.g. which kernel engine runs it)
DESCRIPTIVE = (PASS, LAYER, NOTE)  # what a later pass's tag replaces; every other key (how the
# runtime runs the node: EXEC and the keys of the pass that set it, e.g. amp's role) is kept


def kept_on_retag(old: dict[str, str], new: dict[str, str]) -> dict[str, str]:
    """The keys of a node's ``old`` record that a new tag (``new``) keeps: its run-time settings.
    (A pass that only trims a node, e.g. skip removing a ConvGrad's unread outputs, must not turn
    off the kernel an earlier pass chose for it.)"""
    return {k: v for k, v in old.items() if k not in DESCRIPTIVE and k not in new}


def props(obj) -> dict[str, str]:
    """The metadata of an ONNX node or tensor as a dict."""
    return {p.key: p.value for p in obj.metadata_props}


def record(pass_name: str, layer: str | None = None, note: str | None = None, **extra: str) -> dict[str, str]:
    """The provenance record of one node: the three standard keys plus pass-specific ones."""
    out = {PASS: pass_name}
    if layer is not None:
        out[LAYER] = layer
    if note is not None:
        out[NOTE] = note
    out.update({k: str(v) for k, v in extra.items()})
    return out


def tag(obj, pass_name: str, layer: str | None = None, note: str | None = None, **extra: str) -> None:
    """Write (or overwrite) the provenance of an ONNX ``NodeProto`` or ``TensorProto`` in place.

    ``extra`` keys are full metadata keys (e.g. ``{"accelc.<pass>.config": ...}``); pass them as
    ``**{"key": value}``. Keys other than :data:`DESCRIPTIVE` already present are kept."""
    new = record(pass_name, layer, note, **extra)
    merged = kept_on_retag(props(obj), new)
    merged.update(new)
    write(obj, merged)


def write(obj, tags: dict[str, str]) -> None:
    """Replace the metadata of an ONNX node or tensor with ``tags`` (a record made here)."""
    del obj.metadata_props[:]
    for k, v in tags.items():
        obj.metadata_props.add(key=k, value=v)
