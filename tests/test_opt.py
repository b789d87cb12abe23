"""opt pass: ReluGrad rewrite is exact (loss and gradients equal the unrewritten graph to 1e-5)."""
import numpy as np
import onnx
import pytest

import accelc
from accelc.runtime.session import TrainingSession

from conftest import export_test_model


@pytest.mark.parametrize("name", ["vgg", "resnet", "mixed"])
def test_relu_grad_rewrite_is_exact(name, tmp_path):
    m, shape = export_test_model(name, tmp_path / "m.onnx")
    plain = accelc.compile(tmp_path / "m.onnx", tmp_path / "plain", opt=False)
    rep = accelc.compile(tmp_path / "m.onnx", tmp_path / "opt")
    assert [p["name"] for p in rep["passes"]] == ["opt"] and not plain["passes"]
    g = onnx.load(str(tmp_path / "opt" / "training_model.onnx")).graph
    assert not any(n.op_type == "ReluGrad" for n in g.node)
    tagged = [n for n in g.node if any(p.key == "accelc.pass" and p.value == "opt" for p in n.metadata_props)]
    assert len(tagged) == 3 * len(rep["passes"][0]["changes"]) > 0
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, *shape)).astype(np.float32)
    y = rng.integers(0, 10, 8).astype(np.int64)
    la, ga, _ = TrainingSession(tmp_path / "plain").compute_gradients(x, y)
    lb, gb, _ = TrainingSession(tmp_path / "opt").compute_gradients(x, y)
    assert abs(la - lb) <= 1e-5 * abs(la)
    for k in ga:
        assert np.linalg.norm(ga[k] - gb[k]) <= 1e-5 * np.linalg.norm(ga[k]) + 1e-8, k
