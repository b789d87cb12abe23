import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from model_coverage import off_gradients  # noqa: E402,F401  (the float64-judged comparison, shared)

ACCELC = [sys.executable, "-m", "accelc"]


def run_cli(*args, timeout=300, cwd=None):
    """Run the accelc CLI in a subprocess; returns CompletedProcess (text)."""
    return subprocess.run(ACCELC + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


class MixedNet(nn.Module):
    """Written in the test: BatchNorm, residual add, grouped conv, depthwise conv, strided conv,
    average pooling and a flatten->Gemm head."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24 * 4 * 4, num_classes)

    def forward(self, x):
        h = F.relu(self.bn1(self.stem(x)))
        h = F.relu(h + self.bn2(self.grouped(h)))  # residual
        h = F.relu(self.pw(self.dw(h)))
        h = F.avg_pool2d(h, 2)
        return self.fc(h.flatten(1))


@pytest.fixture(scope="module")
def small_art(tmp_path_factory):
    """cnn3-small compiled with the defaults, once per test module (read-only for the tests)."""
    import accelc
    from accelc.zoo import export_zoo

    d = tmp_path_factory.mktemp("art")
    export_zoo("cnn3-small", d / "m.onnx")
    accelc.compile(d / "m.onnx", d / "art")
    return d / "art"


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@pytest.fixture
def mixed_model(tmp_path):
    import accelc

    torch.manual_seed(0)
    m = MixedNet()
    path = tmp_path / "mixed.onnx"
    accelc.export(m, torch.zeros(2, 3, 16, 16), path)
    return m, path


def export_test_model(name, path):
    """Export zoo model ``name`` or, for "mixed", MixedNet (seeded) to ``path``; returns (module, shape)."""
    import accelc
    from accelc.zoo import zoo_module

    if name == "mixed":
        torch.manual_seed(0)
        m, shape = MixedNet(), (3, 16, 16)
    else:
        m, shape = zoo_module(name)
    accelc.export(m, torch.zeros(2, *shape), path)
    return m, shape


# ----------------------------------------------------------------------------- hostile inputs
SENTINEL_TEXT = "ACCELC-SENTINEL-7f3a9c"  # content of a file outside every input: must never be echoed


@pytest.fixture
def sentinel(tmp_path):
    """A file outside the case's folder holding SENTINEL_TEXT; a case that reads it has failed."""
    p = tmp_path / "outside" / "secret.txt"
    p.parent.mkdir()
    p.write_text(SENTINEL_TEXT + "\n")
    return p


def assert_refused(r, needle: str = "", out=None, code: int = 2):
    """A refused hostile input (CLI result ``r``): exit ``code``, exactly one line on stderr starting
    ``accelc: error:``, no traceback, ``needle`` in it, nothing echoed from a sentinel file, and -- when
    ``out`` is given -- no output and no temporary siblings of it left behind."""
    err = r.stderr
    assert r.returncode == code, (r.returncode, err[-2000:])
    assert err.startswith("accelc: error:") and err.count("\n") == 1, err[-2000:]
    assert "Traceback" not in err and needle in err, err
    assert SENTINEL_TEXT not in err and SENTINEL_TEXT not in (r.stdout or ""), err
    if out is not None:
        out = Path(out)
        assert not out.exists(), f"{out} was left behind"
        assert not [f for f in os.listdir(out.parent) if f.startswith("." + out.name)], os.listdir(out.parent)


def assert_api_refused(fn, needle: str = "", kind=None):
    """The Python API refuses with an AccelcError (and ``kind``, e.g. ValueError, when given)
    whose message contains ``needle``; returns the message (the CLI prints the same one)."""
    from accelc import AccelcError

    with pytest.raises(AccelcError) as ei:
        fn()
    if kind is not None:
        assert isinstance(ei.value, kind), type(ei.value).__mro__
    msg = str(ei.value)
    assert needle in msg and "\n" not in msg, msg
    return msg


# the start of a fresh interpreter's code where importing ORT Training fails, as on a machine with
# plain onnxruntime (GPU machines, Python >= 3.13): for tests of what must work without it
BLOCK_ORT_TRAINING = """import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "onnxruntime.training" or name.startswith("onnxruntime.training."):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
"""


def stopped_after(monkeypatch, epoch: int, run):
    """``run()`` (a training run) as a kill at the end of ``epoch`` leaves it: the trainer stops
    there, with the checkpoint a resume starts from. Returns what ``run()`` returns."""
    from accelc.runtime.train import loop

    init = loop.Trainer.__init__

    def stopping(self, *a, **kw):
        init(self, *a, **kw)
        self.stop_when = lambda m: m["epoch"] == epoch

    with monkeypatch.context() as mp:
        mp.setattr(loop.Trainer, "__init__", stopping)
        return run()
