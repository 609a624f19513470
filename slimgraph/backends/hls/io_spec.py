"""How the top function's raw integers map to the model's float input and output (``io.json``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.backends.hls import reference
from slimgraph.backends.hls.lower import Format, Lowered, Tensor


def _format_json(tensor: Tensor, layout: str) -> dict[str, Any]:
    fmt = tensor.fmt
    return {"shape": list(tensor.shape), "layout": layout, "bits": fmt.bits, "signed": fmt.signed,
            "scale": fmt.scale.tolist(), "zero_point": fmt.zero_point}


def io_spec(model: ir.Model, lowered: Lowered) -> dict[str, Any]:
    """How the top function's raw integers map to the model's float input and output."""
    def layout(tensor: Tensor) -> str:
        if len(tensor.shape) != 3:
            return "N"
        return "HWC" if lowered.stream else "CHW"

    spec = {}
    for key, tensor, value in (("input", lowered.inputs[0], model.graph.inputs[0]),
                               ("output", lowered.outputs[0], model.graph.outputs[0])):
        spec[key] = {"name": value.name, **_format_json(tensor, layout(tensor))}
    return spec


def _fmt(spec: dict[str, Any]) -> Format:
    return Format(spec["bits"], spec["signed"], np.asarray(spec["scale"], np.float64),
                  spec["zero_point"])


def to_device(spec: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """A float feed [batch, ...] -> raw integers in the order the top function reads them."""
    raw = reference.quantize_input(np.asarray(x).reshape(len(x), *spec["shape"]), _fmt(spec))
    if spec["layout"] == "HWC":
        raw = raw.transpose(0, 2, 3, 1)
    return raw.reshape(len(raw), -1)


def from_device(spec: dict[str, Any], raw: np.ndarray) -> np.ndarray:
    shape = spec["shape"]
    if spec["layout"] == "HWC":
        raw = raw.reshape(len(raw), shape[1], shape[2], shape[0]).transpose(0, 3, 1, 2)
    return reference.dequantize_output(raw.reshape(len(raw), *shape), _fmt(spec))
