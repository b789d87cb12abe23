"""``accelc export-run``: write a trained run as an inference ONNX model."""

from __future__ import annotations

from .. import api
from ..compiler.errors import show
from .args import Tool


class ExportRun(Tool):
    """Write a trained run as an inference ONNX model (and an ORT training checkpoint)."""

    name = "export-run"
    examples = (
        "accelc export-run run -o model.onnx",
        "accelc export-run run -o model.onnx --artifacts art --ort-checkpoint model.ckpt",
    )

    def add_arguments(self, p):
        p.add_argument("run", help="run directory written by accelc train")
        p.add_argument("-o", "--output", required=True, help="inference ONNX model to write (.onnx)")
        p.add_argument(
            "--artifacts",
            help="artifact directory the run was trained from (default: found beside the run or in the "
            "current folder, verified by the hash its checkpoint records)",
        )
        p.add_argument(
            "--epoch", type=int, default=None, help="epoch to export, from 1 (default: the last, the one a run keeps)"
        )
        p.add_argument(
            "--ort-checkpoint",
            metavar="PATH",
            help="also write an ORT training CheckpointState with the trained parameters "
            "(onnxruntime.training.api.Module(training_model.onnx, state, eval_model.onnx) continues from it)",
        )
        p.add_argument("--force", action="store_true", help="replace output files that exist")

    def run(self, a):
        r = api.export_run(
            a.run, a.output, artifacts=a.artifacts, epoch=a.epoch, ort_checkpoint=a.ort_checkpoint, force=a.force
        )
        if not a.quiet:
            print(
                f"wrote {show(r['output'])}: epoch {r['epoch']} (test accuracy {r['test_acc']:.4f}), "
                f"{r['parameter_count']:,} parameter values, opset {r['opset'].get('ai.onnx')}, IR {r['ir_version']}"
            )
            if r["ort_checkpoint"]:
                print(
                    f"wrote {show(r['ort_checkpoint'])}: ORT CheckpointState of {r['ort_checkpoint_parameters']} "
                    f"parameters (artifacts: {show(r['artifacts'])})"
                )
        return 0
