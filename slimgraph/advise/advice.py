"""advice: the request checks, ``advise`` itself and the Advice it returns (advise.json)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from slimgraph.advise.catalogue import _show, load_catalogue
from slimgraph.advise.device import BITS, Device
from slimgraph.advise.host import lent_gpu, measure_host
from slimgraph.advise.ranking import Choice, choices_for, rank
from slimgraph.advise.roofline import LayerBound, layer_bounds
from slimgraph.errors import InputSpecError
from slimgraph.model_stats import LayerMacs, layer_costs


@dataclasses.dataclass
class Advice:
    model: str
    batch: int
    slo_ms: float | None
    ranked: list[Choice]
    layers: dict[str, list[LayerBound]]  # "device/precision" -> bounds, for the plot
    costs: list[LayerMacs]
    # This CPU at fp32, per node: onnxruntime's profiler (graph optimisations off, so every node
    # runs as itself) beside the node's bound; empty without a measurement.
    host_layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def below_bound(self) -> list[dict[str, Any]]:
        """Layers measured faster than their bound: each one says the bound is wrong."""
        return [r for r in self.host_layers
                if r["measured_ms"] is not None and r["measured_ms"] < r["bound_ms"]]

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "batch": self.batch, "slo_ms": self.slo_ms,
                "ranking": [c.to_json(self.slo_ms) for c in self.ranked],
                "layers": [c.to_json() for c in self.costs], "host_layers": self.host_layers,
                "host_layers_below_bound": len(self.below_bound)}

    def dumps(self) -> str:
        """advise.json's text: strict JSON, so a NaN or an infinity raises instead of being written."""
        return json.dumps(self.to_json(), indent=2, sort_keys=True, allow_nan=False) + "\n"



def check_request(batch: Any, slo_ms: Any, precisions: list[str] | None) -> list[str]:
    """Refuse a batch below 1, an SLO that is not a finite number of ms > 0, or an unknown
    precision; the precisions asked (all four when none are), each once."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputSpecError(f"advise: batch must be an integer >= 1, got {_show(batch)}")
    if slo_ms is not None and (isinstance(slo_ms, bool) or not isinstance(slo_ms, (int, float))
                               or not math.isfinite(slo_ms) or slo_ms <= 0):
        raise InputSpecError(f"advise: slo_ms must be a finite number of milliseconds > 0, "
                             f"got {_show(slo_ms)}")
    for p in precisions or ():
        if not isinstance(p, str) or p not in BITS:
            raise InputSpecError(f"advise: unknown precision {_show(p)}; valid: {', '.join(BITS)}")
    return list(dict.fromkeys(precisions or BITS))


def advise(model: Any, *, batch: int = 1, slo_ms: float | None = None,
           precisions: list[str] | None = None, devices: str | Path | None = None,
           measure: bool = True, repeat: int = 50) -> Advice:
    """Rank every catalogue device and precision for ``model`` (anything ``slimgraph.load``
    takes, or an artifact directory) at ``batch``; measure fp32 here unless ``measure=False``."""
    import onnx_ir as ir

    import slimgraph
    from slimgraph.calibration import stack_feeds

    precisions = check_request(batch, slo_ms, precisions)
    catalogue = load_catalogue(devices)  # before the model: a bad catalogue fails fast
    path = Path(str(model)) if isinstance(model, (str, Path)) else None
    if path is not None and path.is_dir() and (path / "manifest.json").exists():
        model = path / "model.onnx"
    loaded = slimgraph.load(model)
    ir.passes.common.ShapeInferencePass()(loaded.model)
    costs = layer_costs(loaded.model, batch)
    measured, host_layers = {}, []
    here = next((d for d in catalogue if d.here), None)
    if measure and here is not None and "fp32" in precisions and loaded.calibration:
        feeds = list(loaded.calibration)
        feed = stack_feeds([feeds[i % len(feeds)] for i in range(batch)])
        model_bytes = ir.to_proto(loaded.model).SerializeToString()
        measured[(here.name, "fp32")] = measure_host(model_bytes, feed, repeat)
        host_layers = _host_layers(model_bytes, feed, costs, here, repeat)
        gpu = lent_gpu(catalogue)
        if gpu is not None:
            measured[(gpu.name, "fp32")] = measure_host(model_bytes, feed, repeat,
                                                        ["CUDAExecutionProvider"])
    ranked = rank(choices_for(costs, catalogue, precisions, batch, measured), slo_ms)
    layers = {}
    for c in ranked[:3] + [c for c in ranked if c.device.here]:
        key = f"{c.device.name} / {c.precision}"
        layers.setdefault(key, layer_bounds(costs, c.device, c.precision))
    return Advice(loaded.source.get("name", str(model)), batch, slo_ms, ranked, layers, costs,
                  host_layers)


def _host_layers(model_bytes: bytes, feed: dict[str, np.ndarray], costs: list[LayerMacs],
                 here: Device, runs: int) -> list[dict[str, Any]]:
    from slimgraph.backends.ort import kernel_time_by_node

    per_node = kernel_time_by_node(model_bytes, feed, runs,
                                   {"graph_optimization_level": "disabled"})
    rows = []
    for bound in layer_bounds(costs, here, "fp32"):
        us = per_node.get(bound.node)
        rows.append({"node": bound.node, "op_type": bound.op_type,
                     "bound_ms": bound.seconds * 1e3, "bound_by": bound.bound_by,
                     "measured_ms": None if us is None else us / 1e3,
                     "efficiency": (bound.seconds * 1e6 / us) if us else None})
    return rows
