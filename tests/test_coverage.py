"""The model-coverage suite at the size CI can afford: a few small torchvision and timm CNNs go
through export, compile (default, every pass, and all of them), gradients against torch, lockstep
training, and after all passes a run trained, resumed and exported (benchmarks/model_coverage.py;
the full table, with a run after every pass, is docs/results/model-coverage.md)."""

import json

import model_coverage  # benchmarks/ is on the path (conftest)
import pytest

model_coverage.torchvision_without_ops()  # before anything imports torchvision (timm does)
pytest.importorskip("timm")


@pytest.mark.slow
def test_small_models_compile_train_and_match_torch(tmp_path):
    assert model_coverage.main(["--models", "small", "--runs", "all", "-o", str(tmp_path / "cov")]) == 0
    rows = json.loads((tmp_path / "cov.json").read_text())
    assert [r["model"] for r in rows] == model_coverage.SMALL
    for r in rows:
        assert "fatal" not in r, r
        stages = {
            k: v for k, v in r.items() if k.startswith(("compile:", "train:", "run:")) or k in ("export", "gradients")
        }
        assert "run:all" in stages and "compile:all" in stages
        assert all(v[0] == "ok" for v in stages.values()), (r["model"], stages)
        assert not r["frozen_silently"], r["model"]
        assert not r["gradients"][1]["off"], (r["model"], r["gradients"])
        assert r["lockstep"][0] == "ok" and r["lockstep"][1]["max_loss_diff"] < 1e-4, r["lockstep"]
