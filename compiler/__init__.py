"""accelc.compiler: load and check models, build ORT training artifacts, the shared graph view,
the pass manager, cost accounting and the ``accelc`` command line."""
import os as _os
import warnings as _warnings

# ORT prints INFO lines for every graph transformer unless told otherwise.
_os.environ.setdefault("ORT_LOGGING_LEVEL", "3")
_warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")

from .errors import AccelcError  # noqa: E402

__all__ = ["AccelcError"]
