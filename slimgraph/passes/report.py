"""The record every pass fills in; it ends up in manifest.json and report.md."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class PassReport:
    """What one pass did: counts of what it changed and the weight bytes before/after."""

    name: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    modified: bool = False
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    nodes_before: int = 0
    nodes_after: int = 0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    seconds: float = 0.0
    timing: dict[str, float] = dataclasses.field(default_factory=dict)  # kept out of the manifest
    curve: list[dict[str, float]] = dataclasses.field(default_factory=list)  # heal: score by step;
    # has seconds: kept out of the manifest (the steps and scores are in the notes)
    notes: list[str] = dataclasses.field(default_factory=list)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
