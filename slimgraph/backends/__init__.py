"""The backend registry (listed by hand) and the spec parser for `--backend name[:opt=v,...]`."""

from __future__ import annotations

import math
import re
from typing import Any

from slimgraph.backends.base import Backend, BuiltArtifact
from slimgraph.backends.hls import HLS
from slimgraph.backends.ort import ORT_CPU, ORT_CUDA
from slimgraph.backends.tvm import TVM_CUDA, TVM_LLVM
from slimgraph.errors import BackendError

BACKENDS: dict[str, Backend] = {b.name: b for b in (ORT_CPU, ORT_CUDA, TVM_LLVM, TVM_CUDA, HLS)}


def get_backend(name: str) -> Backend:
    backend = BACKENDS.get(name)
    if backend is None:
        raise BackendError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    return backend


def parse_backend_spec(spec: str) -> tuple[Backend, dict[str, Any]]:
    """``ort-cpu:intra_op_num_threads=2`` -> (backend, {"intra_op_num_threads": 2}).

    A comma inside angle brackets belongs to the value (``hls:precision=ap_fixed<16,6>``). The
    options are checked by the backend's ``options()`` here, at the edge.
    """
    name, _, rest = spec.partition(":")
    backend = get_backend(name.strip())
    options: dict[str, Any] = {}
    for token in filter(None, (t.strip() for t in re.split(r",(?![^<]*>)", rest))):
        key, eq, value = token.partition("=")
        if not eq:
            raise BackendError(f"backend {name!r}: option {token!r} needs key=value")
        options[key.strip()] = _parse_value(name, key.strip(), value.strip())
    backend.options(options)  # every value checked here, before a model is loaded
    return backend, options


def _parse_value(backend: str, key: str, text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            value = cast(text)
        except ValueError:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise BackendError(f"backend {backend!r}: option {key}={text!r} is not a finite number")
        return value
    return text


__all__ = ["BACKENDS", "Backend", "BuiltArtifact", "get_backend", "parse_backend_spec"]
