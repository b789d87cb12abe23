"""``accelc view``: serve one model in Netron, bound to 127.0.0.1 only.

What is reachable over HTTP is exactly:

* Netron's own static files (its handler confines them to the netron package folder and a fixed
  list of extensions), with ``index.html`` naming the model;
* the model file, and the external-data files its tensors reference (each checked to lie inside
  the model's folder, symlinks resolved), under ``/data/NAME``, looked up in a fixed table by exact
  name. No part of a request path ever reaches the filesystem for ``/data/``.

Nothing is copied: the files are opened once, when the server starts, and served from those open
descriptors, so a file swapped in afterwards (a symlink aimed elsewhere) is never read, and there is
no temporary folder to leave behind when the process is killed.

Every request must carry ``Host: 127.0.0.1:PORT`` or ``Host: localhost:PORT``; any other Host gets
403, so a DNS-rebinding page (``evil.example`` resolving to 127.0.0.1) reads nothing.

A path that is not a loadable ONNX model (``/etc/hostname``, a text file, a directory without
``training_model.onnx``, a device or FIFO) is refused with one line before anything listens.

:func:`serve` blocks until Ctrl-C (the CLI). :func:`start` returns a running :class:`ViewServer`
that serves while the calling process lives, until :meth:`ViewServer.stop`; the CLI has no
``--no-block`` (a command that returns cannot keep serving without daemonising, which accelc does
not do).

What is shown (the graph of an artifact directory, blob summaries, the changes view) is
:mod:`accelc.compiler.view`; this module serves it. A view other than the file as it is (blobs
summarised, ``changes=True``) is built in memory when the server starts, from the bytes read then.
"""

from __future__ import annotations

import http.server
import os
import posixpath
import stat
import sys
import threading
import time
import webbrowser
from pathlib import Path

from .compiler.errors import AccelcError, InvalidType, InvalidValue, show
from .compiler.resources import check_memory
from .compiler.view import SAFE_NAME, external_locations, graphs, resolve_model, view_model

__all__ = ["HOST", "ViewServer", "graphs", "resolve_model", "serve", "start"]

HOST = "127.0.0.1"
PROTOBUF_LIMIT = 2**31 - 1  # an ONNX protobuf cannot be larger
_CHUNK = 1 << 20


