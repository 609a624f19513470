"""device: a catalogue entry, the precisions it is rated at, and a CPU's peaks from its family."""

from __future__ import annotations

import dataclasses
from typing import Any

BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8}


@dataclasses.dataclass
class Device:
    """One catalogue entry: peaks in tera-operations/s per precision, bandwidth in GB/s."""

    name: str
    kind: str
    backend: str
    tops: dict[str, float]
    memory_gbps: float
    memory_gb: float
    price_per_hour: float | None
    source: str
    price_source: str = ""
    checked: bool = False
    caches: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (bytes, GB/s)
    here: bool = False  # the machine advise runs on
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def _cpu_tops(family: dict, cores: int, ghz: float) -> dict[str, float]:
    return {p: cores * ghz * ops / 1e3 for p, ops in family["ops_per_cycle"].items()}
