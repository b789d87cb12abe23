"""``make demo``: export a built-in model, compile it, show what the compiler sees, then train it
on the built-in synthetic data — torch eager, plain ORT Training and ORT with accelc's passes side
by side — and print the result table. About two to three minutes on 2 cores."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import api
from .bench import markdown, run_bench
from .cli import layer_table_text
from .compiler.errors import AccelcError, show
from .compiler.pass_api import registered


def main(out: str = "demo-out") -> int:
    from .compiler.export import export_zoo  # heavy: torch

    out_dir = Path(out)
    out_dir.mkdir(exist_ok=True)
    model = "vgg"
    export_zoo(model, out_dir / f"{model}.onnx")
    api.compile(out_dir / f"{model}.onnx", out_dir / "artifacts", force=True)
    print(f"== accelc inspect {out_dir}/artifacts ({model}: VGG-style CNN with BatchNorm)\n")
    print(layer_table_text(api.inspect(out_dir / "artifacts")))
    # rescale needs large kernels and a head that follows a smaller map (the `largekernel` zoo
    # model); the demo's VGG has 3x3 kernels only, so it shows skip (and reuse once it exists).
    passes = [p for p in ("skip", "reuse") if p in registered()]
    configs = ["torch", "ort"] + [f"ort+{p}" for p in passes]
    print(f"\n== training on synthetic data: {', '.join(configs)}\n", flush=True)
    rep = run_bench(
        model,
        "synthetic:4000",
        epochs=int(os.environ.get("DEMO_EPOCHS", 3)),
        configs=configs,
        out_dir=out_dir / "bench",
        batch_size=64,
        seed=0,
        lr=3e-4,
        progress=sys.stderr.isatty(),
        force=True,
    )
    print(markdown(rep))
    print(f"plots and JSON in {out_dir}/bench/; view the training graph with: accelc view {out_dir}/artifacts")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AccelcError as e:
        print(f"accelc: error: {show(e, 2000)}", file=sys.stderr)
        sys.exit(2)