def _open_regular(path: str, what: str) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only without blocking on a FIFO or device; refuse anything but a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise AccelcError(f"{what}: no such file") from None
    except (OSError, ValueError) as e:
        raise AccelcError(f"{what}: cannot open ({show(getattr(e, 'strerror', None) or e)})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise AccelcError(f"{what} is {kind}; refused")
    return fd, st


def _read_all(fd: int, size: int) -> bytes:
    chunks, off = [], 0
    while off < size:
        b = os.pread(fd, min(_CHUNK, size - off), off)
        if not b:
            break
        chunks.append(b)
        off += len(b)
    return b"".join(chunks)


def _open_external(loc: str, base: str, model_name: str) -> tuple[str, int]:
    """Open external-data file ``loc`` of a model in folder ``base`` (resolved); refuse anything
    outside that folder. Returns (the name Netron will request it by, descriptor)."""
    what = f"external data '{show(loc)}' of {show(model_name)}"
    if "\x00" in loc or "\\" in loc or os.path.isabs(loc):
        raise AccelcError(f"{what} must be a relative path inside the model's folder; refused")
    key = posixpath.normpath(loc)
    if key in (".", "..") or key.startswith("../"):
        raise AccelcError(f"{what} points outside the model's folder; refused")
    real = os.path.realpath(os.path.join(base, key))
    if os.path.commonpath([base, real]) != base or real == base:
        raise AccelcError(f"{what} points outside the model's folder; refused")
    fd, st = _open_regular(real, what)
    try:  # the file opened is the one checked (no swap between the check and the open)
        again = os.stat(real)
    except OSError:
        again = None
    if again is None or (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise AccelcError(f"{what} changed while it was opened; refused")
    return key, fd


class _Files:
    """The fixed table of what ``/data/NAME`` serves: open descriptors, closed by :meth:`close`."""

    def __init__(self, path: Path, memory_limit=None, changes: bool = False, stage: str | None = None):
        self.fds: dict[str, int] = {}
        self.blobs: dict[str, bytes] = {}  # a view built in memory (see view_model), served instead of the file
        self.changes, self.stage = changes, stage
        self._lock = threading.Lock()
        self.closed = False
        label = f"'{show(path)}'"
        fd, st = _open_regular(str(path), label)
        self.fds[""] = fd  # owned by the table from here on (renamed once the model is checked)
        try:
            self._load(path, label, fd, st, memory_limit)
        except BaseException:
            self.close()
            raise

    def _load(self, path, label, fd, st, memory_limit):
        import onnx

        if st.st_size == 0:
            raise AccelcError(f"{label} is empty, not an ONNX model")
        if st.st_size > PROTOBUF_LIMIT:
            raise AccelcError(f"{label} is larger than 2 GB, so not an ONNX model (protobuf limit)")
        check_memory(f"reading {label} to view it", (4 if self.changes else 3) * st.st_size, memory_limit)
        model = onnx.ModelProto()
        try:
            model.ParseFromString(_read_all(fd, st.st_size))
        except Exception:
            raise AccelcError(f"{label} is not a loadable ONNX model (protobuf parse failed)") from None
        if not model.HasField("graph") or not model.graph.node or not model.opset_import:
            raise AccelcError(f"{label} is not a loadable ONNX model (no graph nodes or opset)")
        stem = path.name[:-5] if path.name.lower().endswith(".onnx") else path.name
        if self.stage:  # a stage's graph: named by its stage too (stage-low.training_model.onnx)
            stem = f"{self.stage}.{stem}"
        # the name appears in Netron's index.html unescaped: only plain characters go there
        self.name = stem + ".onnx" if SAFE_NAME.fullmatch(stem) else "model.onnx"
        base = os.path.realpath(os.path.dirname(os.path.abspath(path)))
        self.fds[self.name] = self.fds.pop("")
        own = {self.name, path.name}  # names external data may not have (it would be the model itself)
        locations = external_locations(model)
        shown = view_model(model, self.changes)
        if shown is not None:  # served from memory; the file's descriptor is not needed any more
            os.close(self.fds.pop(self.name))
            if self.changes:
                self.name = self.name[: -len(".onnx")] + ".changes.onnx"
            self.blobs[self.name] = shown.SerializeToString()
        for loc in locations:
            key, efd = _open_external(loc, base, path.name)
            if key in self.fds or key in self.blobs or key in own or key == self.name:
                os.close(efd)
                if key in own or key == self.name:
                    raise AccelcError(f"external data '{show(loc)}' has the model's own name; refused")
                continue
            self.fds[key] = efd

    def size(self, key: str) -> int | None:
        with self._lock:
            if self.closed:
                return None
            if key in self.blobs:
                return len(self.blobs[key])
            if key not in self.fds:
                return None
            return os.fstat(self.fds[key]).st_size

    def chunk(self, key: str, offset: int, n: int) -> bytes:
        with self._lock:  # a descriptor is never read after close (its number may be reused)
            if self.closed:
                return b""
            if key in self.blobs:
                return self.blobs[key][offset : offset + n]
            return os.pread(self.fds[key], n, offset)

    def keys(self) -> list[str]:
        return sorted([*self.fds, *self.blobs])

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            fds, self.fds = self.fds, {}
            self.blobs = {}
        for fd in fds.values():
            os.close(fd)


def _handler_class(files: _Files):
    try:
        from netron.server import _HTTPRequestHandler as NetronHandler
    except ImportError:  # pragma: no cover - depends on the installed netron
        import netron

        raise AccelcError(
            f"the installed netron {show(getattr(netron, '__version__', '?'))} has no HTTP handler accelc can use"
        ) from None

    class Content:  # what Netron's index.html names (its handler writes these into the page)
        base = identifier = name = files.name

        def read(self, path):  # never used: /data/ is answered below, from the table only
            return None

    class Handler(NetronHandler):
        content = Content()

        def _host_ok(self) -> bool:
            hosts = self.headers.get_all("Host") or []
            if len(hosts) != 1:
                return False
            port = self.server.server_address[1]
            allowed = {f"127.0.0.1:{port}", f"localhost:{port}"}
            if port == 80:
                allowed |= {"127.0.0.1", "localhost"}
            return hosts[0].strip().lower() in allowed

        def _refuse(self, code: int, text: str) -> None:
            body = text.encode() + b"\n"
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def end_headers(self):
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
            self.send_header("Cache-Control", "no-store")
            super().end_headers()

        def do_GET(self):
            if not self._host_ok():
                return self._refuse(403, "forbidden: Host must be 127.0.0.1:PORT or localhost:PORT")
            if not self.path.startswith("/") or self.path.startswith("//"):
                return self._refuse(403, "forbidden: origin-form request paths only")
            path = self.path.split("?", 1)[0].split("#", 1)[0]
            if path.startswith("/data/"):
                return self._data(path[len("/data/") :])
            return super().do_GET()  # Netron's static files, confined to its package folder

        def _data(self, quoted: str) -> None:
            from urllib.parse import unquote

            key = unquote(quoted)
            size = files.size(key)
            if size is None:
                return self._refuse(404, "not found")
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if self.command == "HEAD":
                return
            off = 0
            while off < size:
                b = files.chunk(key, off, min(_CHUNK, size - off))
                if not b:
                    break
                self.wfile.write(b)
                off += len(b)

        def do_HEAD(self):
            self.do_GET()

        def log_message(self, format, *args):  # Netron's own crashes on send_error's HTTPStatus argument
            pass

    return Handler


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is not news
            return
        super().handle_error(request, client_address)


class ViewServer:
    """A running view: ``url``, ``port``, ``name`` (what ``/data/`` serves the model as) and
    ``stop()``. Also a context manager."""

    def __init__(self, files: _Files, httpd: _Server):
        self._files, self._httpd = files, httpd
        self.host, self.port = httpd.server_address[:2]
        self.url = f"http://{self.host}:{self.port}/"
        self.name = files.name
        self.served = files.keys()
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        self._stopped = False

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._files.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _check_port(port) -> int:
    if isinstance(port, bool) or not isinstance(port, int):
        raise InvalidType(f"--port must be an integer, got {type(port).__name__}")
    if not 0 <= port <= 65535:
        raise InvalidValue(f"--port must be in 0..65535 (0 picks a free port), got {port}")
    return port


def start(
    path, port: int = 0, browse: bool = False, memory_limit=None, graph: str | None = None, changes: bool = False
) -> ViewServer:
    """Check ``path`` (an ONNX file, or an artifact directory: its graph ``graph``, the training
    model by default) and serve it on 127.0.0.1:``port`` (0: a free port) from a background thread;
    returns the running server, which serves while this process lives, until ``stop()``.
    ``changes``: show what the passes touched (see the module's docstring)."""
    port = _check_port(port)
    if not isinstance(changes, bool):
        raise InvalidType(f"changes must be True or False, got {type(changes).__name__}")
    p = resolve_model(path, graph)
    stage = p.parent.name if Path(path).is_dir() and p.parent != Path(path) else None
    files = _Files(p, memory_limit, changes, stage)
    try:
        httpd = _Server((HOST, port), _handler_class(files))
    except OSError as e:
        files.close()
        raise AccelcError(f"cannot serve on {HOST}:{port}: {show(e.strerror or e)}") from None
    except BaseException:
        files.close()
        raise
    server = ViewServer(files, httpd)
    if browse:
        webbrowser.open(server.url)
    return server


def serve(
    path,
    port: int = 8080,
    block: bool = True,
    browse: bool = False,
    memory_limit=None,
    graph: str | None = None,
    changes: bool = False,
):
    """Serve ``path`` in Netron on 127.0.0.1. ``block=True`` (the CLI) prints the address and serves
    until Ctrl-C; ``block=False`` returns the running :class:`ViewServer` (see :func:`start`)."""
    server = start(path, port, browse=browse, memory_limit=memory_limit, graph=graph, changes=changes)
    if not block:
        return server
    print(f"Netron serving {show(server.name)} at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return server
