"""Verification: run an artifact and the float reference on the same inputs and compare outputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from slimgraph.calibration import Feeds
from slimgraph.tolerance import Tolerance

Runner = Callable[[Feeds], list[np.ndarray]]


@dataclasses.dataclass
class OutputMetrics:
    """Agreement of one output over all verification samples."""

    name: str
    max_abs_err: float
    max_rel_err: float  # max |out - ref| / max |ref|: error relative to the output's scale
    cosine: float  # of the flattened outputs
    top1_agreement: float | None  # argmax over the last axis, for [N, C>1] outputs


@dataclasses.dataclass
class VerificationResult:
    backend: str
    passed: bool
    samples: int
    tolerance: Tolerance
    outputs: list[OutputMetrics]
    failures: list[str]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compare_outputs(
    names: Sequence[str],
    reference: Sequence[Sequence[np.ndarray]],
    actual: Sequence[Sequence[np.ndarray]],
) -> list[OutputMetrics]:
    """Metrics per output over batches: ``reference[b][i]`` is output ``i`` of batch ``b``."""
    metrics = []
    for i, name in enumerate(names):
        ref = [np.asarray(batch[i]) for batch in reference]
        out = [np.asarray(batch[i]) for batch in actual]
        for r, o in zip(ref, out, strict=True):
            if r.shape != o.shape:
                raise ValueError(f"output {name!r}: shape {o.shape} != reference {r.shape}")
        metrics.append(_metrics(name, ref, out))
    return metrics


def _metrics(name: str, ref: list[np.ndarray], out: list[np.ndarray]) -> OutputMetrics:
    if ref and not np.issubdtype(ref[0].dtype, np.number) and ref[0].dtype != np.bool_:
        equal = all(np.array_equal(r, o) for r, o in zip(ref, out, strict=True))
        return OutputMetrics(name, 0.0 if equal else float("inf"), 0.0 if equal else 1.0,
                             1.0 if equal else 0.0, None)
    r = np.concatenate([x.astype(np.float64).ravel() for x in ref]) if ref else np.zeros(0)
    o = np.concatenate([x.astype(np.float64).ravel() for x in out]) if out else np.zeros(0)
    if r.size == 0:
        return OutputMetrics(name, 0.0, 0.0, 1.0, None)
    finite = np.isfinite(r) & np.isfinite(o)
    same_nonfinite = np.array_equal(r[~finite], o[~finite], equal_nan=True)
    diff = np.abs(r[finite] - o[finite])
    max_abs = float(diff.max()) if diff.size else 0.0
    if not same_nonfinite:
        max_abs = float("inf")
    scale = float(np.abs(r[finite]).max()) if finite.any() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    nr, no = np.linalg.norm(r[finite]), np.linalg.norm(o[finite])
    if nr == 0 and no == 0:
        cosine = 1.0
    elif nr == 0 or no == 0:
        cosine = 0.0
    else:
        cosine = float(np.dot(r[finite], o[finite]) / (nr * no))
    top1 = None
    if ref[0].ndim == 2 and ref[0].shape[1] > 1:
        agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ref, out, strict=True))
        top1 = agree / sum(a.shape[0] for a in ref)
    return OutputMetrics(name, max_abs, max_rel, min(cosine, 1.0), top1)


def verify(
    backend: str,
    run: Runner,
    reference: Runner,
    feeds: Sequence[Feeds],
    output_names: Sequence[str],
    tolerance: Tolerance,
    *,
    check_top1: bool = False,
) -> VerificationResult:
    """Run ``run`` and ``reference`` on every feed and check each output against ``tolerance``.

    Top-1 agreement is recorded for every [N, C] output but only enforced where ``check_top1``
    (classification models): an embedding's argmax is not a task-level fact.
    """
    ref = [reference(f) for f in feeds]
    got = [run(f) for f in feeds]
    for r, g in zip(ref, got, strict=True):
        if len(r) != len(g):
            raise ValueError(f"{backend}: {len(g)} outputs but the reference has {len(r)}")
    metrics = compare_outputs(output_names, ref, got)
    failures = check_metrics(metrics, tolerance, check_top1)
    samples = sum(batch_size(f) for f in feeds)
    return VerificationResult(backend, not failures, samples, tolerance, metrics, failures)


def check_metrics(metrics: Sequence[OutputMetrics], tolerance: Tolerance,
                  check_top1: bool = False) -> list[str]:
    """One line per output metric outside ``tolerance`` (none when all hold)."""
    failures = []
    for m in metrics:
        if m.max_rel_err > tolerance.max_rel_err:
            failures.append(
                f"output {m.name!r}: max relative error {m.max_rel_err:.3g} "
                f"(max abs {m.max_abs_err:.3g}) exceeds {tolerance.max_rel_err:g}"
            )
        if m.cosine < tolerance.min_cosine:
            failures.append(
                f"output {m.name!r}: cosine {m.cosine:.6f} below {tolerance.min_cosine:g}"
            )
        if check_top1 and m.top1_agreement is not None and m.top1_agreement < tolerance.min_top1:
            failures.append(
                f"output {m.name!r}: top-1 agreement {m.top1_agreement:.4f} below "
                f"{tolerance.min_top1:g}"
            )
    return failures


def batch_size(feed: Feeds) -> int:
    """Samples in a feed: axis 0 of its first array (1 for a scalar)."""
    first = next(iter(feed.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim > 0 else 1
