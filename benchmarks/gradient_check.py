"""Loss and gradients of compiled artifacts against torch autograd for every zoo model and the
test-suite MixedNet (same weights, one batch). Run from the repository root:
python benchmarks/gradient_check.py"""

import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import accelc
from accelc.runtime.session import TrainingSession
from accelc.zoo import ZOO, zoo_module

from conftest import MixedNet

d = Path(tempfile.mkdtemp())
models = {n: zoo_module(n) for n in ZOO}
torch.manual_seed(0)
models["mixed(test)"] = (MixedNet(), (3, 16, 16))
for name, (m, shape) in models.items():
    accelc.export(m, torch.zeros(2, *shape), d / f"{name}.onnx")
    accelc.compile(d / f"{name}.onnx", d / name)
    rng = np.random.default_rng(0)
    b = 2 if name == "resnet18" else 4
    x = rng.standard_normal((b, *shape)).astype(np.float32)
    y = rng.integers(0, 10, b).astype(np.int64)
    loss, g, _ = TrainingSession(d / name).compute_gradients(x, y)
    mm = copy.deepcopy(m).train()
    l = F.cross_entropy(mm(torch.from_numpy(x)), torch.from_numpy(y))
    l.backward()
    errs = {
        k: np.linalg.norm(g[k] - p.grad.numpy()) / max(np.linalg.norm(p.grad.numpy()), 1e-30)
        for k, p in mm.named_parameters()
    }
    big = {k: v for k, v in errs.items() if np.linalg.norm(mm.get_parameter(k).grad.numpy()) > 1e-4}
    print(
        f"{name}: loss diff {abs(loss - float(l)):.1e}, max rel grad err {max(big.values()):.1e} over {len(errs)} params"
    )
