"""ranking: every (device, precision) as a Choice, calibrated by measurements, cheapest first.

On this machine the model runs in onnxruntime at each precision that can be measured
(fp32); ``efficiency = bound / measured`` scales the prediction for every device of the same kind
(``predicted = bound / efficiency``). A device kind with no measurement is predicted at its bound
and says so.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from slimgraph.advise.device import BITS, Device
from slimgraph.advise.roofline import layer_bounds
from slimgraph.model_stats import LayerMacs


@dataclasses.dataclass
class Choice:
    device: Device
    precision: str
    bound_ms: float
    predicted_ms: float
    basis: str  # "measured", "calibrated on <device>", "bound only"
    batch: int
    fits: bool
    measured_ms: float | None = None
    efficiency: float | None = None

    @property
    def throughput(self) -> float | None:
        """Samples per second; None for a model whose bound is zero (no work the counts see)."""
        return self.batch / (self.predicted_ms / 1e3) if self.predicted_ms > 0 else None

    @property
    def cost_per_million(self) -> float | None:
        if self.device.price_per_hour is None:
            return None
        return self.device.price_per_hour / 3600 * self.predicted_ms / 1e3 / self.batch * 1e6

    def meets(self, slo_ms: float | None) -> bool | None:
        return None if slo_ms is None else self.predicted_ms <= slo_ms

    def to_json(self, slo_ms: float | None = None) -> dict[str, Any]:
        return {"device": self.device.name, "kind": self.device.kind,
                "backend": self.device.backend, "precision": self.precision,
                "bound_ms": self.bound_ms, "predicted_ms": self.predicted_ms,
                "measured_ms": self.measured_ms, "efficiency": self.efficiency,
                "basis": self.basis, "throughput_per_s": self.throughput,
                "cost_per_million": self.cost_per_million, "fits_memory": self.fits,
                "meets_slo": self.meets(slo_ms), "price_source": self.device.price_source,
                "source": self.device.source, "checked": self.device.checked}


def footprint_bytes(costs: list[LayerMacs], precision: str) -> float:
    """Weights at ``precision`` plus the largest layer's activations (a lower bound on memory)."""
    scale = BITS[precision] / 32
    return sum(c.weight_bytes for c in costs) * scale + max(
        (c.read_bytes + c.write_bytes for c in costs), default=0)


def rank(choices: list[Choice], slo_ms: float | None) -> list[Choice]:
    """Those that fit and meet the SLO first, each group cheapest first (unpriced last)."""
    def key(c: Choice):
        cost = c.cost_per_million
        return (not c.fits, c.meets(slo_ms) is False, cost is None, cost or 0.0, c.predicted_ms)

    return sorted(choices, key=key)


def choices_for(costs: list[LayerMacs], devices: list[Device], precisions: list[str], batch: int,
                measured: dict[tuple[str, str], float] | None = None) -> list[Choice]:
    """Every (device, precision) the device supports, bounded, then calibrated by ``measured``
    ({(device name, precision): ms}) where measured, and scaled by that kind's efficiency where not."""
    measured = measured or {}
    out = []
    for device in devices:
        for precision in precisions:
            bounds = layer_bounds(costs, device, precision)
            if bounds is None:
                continue
            bound_ms = sum(b.seconds for b in bounds) * 1e3
            fits = footprint_bytes(costs, precision) <= device.memory_gb * 1e9
            out.append(Choice(device, precision, bound_ms, bound_ms, "bound only", batch, fits))
    efficiencies: dict[str, tuple[float, str]] = {}
    for c in out:
        ms = measured.get((c.device.name, c.precision))
        if ms is not None:
            c.measured_ms, c.predicted_ms, c.basis = ms, ms, "measured"
            c.efficiency = c.bound_ms / ms
            if c.efficiency > 0:  # a zero bound scales nothing
                efficiencies.setdefault(c.device.kind, (c.efficiency, c.device.name))
    for c in out:
        if c.basis == "bound only" and c.device.kind in efficiencies:
            efficiency, where = efficiencies[c.device.kind]
            c.efficiency = efficiency
            c.predicted_ms = c.bound_ms / efficiency
            c.basis = f"scaled by {where}"
    return out
