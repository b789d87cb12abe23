"""User-facing errors.

Every error a user can cause is an :class:`AccelcError`: the CLI prints its message as one line
on stderr and exits with code 2; the Python API raises the same error with the same message.
"""

from __future__ import annotations

import re


class AccelcError(Exception):
    """An error caused by the user's input; shown as one line, exit code 2."""


def ort_message(e: BaseException, limit: int = 300) -> str:
    """The human part of an ORT exception (drop source paths and C++ signatures)."""
    text = " ".join(str(e).split()) or type(e).__name__
    text = re.sub(r"/onnxruntime_src/\S+", "", text)
    for marker in ("Failed to load model with error:", "[ONNXRuntimeError] :"):
        if marker in text:
            text = text.rsplit(marker, 1)[-1]
    if ") " in text and "::" in text:
        tail = text.rsplit(") ", 1)[-1].strip()
        # a bare assertion tail ("was false.") says nothing: keep the condition that failed
        text = tail if len(tail) > 20 else text.rsplit("::", 1)[-1]
    return text.strip()[:limit]
