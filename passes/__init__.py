"""accelc.passes: one module per pass, each registered with the pass manager on import."""
from . import opt  # noqa: F401,E402  (first: runs by default before the user's passes)
from . import skip  # noqa: F401,E402
from . import rescale  # noqa: F401,E402
from . import reuse  # noqa: F401,E402
