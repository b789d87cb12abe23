"""accelc view serves the training graph through Netron on 127.0.0.1, and it renders in a browser."""

import re
import shutil
import socket
import subprocess
import time

import pytest

from accelc.zoo import export_zoo

from conftest import ACCELC

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port, timeout=30):
    t = time.time()
    while time.time() - t < timeout:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


@pytest.fixture
def served(tmp_path):
    import accelc

    export_zoo("cnn3-small", tmp_path / "m.onnx")
    accelc.compile(tmp_path / "m.onnx", tmp_path / "art")
    port = _free_port()
    proc = subprocess.Popen(
        ACCELC + ["view", str(tmp_path / "art"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _wait_port(port), proc.stderr.read() if proc.poll() is not None else "no server"
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_view_binds_loopback_only(served):
    # reachable on 127.0.0.1, and the listening socket is bound to loopback only
    with open("/proc/net/tcp") as fh:
        rows = [line.split() for line in fh.read().splitlines()[1:]]
    listening = [r[1] for r in rows if r[3] == "0A" and int(r[1].split(":")[1], 16) == served]
    assert listening and all(addr.split(":")[0] == "0100007F" for addr in listening), listening


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian chromium and chromium-driver")
def test_netron_renders_training_graph(served):
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    opts = webdriver.ChromeOptions()
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1200,900",
    ):
        opts.add_argument(a)
    opts.binary_location = CHROMIUM
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        d.get(f"http://127.0.0.1:{served}/")
        deadline = time.time() + 30
        texts = []
        while time.time() < deadline:
            for b in d.find_elements(By.TAG_NAME, "button"):  # Netron's cookie notice
                if b.is_displayed() and b.text.strip() == "Accept":
                    b.click()
            texts = d.execute_script(
                "return Array.from(document.querySelectorAll('g.node text')).map(t => t.textContent)"
            )
            if texts:
                break
            time.sleep(0.3)
        assert "Conv" in texts and "Gemm" in texts, texts[:20]
        assert "c1.weight_grad.accumulation.buffer" in texts  # it is the training graph
    finally:
        d.quit()


@pytest.mark.slow
def test_view_serves_only_the_training_model(served, tmp_path):
    # issue 15 cause 8, end to end through the CLI: the training model and nothing else beside it,
    # and only to a Host of 127.0.0.1:PORT or localhost:PORT
    import http.client

    def get(path, host):
        c = http.client.HTTPConnection("127.0.0.1", served, timeout=10)
        c.putrequest("GET", path, skip_host=True)
        c.putheader("Host", host)
        c.endheaders()
        r = c.getresponse()
        body = r.read()
        c.close()
        return r.status, body

    good = f"127.0.0.1:{served}"
    assert get("/data/training_model.onnx", good) == (200, (tmp_path / "art" / "training_model.onnx").read_bytes())
    assert get("/data/training_model.onnx", f"localhost:{served}")[0] == 200
    assert get("/data/training_model.onnx", f"evil.example:{served}")[0] == 403
    for other in ("report.json", "checkpoint", "eval_model.onnx", "../m.onnx", "%2e%2e/m.onnx"):
        assert get("/data/" + other, good)[0] == 404, other


# ---------------------------------------------------------------- picking the graph, what passes touched
@pytest.fixture(scope="module")
def rewritten(tmp_path_factory):
    """cnn3-small with rescale (a stage), skip and reuse (reuse nodes keep the replaced node as base64)."""
    import accelc

    d = tmp_path_factory.mktemp("rewritten")
    export_zoo("cnn3-small", d / "m.onnx")
    seed = {"rescale": {"mode": "kernel"}, "skip": {"rule": "lars"}}  # one stage (stage-low), instrumented
    accelc.compile(d / "m.onnx", d / "art", passes=["rescale", "skip", "reuse"], pass_options=seed)
    return d / "art"


def _get(server, name=None):
    import http.client

    import onnx

    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    c.request("GET", "/data/" + (name or server.name))
    r = c.getresponse()
    body = r.read()
    c.close()
    assert r.status == 200
    return onnx.load_from_string(body)


def test_view_picks_the_graph(rewritten):
    from accelc import netron as view

    assert list(view.graphs(rewritten)) == [
        "training",
        "eval",
        "optimizer",
        "stage-low",
        "stage-low/eval",
        "stage-low/optimizer",
    ]
    for graph, name, inputs in (
        ("eval", "eval_model.onnx", None),
        ("optimizer", "optimizer_model.onnx", None),
        ("stage-low", "stage-low.training_model.onnx", [14, 14]),
        ("stage-low/training", "stage-low.training_model.onnx", [14, 14]),
        ("stage-low/eval", "stage-low.eval_model.onnx", [14, 14]),
    ):
        with view.start(rewritten, graph=graph) as server:
            assert server.name == name and server.served == [name]
            m = _get(server)
            if inputs:
                assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim][2:] == inputs


def test_view_graph_refusals(rewritten, tmp_path):
    from accelc import netron as view

    from conftest import assert_api_refused

    msg = assert_api_refused(lambda: view.start(rewritten, graph="../m.onnx"), "--graph takes training, eval")
    assert "stage-low/eval" in msg and msg.endswith("got ../m.onnx")
    assert_api_refused(lambda: view.start(rewritten, graph="checkpoint"), "--graph takes")
    assert_api_refused(lambda: view.start(rewritten.parent / "m.onnx", graph="eval"), "is one ONNX file")


def test_view_hides_base64_blobs_and_keeps_the_file(rewritten):
    import onnx

    from accelc import netron as view

    path = rewritten / "training_model.onnx"
    before = path.read_bytes()
    on_disk = onnx.load(str(path))
    blobs = [p.value for n in on_disk.graph.node for p in n.metadata_props if p.key == "accelc.reuse.original"]
    assert blobs and all(len(b) > 300 for b in blobs)
    with view.start(rewritten) as server:
        m = _get(server)
    shown = [p.value for n in m.graph.node for p in n.metadata_props if p.key == "accelc.reuse.original"]
    assert len(shown) == len(blobs)
    assert all(
        re.fullmatch(r"\[\d+ bytes of base64 holding the Conv(Grad)? node .*: kept in the file, not shown\]", v)
        for v in shown
    )
    assert all(len(v) < 400 for v in shown)
    # everything else as in the file: same nodes, op types, initialisers
    assert [n.op_type for n in m.graph.node] == [n.op_type for n in on_disk.graph.node]
    assert [t.raw_data for t in m.graph.initializer] == [t.raw_data for t in on_disk.graph.initializer]
    assert path.read_bytes() == before  # the artifact keeps its blobs (the runtime needs them)


def test_view_changes_marks_what_passes_touched(rewritten):
    from accelc import netron as view

    with view.start(rewritten, changes=True) as server:
        assert server.name == "training_model.changes.onnx"
        m = _get(server)
    props = {p.key: p.value for p in m.metadata_props}
    assert "reuse: 4 node(s)" in props["accelc.changes"] and "skip:" in props["accelc.changes"]
    marked = [n.op_type for n in m.graph.node if n.op_type.startswith("[")]
    assert any(t.startswith("[reuse] ReuseConv") for t in marked) and any(t.startswith("[skip] ") for t in marked)
    tagged = [n for n in m.graph.node if any(p.key == "accelc.pass" for p in n.metadata_props)]
    assert len(marked) == len(tagged)  # exactly the nodes with provenance
    assert all(not n.op_type.startswith("[") for n in m.graph.node if n not in tagged)
    with view.start(rewritten, graph="stage-low", changes=True) as server:
        low = {p.key: p.value for p in _get(server).metadata_props}["accelc.changes"]
    assert "reuse: 4 node(s)" in low  # later passes rewrite the stage too


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian chromium and chromium-driver")
def test_netron_renders_the_changes_view(rewritten):
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    from accelc import netron as view

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=1200,900"):
        opts.add_argument(a)
    opts.binary_location = CHROMIUM
    with view.start(rewritten, changes=True) as server:
        d = webdriver.Chrome(service=Service(DRIVER), options=opts)
        try:
            d.get(server.url)
            deadline, texts = time.time() + 30, []
            while time.time() < deadline:
                for b in d.find_elements(By.TAG_NAME, "button"):
                    if b.is_displayed() and b.text.strip() == "Accept":
                        b.click()
                texts = d.execute_script(
                    "return Array.from(document.querySelectorAll('g.node text')).map(t => t.textContent)"
                )
                if texts:
                    break
                time.sleep(0.3)
            assert any(t.startswith("[reuse] ReuseConv") for t in texts), texts[:30]
            assert any(t.startswith("[skip]") for t in texts) and "Gemm" in texts
        finally:
            d.quit()
