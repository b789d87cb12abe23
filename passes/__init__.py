"""accelc.passes: one module per pass, each registered with the pass manager on import."""
from . import skip  # noqa: F401,E402
from . import rescale  # noqa: F401,E402
