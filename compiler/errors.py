"""User-facing errors.

Every error a user can cause is an :class:`AccelcError`: the CLI prints its message as one line
on stderr and exits with code 2; the Python API raises the same error with the same message.
Where Python has a natural kind for the mistake, the error is also that kind
(:class:`InvalidValue` is a ``ValueError``, :class:`InvalidType` a ``TypeError``).

Names, paths and values that came from a user's file or flag are shown through :func:`show`, so a
newline or an ANSI escape in a layer name can never split a message or reach the terminal.
"""

from __future__ import annotations

import re


class AccelcError(Exception):
    """An error caused by the user's input; shown as one line, exit code 2. The message is made
    safe for one terminal line here (see :func:`show`), so a name from a user's file that reached a
    message unescaped still cannot split it or send escapes to the terminal -- from the CLI or the
    Python API."""

    def __init__(self, *args):
        if args and isinstance(args[0], str):
            args = (show(args[0], 4000),) + args[1:]
        super().__init__(*args)


class InvalidValue(AccelcError, ValueError):
    """A value out of range or malformed (a flag, an API argument, a field of a file)."""


class InvalidType(AccelcError, TypeError):
    """An API argument of the wrong type."""


_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def show(value, limit: int = 200) -> str:
    """``value`` as text safe for one terminal line: control characters (newlines, ANSI escapes,
    bidi overrides) escaped as ``\\xNN``/``\\uNNNN``, long text cut with an ellipsis."""
    text = str(value)
    text = _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def exception_text(e: BaseException, limit: int = 300) -> str:
    """An exception's message as one safe line, never cut at a newline: a newline inside it (one in
    a node name a library quotes, say) is escaped by :func:`show`; only onnx's trailing
    ``==> Context:`` block (which repeats the node) is left out."""
    text = str(e).split("\n\n==> Context:", 1)[0].strip()
    return show(text or type(e).__name__, limit)


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
    return show(text.strip(), limit)
