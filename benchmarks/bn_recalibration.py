"""BatchNorm statistics after training with reuse: the zoo ResNet trained with the reuse pass
(fixed strategy) evaluates with exact convs but with running statistics gathered under the
approximate ones. Recalibrating them — forward+backward passes of the exact graph on training
batches, no parameter update — is the remedy measured here.

    python benchmarks/bn_recalibration.py [epochs] [batches]
"""

import sys
import tempfile
from pathlib import Path

import accelc
from accelc.compiler.export import export_zoo
from accelc.passes.reuse.rewrite import reuse_variant
from accelc.runtime.algorithm import algorithms_for
from accelc.runtime.data import load_data
from accelc.runtime.session import TrainingSession
from accelc.runtime.train import Trainer


def main(epochs: int = 2, batches: int = 61) -> None:
    d = Path(tempfile.mkdtemp())
    export_zoo("resnet", d / "r.onnx", input_shape=(1, 32, 32))
    accelc.compile(d / "r.onnx", d / "art", passes=["reuse"], lr=3e-3)
    sess = TrainingSession(d / "art")
    ds = load_data("fashion-mnist", sess.info.input_shape, 10, 6000, 2000)
    trainer = Trainer(sess, ds, None, epochs, 64, 0, algorithms_for(sess.artifacts), progress=False)
    for m in trainer.run()["history"]:
        print(
            f"epoch {m['epoch']}: train loss {m['train_loss']:.4f}, test loss {m['test_loss']:.4f}, "
            f"test acc {m['test_acc']:.4f}"
        )
    sess.swap(reuse_variant(sess.artifacts, {}), "exact")
    for k, (_, x, y) in enumerate(ds.batches(epochs, 64, 0)):
        if k == batches:
            break
        sess.batchnorm_step(x, y)  # batch statistics of the exact convs, no parameter update
    loss, acc = trainer.evaluate()
    print(f"after recalibrating BatchNorm ({batches} batches, exact convs): test loss {loss:.4f}, test acc {acc:.4f}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
