"""``accelc export``: write a built-in zoo model as a training-ready ONNX file."""

from __future__ import annotations

from ..compiler.errors import AccelcError, show
from .args import MemoryArgs, Tool


class Export(Tool):
    """Write a built-in zoo model (or list the zoo) as an ONNX file exported for training."""

    name = "export"
    examples = (
        "accelc export --list",
        "accelc export vgg -o vgg.onnx",
        "accelc export largekernel --input-shape 1,64,64 -o lk.onnx",
    )

    def add_arguments(self, p):
        p.add_argument("name", nargs="?", help="zoo model name (omit or --list to list the zoo)")
        p.add_argument("-o", "--output", help="output .onnx path")
        p.add_argument("--list", action="store_true", help="list the zoo")
        p.add_argument("--input-shape", help="C,H,W of the input (default: the model's own)")
        p.add_argument("--num-classes", type=int, default=10, help="classes of the head (default 10)")
        p.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default 0)")
        MemoryArgs().add(p)

    def run(self, a):
        from ..zoo import ZOO, export_zoo  # heavy: torch

        if a.list or not a.name:
            for k, (_, shape, desc) in ZOO.items():
                print(f"{k:12s} input {'x'.join(map(str, shape)):9s} {desc}")
            return 0
        if not a.output:
            raise AccelcError("export needs -o OUTPUT.onnx")
        export_zoo(a.name, a.output, a.input_shape, a.num_classes, a.seed, memory_limit_gb=a.memory_limit)
        if not a.quiet:
            print(f"wrote {show(a.output)}")
        return 0
