"""accelc.runtime: run any compiled artifact set on ORT Training — the engine, the segmented
executor and its node-kernel registry, training-time algorithms and their schedule, the training
loop, data, checkpoints. Knows no pass by name: passes register what they need.
"""
