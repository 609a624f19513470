"""The Backend protocol: build an artifact from an IR model, load it as a numpy-in/numpy-out runner."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import onnx_ir as ir

from slimgraph.calibration import Feeds
from slimgraph.verify import Runner


@dataclasses.dataclass
class BuiltArtifact:
    """What a backend wrote: its files (relative to the artifact root) and the options it used."""

    backend: str
    root: Path
    files: list[str]
    options: dict[str, Any]
    entry: str  # the file a runner loads, relative to root
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # facts for the manifest
    report: list[str] = dataclasses.field(default_factory=list)  # Markdown lines for report.md

    @property
    def entry_path(self) -> Path:
        return self.root / self.entry


class Backend(Protocol):
    name: str
    description: str

    def available(self) -> bool:
        """Can it run here? A missing GPU or package answers False, never raises."""

    def unavailable_reason(self) -> str | None:
        """Why ``available()`` is False, for `slimgraph backends`."""

    def buildable(self) -> bool:
        """Can it build here, even if it cannot run (code generation only)?"""

    def options(self, given: dict[str, Any]) -> dict[str, Any]:
        """The defaults updated by ``given``, every value checked; BackendError names a bad one."""

    def build(self, model: ir.Model, root: Path, options: dict[str, Any],
              feeds: Sequence[Feeds] | None = None) -> BuiltArtifact:
        """Write the backend's files under ``root`` (the artifact dir; model.onnx is already there).
        ``feeds`` are the verification inputs, for a backend whose artifact carries test data (hls:
        the testbench's samples and the C simulation); the others ignore them."""

    def load(self, built: BuiltArtifact) -> Runner:
        """A runner for the built artifact: feeds (numpy) in, outputs (numpy, graph order) out."""
