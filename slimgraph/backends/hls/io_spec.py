"""How the top function's raw integers map to the model's float input and output (``io.json``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.backends.hls import reference
from slimgraph.backends.hls.layers import Format, Tensor
from slimgraph.backends.hls.layout import from_hwc, layout_name, to_hwc
from slimgraph.backends.hls.lower import Lowered


def _format_json(tensor: Tensor, layout: str) -> dict[str, Any]:
    fmt = tensor.fmt
    return {"shape": list(tensor.shape), "layout": layout, "bits": fmt.bits, "signed": fmt.signed,
            "scale": fmt.scale.tolist(), "zero_point": fmt.zero_point}


def io_spec(model: ir.Model, lowered: Lowered) -> dict[str, Any]:
    """How the top function's raw integers map to the model's float input and output."""
    spec = {}
    for key, tensor, value in (("input", lowered.inputs[0], model.graph.inputs[0]),
                               ("output", lowered.outputs[0], model.graph.outputs[0])):
        spec[key] = {"name": value.name,
                     **_format_json(tensor, layout_name(tensor.shape, lowered.stream))}
    return spec


def _fmt(spec: dict[str, Any]) -> Format:
    return Format(spec["bits"], spec["signed"], np.asarray(spec["scale"], np.float64),
                  spec["zero_point"])


def to_device(spec: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """A float feed [batch, ...] -> raw integers in the order the top function reads them."""
    raw = reference.quantize_input(np.asarray(x).reshape(len(x), *spec["shape"]), _fmt(spec))
    if spec["layout"] == "HWC":
        raw = to_hwc(raw)
    return raw.reshape(len(raw), -1)


def from_device(spec: dict[str, Any], raw: np.ndarray) -> np.ndarray:
    shape = spec["shape"]
    if spec["layout"] == "HWC":
        raw = from_hwc(raw, shape)
    return reference.dequantize_output(raw.reshape(len(raw), *shape), _fmt(spec))
