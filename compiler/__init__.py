"""accelc.compiler: load and check models, build ORT training artifacts, the training-graph view,
the pass contract and manager, validation and cost accounting. Knows no pass by name.

Importing it changes no logging, warning or environment setting.
"""

from .errors import AccelcError

__all__ = ["AccelcError"]
