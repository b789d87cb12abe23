"""BatchNorm statistics after training with reuse: the zoo ResNet (Fashion-MNIST 32x32, 6,000 train
/ 2,000 test images, batch 64, lr 3e-3, 2 epochs, reuse fixed with ``choose=all``) trained with
the reuse pass evaluates with exact convs. Its BatchNorm running statistics were gathered under the
approximate convs unless the reuse controller recalibrates them (``--reuse-recalibrate N``: before
each evaluation of an epoch that reused, N training batches through the exact convs, forward only).

Three runs of the same training (the running statistics never feed back into training: a training
step normalises with its batch's statistics, so the parameters are the same with or without it):

1. ``recalibrate=0``: the statistics as trained; then, from that state, recalibrated by hand with
   ``N`` batches for each ``N`` of the sweep (the engine's ``recalibrate_batchnorm``, the path the
   controller takes; the batches of the last epoch's data order) and, for comparison, the remedy
   measured before the option existed (61 ``batchnorm_step`` forward+backward passes on the exact
   variant, the batches of the next epoch's order);
2. the default (``recalibrate`` left out of the options): the automatic path, what ``accelc train``
   reports.

    python benchmarks/bn_recalibration.py [epochs] [N,N,...]
"""

import sys
import tempfile
import time
from pathlib import Path

import accelc
from accelc.passes.reuse.rewrite import DEFAULT_RECALIBRATE, reuse_variant
from accelc.runtime.algorithm import algorithms_for
from accelc.runtime.data import load_data
from accelc.runtime.session import TrainingSession
from accelc.runtime.spec import TrainSpec
from accelc.runtime.train import Trainer
from accelc.zoo import export_zoo

BATCH = 64


def train(d: Path, name: str, epochs: int, options: dict):
    accelc.compile(d / "r.onnx", d / name, passes=["reuse"], pass_options={"reuse": options}, lr=3e-3)
    sess = TrainingSession(d / name)
    ds = load_data("fashion-mnist", sess.info.input_shape, 10, 6000, 2000)
    run = TrainSpec(run_dir=None, epochs=epochs, batch_size=BATCH, seed=0, progress=False)
    trainer = Trainer(run, sess, ds, algorithms=algorithms_for(sess.artifacts))
    summary = trainer.run()
    for m in summary["history"]:
        rec = [x for x in m["decisions"] if x["action"] == "recalibrate"]
        note = f", recalibrated: {rec[0]['batches']} batches in {rec[0]['seconds']:.2f} s" if rec else ""
        print(
            f"  [{name}] epoch {m['epoch']}: train loss {m['train_loss']:.4f}, test loss {m['test_loss']:.4f}, "
            f"test acc {m['test_acc']:.4f}, {m['train_seconds']:.1f} s of steps "
            f"({1e3 * m['train_seconds'] / m['steps']:.0f} ms/step){note}; train_time {m['train_time']:.1f} s"
        )
    return sess, ds, trainer


def main(epochs: int = 2, sweep=(4, 8, 16, 32, 64, 128)) -> None:
    d = Path(tempfile.mkdtemp())
    export_zoo("resnet", d / "r.onnx", input_shape=(1, 32, 32))

    print("1. recalibrate=0 (statistics as trained under the reused convs)")
    sess, ds, trainer = train(d, "off", epochs, {"choose": "all", "recalibrate": 0})
    loss, acc = trainer.evaluate()
    print(f"  as trained: test loss {loss:.4f}, test acc {acc:.4f}")
    exact = reuse_variant(sess.artifacts, {})
    trained = {k: v.clone() for k, v in sess.params.items()}
    t0 = time.perf_counter()
    sess.recalibrate_batchnorm(exact, [])  # builds the statistics forward (once per variant)
    print(f"  by hand, from that state ({len(list(ds.batches(epochs - 1, BATCH, 0)))} batches an epoch; the "
          f"statistics forward built in {time.perf_counter() - t0:.2f} s):")  # fmt: skip
    for n in sweep:
        for k, v in trained.items():
            sess.params[k].copy_(v)
        batches = ((x, y) for k, (_, x, y) in zip(range(n), ds.batches(epochs - 1, BATCH, 0)))
        t0 = time.perf_counter()
        sess.recalibrate_batchnorm(exact, batches)
        secs = time.perf_counter() - t0
        loss, acc = trainer.evaluate()
        print(
            f"    N={n:4d}: test loss {loss:.4f}, test acc {acc:.4f} "
            f"({secs:.2f} s, {1e3 * secs / n:.0f} ms/batch, forward only)"
        )
    for k, v in trained.items():
        sess.params[k].copy_(v)
    base = sess.artifacts
    sess.swap(exact, "exact")
    t0 = time.perf_counter()
    for k, (_, x, y) in enumerate(ds.batches(epochs, BATCH, 0)):
        if k == 61:
            break
        sess.batchnorm_step(x, y)  # forward+backward of the exact graph, no parameter update
    secs = time.perf_counter() - t0
    loss, acc = trainer.evaluate()
    print(f"    61 batchnorm_step (before the option): test loss {loss:.4f}, test acc {acc:.4f} ({secs:.2f} s)")
    sess.swap(base, "reuse")

    print(f"2. the default (recalibrate={DEFAULT_RECALIBRATE}): the automatic path")
    _, _, auto = train(d, "auto", epochs, {"choose": "all"})
    m = auto.history[-1]
    print(f"  reported: test loss {m['test_loss']:.4f}, test acc {m['test_acc']:.4f}")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(
        int(args[0]) if args else 2,
        tuple(int(v) for v in args[1].split(",")) if len(args) > 1 else (4, 8, 16, 32, 64, 128),
    )
