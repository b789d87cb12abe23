"""Cluster reuse across batches (CR, passes/reuse/cross.py): the table's forward and backward
against a reference written out here, its refresh rules, the option, and a run."""

import json

import numpy as np
import pytest
import torch

from accelc.compiler.pass_api import get
from accelc.passes.reuse import cross, native
from accelc.passes.reuse.kernels import _weight_chunks, backward_torch, exact_input_grad, hash_buckets, unfold_rows
from accelc.passes.reuse.spec import ConvGeom, ReuseSpec, make_planes

from conftest import assert_api_refused, export_test_model

GEOM = ConvGeom(C=16, Co=8, kh=3, kw=3, pads=(1, 1, 1, 1))
IMPLS = ["torch"] + (["native"] if native.available() else [])


def reference(x, w, b, planes, spec, table=None):
    """The CR forward written out: codes with the kept means (or this batch's), a kept centroid
    for a kept code, the mean of this batch's rows for a new one; y = Σ_g C[key]·W_g + b."""
    G, B = spec.chunks(GEOM.K), 1 << spec.H
    C, V, mu = (torch.zeros(G * B, spec.L), torch.zeros(G * B, dtype=torch.bool), x.mean((0, 2, 3)))
    if table is not None:
        C, V, mu = table[0].clone(), table[1].clone(), table[2]
    keys = (hash_buckets(x, planes, GEOM, spec, mu=mu) + (torch.arange(G, dtype=torch.int32) * B).view(1, G, 1)).long()
    rows = unfold_rows(x, GEOM)
    n, p, k = rows.shape
    rows = torch.nn.functional.pad(rows, (0, G * spec.L - k)).reshape(n, p, G, spec.L).reshape(-1, spec.L)
    flat = keys.permute(0, 2, 1).reshape(-1)
    for key in flat.unique().tolist():
        if not V[key]:
            C[key], V[key] = rows[flat == key].mean(0), True
    wg = _weight_chunks(w, G, spec.L)
    pm = torch.cat([C[g * B : (g + 1) * B] @ wg[g] for g in range(G)])
    y = pm[flat].reshape(n, p, G, -1).sum(2) + b
    return y.transpose(1, 2).reshape(n, -1, *x.shape[2:]), (C, V, mu)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("L", [144, 50])  # whole channels (grouped-conv hash) and not (row hash)
def test_refresh_then_reuse_equal_the_reference_and_the_backward_is_the_forward_s(impl, L, monkeypatch):
    monkeypatch.setattr(cross, "MAX_NEW", 1.0)  # keep the table whatever batch B brings
    g = torch.Generator().manual_seed(0)
    spec = ReuseSpec(L, 4, "image", "exact")
    planes = torch.from_numpy(make_planes(spec.chunks(GEOM.K), L, 4, 3))
    xa, xb = (torch.randn(4, 16, 6, 6, generator=g).clamp_min(0) for _ in range(2))
    w, b = torch.randn(8, 16, 3, 3, generator=g), torch.randn(8, generator=g)
    table = cross.ClusterTable(4)
    ya, ctx_a = cross.forward(xa, w, b, planes, GEOM, spec, table, impl=impl)
    ra, kept = reference(xa, w, b, planes, spec)
    torch.testing.assert_close(ya, ra, rtol=1e-5, atol=1e-5)
    assert table.stats["refresh"] == 1 and ctx_a.shared
    yb, ctx = cross.forward(xb, w, b, planes, GEOM, spec, table, impl=impl)
    rb, _ = reference(xb, w, b, planes, spec, kept)
    torch.testing.assert_close(yb, rb, rtol=1e-5, atol=1e-5)
    assert table.stats["reuse"] == 1 and table.stats["rows_kept"] > 0
    used = int((ctx.counts > 0).sum())
    assert ctx.remain_ratio == pytest.approx(used / ctx.ids.numel())
    # backward: dW is the gradient of the forward that ran (autograd through it), dB exact
    dy = torch.randn(yb.shape, generator=g)
    dx, dw, db = (native.backward if impl == "native" else backward_torch)(dy, xb, w, ctx, GEOM, spec)
    wv = w.clone().requires_grad_(True)
    G, B = spec.chunks(GEOM.K), 1 << spec.H
    wg = _weight_chunks(wv, G, L)
    pm = torch.cat([ctx.centroids[i * B : (i + 1) * B] @ wg[i] for i in range(G)])
    flat = ctx.ids.permute(0, 2, 1).reshape(-1).long()
    y = pm[flat].reshape(4, 36, G, -1).sum(2).transpose(1, 2).reshape(4, -1, 6, 6)
    (y * dy).sum().backward()
    torch.testing.assert_close(dw, wv.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db, dy.sum((0, 2, 3)))
    torch.testing.assert_close(dx, exact_input_grad(dy, xb, w, GEOM), rtol=1e-4, atol=1e-4)  # input_grad exact


def test_the_table_is_rebuilt_every_k_batches_and_when_too_many_rows_are_new():
    g = torch.Generator().manual_seed(1)
    spec = ReuseSpec(144, 6, "batch", "exact")
    planes = torch.from_numpy(make_planes(1, 144, 6, 3))
    w, b = torch.randn(8, 16, 3, 3, generator=g), torch.zeros(8)
    x = torch.randn(4, 16, 6, 6, generator=g).clamp_min(0)
    table = cross.ClusterTable(3)
    for _ in range(6):  # the same batch: nothing is new, so only the period rebuilds
        cross.forward(x, w, b, planes, GEOM, spec, table, impl="torch")
    assert table.stats["refresh"] == 2 and table.stats["reuse"] == 4
    assert table.stats["rows_kept"] == 4 * x.shape[0] * 36  # a reuse batch of the same rows keeps them all
    # a batch from elsewhere (far from the table's rows): most codes are new, the table is rebuilt
    far = -3.0 * torch.randn(4, 16, 6, 6, generator=g).abs()
    before = table.stats["refresh"]
    cross.forward(far, w, b, planes, GEOM, spec, table, impl="torch")
    assert table.stats["refresh"] == before + 1
    # another shape (a rescale stage) starts a new table
    cross.forward(torch.rand(2, 16, 4, 4, generator=g), w, b, planes, GEOM, spec, table, impl="torch")
    assert table.stats["refresh"] == before + 2 and table.key[0] == (16, 4, 4)


