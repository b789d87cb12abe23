"""accelc — an ONNX training-graph rewriting compiler for cheaper CNN training on ORT Training.

Python API (the CLI is a thin layer over these)::

    import accelc
    accelc.export(module, example_input, "model.onnx")       # training-mode export
    report = accelc.compile("model.onnx", "art", passes=["skip"])
    result = accelc.train("art", data="synthetic", epochs=3, batch_size=64, run_dir="run")

Layers (checked by import-linter in CI): ``accelc.compiler`` <- ``accelc.runtime`` <-
``accelc.passes`` (one package per method) <- this facade (``accelc.api``, ``accelc.cli``,
``accelc.bench``). Importing ``accelc`` loads neither torch nor ONNX Runtime.
"""

from . import _startup

_startup.install()  # the command line: a Ctrl-C during these imports is one line, exit 130 (see _startup)

from .api import Method, compile, export, export_run, inspect, install, installed, train, uninstall  # noqa: A004,E402
from .compiler.compile import VERSION as __version__  # noqa: E402
from .compiler.errors import AccelcError  # noqa: E402

__all__ = [
    "compile",
    "inspect",
    "export",
    "export_run",
    "train",
    "Method",
    "install",
    "installed",
    "uninstall",
    "AccelcError",
    "__version__",
]
