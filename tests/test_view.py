"""accelc view serves the training graph through Netron on 127.0.0.1, and it renders in a browser."""

import shutil
import socket
import subprocess
import time

import pytest

from accelc.compiler.export import export_zoo

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
