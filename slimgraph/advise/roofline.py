"""roofline: each layer's time bound on a device at a precision.

Per layer (``model_stats.layer_costs``, the same counts `inspect` shows) and per device and
precision, the time bound is the slower of compute (2 operations per MAC at the device's peak for
that precision; other ops one operation per output element at the fp32 peak) and memory (the
bytes the layer moves, scaled to the precision's element size, over the bandwidth of the fastest
memory level the layer's own data fits in). Only the matrix ops (Conv, Gemm, MatMul, ...) change
precision: the backends run the rest in float. The model's bound is the sum over its layers (one
layer at a time).
"""

from __future__ import annotations

import dataclasses

from slimgraph.advise.device import BITS, Device
from slimgraph.model_stats import LayerMacs

_MATRIX = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN"})
# What each slimgraph backend runs a model in (onnxruntime's CPU kernels have no bf16/fp16 GEMM
# worth using; its CUDA provider has no bf16 path for these graphs). Other backends: every
# precision the device lists.
BACKEND_PRECISIONS = {"ort-cpu": ("fp32", "int8"), "ort-cuda": ("fp32", "fp16", "int8")}



@dataclasses.dataclass
class LayerBound:
    node: str
    op_type: str
    ops: float
    bytes: float
    seconds: float
    bound_by: str  # "compute" or the memory level

    @property
    def intensity(self) -> float:
        return self.ops / self.bytes if self.bytes else 0.0


def layer_bounds(costs: list[LayerMacs], device: Device, precision: str) -> list[LayerBound] | None:
    """Each layer's roofline time on ``device`` at ``precision``; None if the device lacks it."""
    allowed = BACKEND_PRECISIONS.get(device.backend, tuple(device.tops))
    if precision not in device.tops or precision not in allowed:
        return None
    float_peak = device.tops.get("fp32") or max(device.tops.values())
    rows = []
    for c in costs:
        matrix = c.op_type in _MATRIX and c.macs > 0
        scale = BITS[precision] / 32 if matrix else 1.0
        ops = 2.0 * c.macs if matrix else float(c.write_bytes) / 4
        moved = _traffic(c) * scale
        peak = device.tops[precision] if matrix else float_peak
        compute = ops / (peak * 1e12)
        level, bandwidth = "memory", device.memory_gbps
        # The fastest level this layer's own data fits in: its inputs were just written by the
        # layers before it, so a cache that can hold them may still hold them, and an elementwise
        # op may write over its input (onnxruntime reuses buffers), so the footprint is the
        # larger side. Optimistic on purpose: the bound must stay a lower bound.
        footprint = (2 * c.write_bytes if c.op_type in _SELECTS
                     else max(c.weight_bytes + c.read_bytes, c.write_bytes)) * scale
        for size, gbps in device.caches:
            if footprint <= size:
                level, bandwidth = f"cache {size // 1024} KiB", gbps
                break
        memory = moved / (bandwidth * 1e9)
        rows.append(LayerBound(c.node, c.op_type, ops, moved, max(compute, memory),
                               "compute" if compute >= memory else level))
    return rows


# Ops whose output is a view of their input (or only its shape): no element is read or written.
_VIEWS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Size"})
# Ops that read only the elements they write (a row of an embedding table, a slice).
_SELECTS = frozenset({"Gather", "GatherElements", "GatherND", "Slice"})


def _traffic(c: LayerMacs) -> float:
    """Bytes a layer must move: a view moves none; a selection (Gather from an embedding table,
    Slice) reads only what it writes."""
    if c.op_type in _VIEWS:
        return 0.0
    if c.op_type in _SELECTS:
        return float(2 * c.write_bytes)
    return float(c.bytes)
