"""accelc — an ONNX training-graph rewriting compiler for cheaper CNN training on ORT Training.

Python API (the CLI is a thin layer over these)::

    import accelc
    accelc.export(module, example_input, "model.onnx")       # training-mode export
    report = accelc.compile("model.onnx", "art", passes=["skip"])
    result = accelc.train("art", data="synthetic", epochs=3, batch_size=64, run_dir="run")
"""
from accelc.compiler.compile import compile_model as compile  # noqa: A001
from accelc.compiler.compile import inspect_path as inspect
from accelc.compiler.errors import AccelcError
from accelc.compiler.export import export

__version__ = "0.1.0"


def train(*args, **kwargs):
    from accelc.runtime.train import train as _train
    return _train(*args, **kwargs)


__all__ = ["compile", "inspect", "export", "train", "AccelcError", "__version__"]
