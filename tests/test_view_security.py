"""Issue 15 cause 8: ``accelc view`` serves exactly one model (and its own external data), only to
requests whose Host is 127.0.0.1:PORT or localhost:PORT, and refuses paths that are not models.

The server runs in-process (``accelc.netron.start(path, port=0)``); requests are written on a
raw socket so that every path trick reaches the server byte for byte."""

import gc
import os
import socket
import urllib.parse
from pathlib import Path

import onnx
import pytest

from accelc import netron as view
from accelc.compiler.errors import AccelcError, InvalidType, InvalidValue

from conftest import SENTINEL_TEXT, assert_api_refused, assert_refused, run_cli

SECRET = "BESIDE-THE-MODEL-" + SENTINEL_TEXT


def _fds() -> int:
    """Open file descriptors of this process, after a garbage collection: files that earlier tests'
    unreachable objects (loaded artifacts hold their checkpoint open) still hold do not count."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def _request(port, path, host="default", method="GET", extra=b""):
    """(status, body) of one raw HTTP/1.1 request; ``host=None`` sends no Host header."""
    lines = [f"{method} {path} HTTP/1.1".encode("latin-1")]
    if host == "default":
        host = f"127.0.0.1:{port}"
    if host is not None:
        for h in host if isinstance(host, list) else [host]:
            lines.append(b"Host: " + h.encode("latin-1"))
    lines.append(b"Connection: close")
    raw = b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory):
    from accelc.zoo import export_zoo

    p = tmp_path_factory.mktemp("zoo") / "m.onnx"
    export_zoo("cnn3-small", p)
    return p.read_bytes()


def _case(root: Path, model_bytes: bytes, outside_secret: Path) -> Path:
    """A model folder holding secrets beside the model, in a subfolder and behind a symlink."""
    case = root / "case"
    (case / ".ssh").mkdir(parents=True)
    (case / "sub").mkdir()
    (case / "m.onnx").write_bytes(model_bytes)
    (case / "secret.txt").write_text(SECRET)
    (case / ".ssh" / "id_rsa").write_text(SECRET)
    (case / "sub" / "secret.txt").write_text(SECRET)
    (case / "link.txt").symlink_to(outside_secret)
    return case


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_bytes):
    root = tmp_path_factory.mktemp("served")
    outside = root / "outside" / "secret.txt"
    outside.parent.mkdir()
    outside.write_text(SENTINEL_TEXT + "\n")
    case = _case(root, model_bytes, outside)
    with view.start(case / "m.onnx", port=0) as server:
        yield server, case, outside


def _no_secret(body: bytes):
    text = body.decode("latin-1")
    assert SENTINEL_TEXT not in text and "root:" not in text and "BEGIN" not in text, text[:200]


# ----------------------------------------------------------------------------- path tricks
def _tricks(case: Path, outside: Path, port: int) -> list[str]:
    absolute = str(outside)
    q = urllib.parse.quote
    return [
        "/data/secret.txt",
        "/data/./secret.txt",
        "/data/../secret.txt",
        "/data/../outside/secret.txt",
        "/data/../../outside/secret.txt",
        "/data/%2e%2e/outside/secret.txt",
        "/data/%2E%2E%2Foutside%2Fsecret.txt",
        "/data/..%2foutside%2fsecret.txt",
        "/data/%252e%252e/outside/secret.txt",
        "/data/.ssh/id_rsa",
        "/data/%2essh/id_rsa",
        "/data/sub/secret.txt",
        "/data/sub/../secret.txt",
        "/data/m.onnx/../secret.txt",
        "/data/m.onnx/../../outside/secret.txt",
        "/data/link.txt",
        "/data/" + absolute,
        "/data//" + absolute,
        "/data/" + q(absolute, safe=""),
        "/data/" + "../" * 30 + absolute.lstrip("/"),
        "/data/" + "%2e%2e%2f" * 30 + q(absolute.lstrip("/"), safe=""),
        "/data/..\\secret.txt",
        "/data/secret.txt%00",
        "/data/secret.txt%00.onnx",
        "/data/secret.txt?file=secret.txt",
        "/data/" + str(case / "secret.txt"),
        "/data/~/.ssh/id_rsa",
        "/data/.",
        "/data/..",
        "/data/",
        "/data",
        "/secret.txt",
        "/../secret.txt",
        "/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/../../../../../../../../etc/passwd",
        "/" + absolute,
        "//" + absolute,
        "//etc/passwd",
        "/index.html/../../../../../../etc/passwd",
        "/..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
        f"http://127.0.0.1:{port}/data/secret.txt",
        f"http://127.0.0.1:{port}/data/../outside/secret.txt",
        "file://" + absolute,
        "*",
    ]


@pytest.mark.cause(8)
def test_view_path_tricks_never_reach_a_file_beside_or_outside(served):
    server, case, outside = served
    tricks = _tricks(case, outside, server.port)
    for path in tricks:
        for method in ("GET", "HEAD"):
            status, body = _request(server.port, path, method=method)
            assert status in (400, 403, 404), (path, method, status, body[:100])
            _no_secret(body)
    # POST/PUT/OPTIONS/TRACE are not served at all
    for method in ("POST", "PUT", "OPTIONS", "TRACE", "DELETE"):
        status, body = _request(server.port, "/data/secret.txt", method=method)
        assert status in (403, 404, 405, 501), (method, status)
        _no_secret(body)
    assert len(tricks) >= 40


@pytest.mark.cause(8)
def test_view_serves_only_the_model(served, model_bytes):
    server, case, _ = served
    assert server.served == ["m.onnx"]
    status, body = _request(server.port, "/data/m.onnx")
    assert status == 200 and body == model_bytes
    status, body = _request(server.port, "/")
    assert status == 200 and b'<meta name="file" content="/data/m.onnx">' in body
    # Netron's own static files still come from its package
    assert _request(server.port, "/index.js")[0] == 200
    assert _request(server.port, "/onnx.js")[0] == 200
    assert _request(server.port, "/server.py")[0] == 404  # not a static extension
    assert _request(server.port, "/data/m.onnx", method="HEAD") == (200, b"")


# ----------------------------------------------------------------------------- Host header
@pytest.mark.cause(8)
@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:{port}",
        "127.0.0.1",
        "localhost",
        "127.0.0.1:{other}",
        "localhost.:{port}",
        "127.0.0.1.nip.io:{port}",
        "127.0.0.1:{port}.evil.example",
        "127.0.0.1:{port}@evil.example",
        "evil.example@127.0.0.1:{port}",
        "[::1]:{port}",
        "127.0.0.2:{port}",
        "0.0.0.0:{port}",
        "2130706433:{port}",
        "",
        None,
        ["127.0.0.1:{port}", "evil.example"],
        ["evil.example", "127.0.0.1:{port}"],
    ],
    ids=lambda h: f"cause8-host-{h!r}",
)
def test_view_bad_host_header_is_403(served, host):
    server, _, _ = served

    def fill(h):
        return h.format(port=server.port, other=server.port + 1 if server.port < 65535 else 1)

    host = None if host is None else [fill(h) for h in host] if isinstance(host, list) else fill(host)
    for path in ("/", "/data/m.onnx", "/index.js", "/data/secret.txt"):
        status, body = _request(server.port, path, host=host)
        assert status == 403, (host, path, status)
        assert len(body) < 100, body[:100]  # the refusal line only
        _no_secret(body)


@pytest.mark.cause(8)
@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}"])
def test_view_good_host_serves_the_model(served, model_bytes, host):
    server, _, _ = served
    status, body = _request(server.port, "/data/m.onnx", host=host.format(port=server.port))
    assert status == 200 and body == model_bytes


@pytest.mark.cause(8)
def test_view_http10_without_host_is_403(served):
    server, _, _ = served
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /data/m.onnx HTTP/1.0\r\n\r\n")
        data = s.recv(1 << 16)
    assert data.split(b" ", 2)[1] == b"403", data[:100]


# ----------------------------------------------------------------------------- external data
def _with_external(case: Path, model_bytes: bytes, location: str) -> Path:
    """m.onnx with its largest initialiser stored externally at ``location`` (file written by onnx)."""
    from onnx.external_data_helper import convert_model_to_external_data

    m = onnx.load_from_string(model_bytes)
    convert_model_to_external_data(m, all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=1024)
    onnx.save_model(m, str(case / "m.onnx"))
    m = onnx.load(str(case / "m.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    (case / "m.onnx").write_bytes(m.SerializeToString())
    return case / "m.onnx"


@pytest.mark.cause(8)
def test_view_serves_external_data_exactly(tmp_path, model_bytes, sentinel):
    case = _case(tmp_path, model_bytes, sentinel)
    path = _with_external(case, model_bytes, "m.onnx.data")
    (case / "other.data").write_text(SECRET)
    with view.start(path, port=0) as server:
        assert server.served == ["m.onnx", "m.onnx.data"]
        status, body = _request(server.port, "/data/m.onnx.data")
        assert status == 200 and body == (case / "m.onnx.data").read_bytes() and len(body) > 1024
        assert _request(server.port, "/data/m.onnx")[1] == path.read_bytes()
        for p in ("/data/other.data", "/data/secret.txt", "/data/../outside/secret.txt", "/data/link.txt"):
            status, body = _request(server.port, p)
            assert status == 404, p
            _no_secret(body)


@pytest.mark.cause(8)
def test_view_serves_external_data_in_a_subfolder(tmp_path, model_bytes, sentinel):
    case = _case(tmp_path, model_bytes, sentinel)
    path = _with_external(case, model_bytes, "m.onnx.data")
    (case / "sub" / "w.bin").write_bytes((case / "m.onnx.data").read_bytes())
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "./sub/w.bin"
    path.write_bytes(m.SerializeToString())
    with view.start(path, port=0) as server:
        assert server.served == ["m.onnx", "sub/w.bin"]
        assert _request(server.port, "/data/sub/w.bin")[0] == 200
        assert _request(server.port, "/data/sub/secret.txt")[0] == 404


@pytest.mark.cause(8)
@pytest.mark.parametrize(
    "location, needle",
    [
        pytest.param("../outside/secret.txt", "outside the model's folder", id="cause8-external-dotdot"),
        pytest.param("sub/../../outside/secret.txt", "outside the model's folder", id="cause8-external-sub-dotdot"),
        pytest.param("{sentinel}", "relative path", id="cause8-external-absolute"),
        pytest.param("link.txt", "outside the model's folder", id="cause8-external-symlink-out"),
        pytest.param("..", "outside the model's folder", id="cause8-external-parent"),
        pytest.param(".", "outside the model's folder", id="cause8-external-folder-itself"),
        pytest.param("sub", "is a directory", id="cause8-external-a-directory"),
        pytest.param("missing.bin", "no such file", id="cause8-external-missing"),
        pytest.param("..\\outside\\secret.txt", "relative path", id="cause8-external-backslashes"),
    ],
)
def test_view_external_data_outside_is_refused(tmp_path, model_bytes, sentinel, location, needle):
    case = _case(tmp_path, model_bytes, sentinel)
    path = _with_external(case, model_bytes, location.format(sentinel=sentinel))
    before = _fds()
    msg = assert_api_refused(lambda: view.start(path, port=0), needle)
    assert SENTINEL_TEXT not in msg
    assert _fds() == before  # every descriptor opened on the way was closed


@pytest.mark.cause(8)
def test_view_external_data_in_a_symlinked_folder_outside_is_refused(tmp_path, model_bytes, sentinel):
    case = _case(tmp_path, model_bytes, sentinel)
    (case / "escape").symlink_to(sentinel.parent, target_is_directory=True)
    path = _with_external(case, model_bytes, "escape/secret.txt")
    assert_api_refused(lambda: view.start(path, port=0), "outside the model's folder")


# ----------------------------------------------------------------------------- not a model
def _non_models(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("hello\nworld\n")
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "random.onnx").write_bytes(os.urandom(4096))
    (tmp_path / "nograph.onnx").write_bytes(onnx.ModelProto(ir_version=8).SerializeToString())
    (tmp_path / "data.json").write_text('{"a": 1}')
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "eval_model.onnx").write_text("x")
    os.mkfifo(tmp_path / "fifo.onnx")
    (tmp_path / "dangling.onnx").symlink_to(tmp_path / "nowhere.onnx")
    return [
        ("/etc/hostname", "not a loadable ONNX model"),
        (tmp_path / "notes.txt", "not a loadable ONNX model"),
        (tmp_path / "empty.onnx", "is empty"),
        (tmp_path / "random.onnx", "not a loadable ONNX model"),
        (tmp_path / "nograph.onnx", "not a loadable ONNX model"),
        (tmp_path / "data.json", "not a loadable ONNX model"),
        (tmp_path / "adir", "directory without training_model.onnx"),
        (tmp_path, "directory without training_model.onnx"),
        ("/etc", "directory without training_model.onnx"),
        ("/dev/zero", "not a regular file"),
        ("/dev/null", "not a regular file"),
        (tmp_path / "fifo.onnx", "not a regular file"),
        (tmp_path / "missing.onnx", "no such file"),
        (tmp_path / "dangling.onnx", "no such file"),
        ("bad\nname\x1b[31m.onnx", "no such file"),
    ]


@pytest.mark.cause(8)
def test_view_refuses_non_models_without_leaking_files(tmp_path):
    cases = _non_models(tmp_path)
    before = _fds()
    for path, needle in cases:
        if str(path) == "/etc/hostname" and not Path(path).is_file():
            continue
        msg = assert_api_refused(lambda: view.start(path, port=0), needle)
        assert "\x1b" not in msg, msg
    assert _fds() == before


@pytest.mark.cause(8)
@pytest.mark.parametrize(
    "port, kind",
    [(-1, InvalidValue), (65536, InvalidValue), (True, InvalidType), ("8080", InvalidType), (1.5, InvalidType)],
)
def test_view_bad_port_is_refused(served, port, kind):
    _, case, _ = served
    assert_api_refused(lambda: view.start(case / "m.onnx", port=port), "--port", kind)


@pytest.mark.cause(8)
def test_view_path_of_wrong_type_is_refused():
    assert_api_refused(lambda: view.start(None), "path", TypeError)


@pytest.mark.cause(8)
def test_view_port_in_use_is_one_line(served):
    server, case, _ = served
    before = _fds()
    assert_api_refused(lambda: view.start(case / "m.onnx", port=server.port), "cannot serve on 127.0.0.1")
    assert _fds() == before


@pytest.mark.cause(8)
def test_view_stop_releases_port_and_files(tmp_path, model_bytes, sentinel):
    case = _case(tmp_path, model_bytes, sentinel)
    before = _fds()
    server = view.start(case / "m.onnx", port=0)
    assert _request(server.port, "/data/m.onnx")[0] == 200
    server.stop()
    server.stop()  # idempotent
    assert _fds() == before
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", server.port)) != 0


@pytest.mark.cause(8)
def test_view_file_name_cannot_inject_into_the_page(tmp_path, model_bytes):
    path = tmp_path / 'a"><img src=x onerror=alert(1)>.onnx'
    path.write_bytes(model_bytes)
    with view.start(path, port=0) as server:
        assert server.name == "model.onnx"
        status, body = _request(server.port, "/")
        assert status == 200 and b"onerror" not in body
        assert _request(server.port, "/data/model.onnx")[1] == model_bytes


@pytest.mark.cause(8)
def test_view_model_replaced_after_start_is_not_followed(tmp_path, model_bytes, sentinel):
    """The served file is the one opened at start: aiming its name at a secret afterwards changes nothing."""
    case = _case(tmp_path, model_bytes, sentinel)
    with view.start(case / "m.onnx", port=0) as server:
        os.replace(case / "m.onnx", case / "old.onnx")
        (case / "m.onnx").symlink_to(sentinel)
        status, body = _request(server.port, "/data/m.onnx")
        assert status == 200 and body == model_bytes
        _no_secret(body)


@pytest.mark.cause(8)
def test_view_memory_limit_applies(served):
    _, case, _ = served
    with pytest.raises(AccelcError, match="memory"):
        view.start(case / "m.onnx", port=0, memory_limit=1e-6)


# ----------------------------------------------------------------------------- the command line
@pytest.mark.cause(8)
@pytest.mark.slow
def test_cli_view_refuses_non_models_in_one_line(tmp_path):
    (tmp_path / "notes.onnx").write_text("not a model\n")
    (tmp_path / "d").mkdir()
    if Path("/etc/hostname").is_file():
        assert_refused(run_cli("view", "/etc/hostname", "--port", "0"), "not a loadable ONNX model")
    assert_refused(run_cli("view", tmp_path / "notes.onnx", "--port", "0"), "not a loadable ONNX model")
    assert_refused(run_cli("view", tmp_path / "d", "--port", "0"), "directory without training_model.onnx")


@pytest.mark.cause(8)
@pytest.mark.slow
def test_cli_view_has_no_no_block_flag(tmp_path):
    r = run_cli("view", tmp_path, "--no-block")
    assert r.returncode == 2 and "--no-block" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- the same with a view built in memory
@pytest.mark.cause(8)
@pytest.mark.parametrize("location", ["m.onnx", "m.changes.onnx"])
def test_changes_view_external_data_with_the_model_name_is_refused(tmp_path, model_bytes, sentinel, location):
    case = _case(tmp_path, model_bytes, sentinel)
    (case / "m.changes.onnx").write_bytes(b"x" * 2048)
    path = _with_external(case, model_bytes, location)
    before = _fds()
    assert_api_refused(lambda: view.start(path, port=0, changes=True), "the model's own name")
    assert _fds() == before


@pytest.mark.cause(8)
def test_changes_view_external_data_outside_is_refused(tmp_path, model_bytes, sentinel):
    case = _case(tmp_path, model_bytes, sentinel)
    path = _with_external(case, model_bytes, "../outside/secret.txt")
    before = _fds()
    msg = assert_api_refused(lambda: view.start(path, port=0, changes=True), "outside the model's folder")
    assert SENTINEL_TEXT not in msg and _fds() == before


@pytest.mark.cause(8)
def test_changes_view_is_built_at_start_and_serves_only_itself(tmp_path, model_bytes, sentinel):
    case = _case(tmp_path, model_bytes, sentinel)
    path = _with_external(case, model_bytes, "m.onnx.data")
    before = _fds()
    with view.start(path, port=0, changes=True) as server:
        assert server.served == ["m.changes.onnx", "m.onnx.data"]
        os.replace(case / "m.onnx", case / "old.onnx")
        (case / "m.onnx").symlink_to(sentinel)
        status, body = _request(server.port, "/data/m.changes.onnx")
        assert status == 200 and onnx.load_from_string(body).graph.node
        _no_secret(body)
        for p in ("/data/m.onnx", "/data/old.onnx", "/data/secret.txt", "/data/../outside/secret.txt"):
            assert _request(server.port, p)[0] == 404, p
    assert _fds() == before  # the descriptors are closed by stop()