def test_cross_batch_option_is_validated_and_needs_h_at_most_12(tmp_path):
    p = get("reuse")
    assert p.resolve_options({})["cross_batch"] == 0 and p.resolve_options({"cross_batch": "8"})["cross_batch"] == 8
    for bad in (1, -1, "x", 2.5, True):
        assert_api_refused(
            lambda bad=bad: p.resolve_options({"cross_batch": bad}), "--reuse-cross-batch must be 0 (off) or an integer"
        )
    import accelc

    export_test_model("cnn3-small", tmp_path / "m.onnx")
    assert_api_refused(
        lambda: accelc.compile(
            tmp_path / "m.onnx", tmp_path / "a", ["reuse"], pass_options={"reuse": {"cross_batch": 4, "H": 16}}
        ),
        "--reuse-cross-batch needs H <= 12",
    )
    assert not (tmp_path / "a").exists()


def test_a_run_keeps_clusters_across_batches_and_reports_it(tmp_path):
    import accelc

    export_test_model("cnn3-small", tmp_path / "m.onnx")
    opts = {"reuse": {"choose": "all", "cross_batch": 4, "scope": "batch"}}
    accelc.compile(tmp_path / "m.onnx", tmp_path / "art", ["reuse"], pass_options=opts, validate_result=False)
    plan = json.loads((tmp_path / "art" / "plan.json").read_text())["controllers"][-1]
    assert plan["options"]["cross_batch"] == 4
    accelc.train(
        tmp_path / "art", data="synthetic:96", epochs=2, batch_size=16, run_dir=tmp_path / "run", progress=False,
        threads=1, test_limit=32,
    )  # fmt: skip
    hist = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for m in hist:
        for layer in ("c2", "c3"):
            r = m["reuse"][layer]
            assert 0 < r["rows_in_kept_clusters"] < 1 and 0 < r["remain_ratio"] < 1
    assert hist[-1]["train_loss"] == hist[-1]["train_loss"]  # finite


def test_an_edited_plan_cannot_turn_on_cross_batch_with_a_large_table(tmp_path):
    import accelc
    from accelc.compiler.artifact_dir import load_artifacts
    from accelc.passes.reuse.algorithm import Reuse

    export_test_model("cnn3-small", tmp_path / "m.onnx")
    accelc.compile(tmp_path / "m.onnx", tmp_path / "art", ["reuse"], validate_result=False)
    art, _ = load_artifacts(tmp_path / "art")
    spec = next(p for p in art.plan if p["type"] == "reuse")
    for bad, needle in (
        (dict(cross_batch=1), "'cross_batch' must be 0 (off) or an integer in 2..1000000"),
        (dict(cross_batch=2.5), "'cross_batch' must be 0 (off) or an integer"),
        (dict(cross_batch=4, H=16), "'cross_batch' needs H <= 12 (a table of 2^H centroids per chunk), got H=16"),
        (dict(cross_batch=4, strategy="lh", schedule=[[144, 8], [72, 14]]), "got H=14 in the --reuse-schedule"),
    ):
        assert_api_refused(lambda bad=bad: Reuse(art, {**spec, "options": {**spec["options"], **bad}}), needle)
    # a fixed strategy with an unused schedule of large H is fine
    fine = {**spec["options"], "cross_batch": 4, "H": 8, "schedule": [[144, 16]]}
    assert Reuse(art, {**spec, "options": fine}).cross_batch == 4


def test_a_lazy_session_builds_only_the_variant_it_trains(tmp_path, monkeypatch):
    """A lazy TrainingSession builds no ORT session until used; a swap before that replaces the
    variant to build; reading a session attribute builds it; ready() builds it."""
    import accelc
    from accelc.compiler.artifact_dir import load_artifacts
    from accelc.passes.reuse.rewrite import reuse_variant
    from accelc.runtime.session import TrainingSession

    export_test_model("cnn3-small", tmp_path / "m.onnx")
    accelc.compile(tmp_path / "m.onnx", tmp_path / "art", ["reuse"], validate_result=False)
    art, _ = load_artifacts(tmp_path / "art")
    built = []
    real = TrainingSession._build_sessions
    monkeypatch.setattr(TrainingSession, "_build_sessions", lambda self, a: (built.append(a), real(self, a))[1])
    s = TrainingSession(art, lazy=True)
    assert built == [] and s.artifacts is art
    plain = reuse_variant(art, {})
    s.swap(plain, "reuse:off")
    assert built == [] and s.artifacts is plain and s.variant_name == "reuse:off"
    assert s.trained and built == [plain]  # a session attribute: built on first read
    s.ready()
    assert built == [plain]  # once
    lazy = TrainingSession(art, lazy=True)
    lazy.ready()
    assert built[-1] is art and lazy.eval_sess is not None
    x = np.zeros((2, *art.info.input_shape), np.float32)
    loss, grads, _ = TrainingSession(art, lazy=True).compute_gradients(x, np.zeros(2, np.int64))
    assert np.isfinite(loss) and grads
    with pytest.raises(AttributeError):
        TrainingSession(art, lazy=True).no_such_attribute  # noqa: B018
