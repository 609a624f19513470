"""The rows of a bench run: one per (variant, backend, batch), their ratios to fp32 and the flags
users get burned by, in report order."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slimgraph.passes import Pipeline
from slimgraph.timing import Latency

FP32 = "fp32"


@dataclasses.dataclass
class Row:
    """One (variant, backend, batch) measurement. ``status`` is ok, skipped or failed."""

    variant: str
    backend: str
    batch: int
    status: str = "ok"
    reason: str | None = None
    peer: bool = False  # a baseline we compare against (torch, onnxruntime's quantizers)
    build_s: float | None = None
    latency: Latency | None = None
    throughput: float | None = None  # samples/s at p50
    ratio_to_fp32: float | None = None  # p50 / fp32 p50, same backend and batch
    artifact_bytes: int | None = None
    peak_memory_mb: float | None = None
    cosine: float | None = None
    max_abs_err: float | None = None
    top1_agreement: float | None = None
    task_accuracy: float | None = None
    workers: int = 1
    workers_throughput: float | None = None
    workers_scaling: float | None = None
    flags: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class BenchResult:
    model: str
    rows: list[Row]
    machine: dict[str, Any]
    settings: dict[str, Any]
    out: Path

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "machine": self.machine, "settings": self.settings,
                "rows": [dataclasses.asdict(r) for r in self.rows]}


ACCURACY_SLACK = 0.01  # task accuracy this far below fp32 still counts as "the same accuracy"


def _ratios_and_flags(rows: list[Row], pipelines: dict[str, Pipeline]) -> None:
    """Ratio to fp32 on the same backend and batch (peers: to slimgraph's ort-cpu fp32), flags."""
    fp32 = {(r.backend, r.batch): r for r in rows if r.variant == FP32 and r.latency and not r.peer}
    for r in rows:
        if r.latency is None:
            continue
        base = fp32.get(("ort-cpu" if r.peer else r.backend, r.batch))
        if base is not None and base is not r:
            r.ratio_to_fp32 = r.latency.p50_ms / base.latency.p50_ms
        pipeline = pipelines.get(r.variant)
        modes = ["int8"] if r.variant.startswith("ort-quantize") else [
            str(getattr(p, "mode", "")) for p in (pipeline.passes if pipeline else ())
            if p.name == "quantize"]
        if r.ratio_to_fp32 is not None and r.ratio_to_fp32 >= 1.0 and modes:
            r.flags.append(f"{'+'.join(modes)} not faster than fp32 ({r.ratio_to_fp32:.2f}x)")
        pruned = pipeline is not None and any(p.name.startswith("prune") for p in pipeline.passes)
        if r.ratio_to_fp32 is not None and r.ratio_to_fp32 >= 0.95 and pruned:
            r.flags.append(f"pruned but not faster ({r.ratio_to_fp32:.2f}x)")
        # Where labels score the task, a model that was trained (heal) is judged by its accuracy:
        # its logits may move while it classifies as well. Elsewhere, by agreement with fp32.
        base_acc = base.task_accuracy if base is not None else None
        if r.task_accuracy is not None and base_acc is not None:
            if r.task_accuracy < base_acc - ACCURACY_SLACK:
                r.flags.append(f"task accuracy {100 * (base_acc - r.task_accuracy):.1f} pt below "
                               f"fp32 ({r.task_accuracy:.4f})")
        elif r.cosine is not None and r.cosine < 0.99:
            r.flags.append(f"outputs diverge from fp32 (cosine {r.cosine:.4f})")


def _sorted(rows: list[Row], variants: Sequence[str]) -> list[Row]:
    order = {v: i for i, v in enumerate(variants)}
    return sorted(rows, key=lambda r: (r.batch, r.peer, order.get(r.variant, len(order)),
                                       r.variant, r.backend))
