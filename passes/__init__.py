"""accelc.passes: one module per pass, each registered with the pass manager on import."""
