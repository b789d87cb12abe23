"""What ``accelc view`` shows of a model: the graph an artifact directory offers by name, and the
model as the view presents it (the HTTP server that serves it in Netron is :mod:`accelc.netron`).

Of an artifact directory, ``graph`` picks what is shown: ``training`` (the default), ``eval``,
``optimizer``, a stage (``stage-low``: its training graph) or a stage's graph (``stage-low/eval``);
the choices are the files the directory holds (:func:`graphs`), never a path built from a request.

What Netron shows is the file as it is, except that base64 blobs in metadata (e.g. the node a
``reuse`` node replaced, which the runtime needs) are shown as a one-line summary instead of
kilobytes of text (the file keeps them). ``changes=True`` shows what the passes touched: every node
a pass added or changed is titled ``[PASS] OpType`` (so it stands out in the graph, without the
colour of its op) and the model's properties list the passes with their node counts; the served
name is ``NAME.changes.onnx`` (:func:`view_model`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import AccelcError, InvalidType, InvalidValue, show

ARTIFACT_MODEL = "training_model.onnx"
GRAPH_FILES = {"training": ARTIFACT_MODEL, "eval": "eval_model.onnx", "optimizer": "optimizer_model.onnx"}
BLOB_MIN = 100  # a metadata value this long made only of base64 characters is a blob
_BASE64 = re.compile(r"[A-Za-z0-9+/\r\n]+={0,2}")
PASS_KEY = "accelc.pass"  # compiler.provenance.PASS (kept here: the view loads nothing else of the compiler)
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,120}")  # a file name shown or served as it is


def _tensors(model):
    """Every TensorProto of the model: initialisers, sparse initialisers, attribute tensors, in the
    main graph, nested graphs (If/Loop/Scan bodies) and functions."""
    graphs, nodes = [model.graph], []
    for f in model.functions:
        nodes.extend(f.node)
    while graphs or nodes:
        if graphs:
            g = graphs.pop()
            yield from g.initializer
            for s in g.sparse_initializer:
                yield s.values
                yield s.indices
            nodes.extend(g.node)
            continue
        node = nodes.pop()
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("sparse_tensor"):
                yield a.sparse_tensor.values
                yield a.sparse_tensor.indices
            for s in a.sparse_tensors:
                yield s.values
                yield s.indices
            if a.HasField("g"):
                graphs.append(a.g)
            graphs.extend(a.graphs)


def external_locations(model) -> list[str]:
    from onnx import TensorProto

    locs = []
    for t in _tensors(model):
        if t.data_location == TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location", "")
            if not loc:
                raise AccelcError(f"tensor '{show(t.name)}' has external data without a location")
            if loc not in locs:
                locs.append(loc)
    return locs


def graphs(art_dir) -> dict[str, Path]:
    """The graphs of an artifact directory by the name ``graph`` takes: ``training``, ``eval``,
    ``optimizer``, and per stage (a subfolder holding a training model) ``STAGE`` (its training
    graph), ``STAGE/eval``, ``STAGE/optimizer``; only files that are there."""
    d = Path(art_dir)
    out: dict[str, Path] = {}
    for k, f in GRAPH_FILES.items():
        if (d / f).is_file():
            out[k] = d / f
    try:
        subs = sorted(x for x in d.iterdir() if x.is_dir() and not x.is_symlink() and SAFE_NAME.fullmatch(x.name))
    except OSError:
        subs = []
    for sub in subs:
        if (sub / ARTIFACT_MODEL).is_file():
            out[sub.name] = sub / ARTIFACT_MODEL
            for k, f in GRAPH_FILES.items():
                if k != "training" and (sub / f).is_file():
                    out[f"{sub.name}/{k}"] = sub / f
    return out


def resolve_model(path, graph: str | None = None) -> Path:
    """The ONNX file ``path`` names: the file itself, or an artifact directory's graph ``graph``
    (its training model by default; see :func:`graphs`)."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise InvalidType(f"view needs a path, got {type(path).__name__}")
    if graph is not None and not isinstance(graph, str):
        raise InvalidType(f"--graph must be a string, got {type(graph).__name__}")
    p = Path(path)
    if p.is_dir():
        if not (p / ARTIFACT_MODEL).is_file():
            raise AccelcError(
                f"'{show(path)}' is a directory without {ARTIFACT_MODEL} (give an ONNX file or an artifact directory)"
            )
        if graph is None:
            return p / ARTIFACT_MODEL
        choices = graphs(p)
        key = graph.strip().rstrip("/")
        key = key[: -len("/training")] if key.endswith("/training") else key
        if key not in choices:
            raise InvalidValue(f"--graph takes {', '.join(choices)} for '{show(path)}', got {show(graph)}")
        return choices[key]
    if graph is not None:
        raise InvalidValue(f"--graph picks a graph of an artifact directory; '{show(path)}' is one ONNX file")
    if not p.exists() and not p.is_symlink():
        raise AccelcError(f"'{show(path)}': no such file or directory")
    return p


def _blob_summary(key: str, value: str) -> str | None:
    """A one-line stand-in for a base64 blob in metadata (None when ``value`` is no blob)."""
    import base64

    text = value.strip()
    if len(text) < BLOB_MIN or not _BASE64.fullmatch(text):
        return None
    try:
        raw = base64.b64decode(text, validate=False)
    except ValueError:
        return None
    what = ""
    try:
        from onnx import NodeProto

        n = NodeProto()
        n.ParseFromString(raw)
        if n.op_type:
            what = (
                f" holding the {show(n.op_type)} node {show(n.name or '(unnamed)')} "
                f"({', '.join(show(i) for i in n.input)} -> {', '.join(show(o) for o in n.output)})"
            )
    except Exception:
        pass
    return f"[{len(raw)} bytes of base64{what}: kept in the file, not shown]"


def _props_tidy(props) -> int:
    n = 0
    for p in props:
        short = _blob_summary(p.key, p.value)
        if short is not None:
            p.value = short
            n += 1
    return n


def _all_nodes(graph):
    stack = [graph]
    while stack:
        g = stack.pop()
        for node in g.node:
            yield node
            for a in node.attribute:
                if a.HasField("g"):
                    stack.append(a.g)
                stack.extend(a.graphs)


def view_model(model, changes: bool = False):
    """The model as the view shows it (see the module's docstring), or None when that is the file
    as it is. Changes ``model`` in place."""
    touched = 0
    for obj in [model] + list(model.graph.initializer) + list(_all_nodes(model.graph)):
        touched += _props_tidy(obj.metadata_props)
    if not changes:
        return model if touched else None
    count: dict[str, int] = {}
    for node in _all_nodes(model.graph):
        by = {p.key: p.value for p in node.metadata_props}.get(PASS_KEY)
        if by:
            count[by] = count.get(by, 0) + 1
            node.op_type = f"[{by}] {node.op_type}"
    inits = sum(1 for t in model.graph.initializer if any(p.key == PASS_KEY for p in t.metadata_props))
    text = "; ".join(f"{k}: {v} node(s)" for k, v in sorted(count.items())) or "no pass changed a node"
    if inits:
        text += f"; {inits} initializer(s) rewritten"
    model.metadata_props.add(key="accelc.changes", value=text)
    model.graph.doc_string = f"accelc changes view (not a runnable model): {text}"
    return model
