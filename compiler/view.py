"""``accelc view``: serve a model in Netron, bound to 127.0.0.1 only."""

from __future__ import annotations

import time
from pathlib import Path

from .errors import AccelcError

HOST = "127.0.0.1"


def resolve_model(path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "training_model.onnx"
    if not p.is_file():
        raise AccelcError(f"'{path}': no ONNX model to view")
    return p


def serve(path, port: int = 8080, block: bool = True, browse: bool = False):
    import netron  # heavy: loaded when a model is served

    if not (0 < port < 65536):
        raise AccelcError(f"--port must be in 1..65535, got {port}")
    p = resolve_model(path)
    try:
        address = netron.serve(str(p), None, (HOST, port), browse=browse)
    except OSError as e:
        raise AccelcError(f"cannot serve on {HOST}:{port}: {e.strerror or e}") from None
    print(f"Netron serving {p.name} at http://{HOST}:{port}/", flush=True)
    if block:
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            netron.stop(address)
    return address
