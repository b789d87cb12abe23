"""Training plan: which controllers a compiled artifact set asks for.

Passes that decide during training (skip, reuse, rescale) record their controller in
``report.json``; ``controllers_for`` builds them for ``accelc train``.
"""
from __future__ import annotations


def controllers_for(artifact_dir, session) -> list:
    return []
