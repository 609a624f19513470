"""Calibration statistics of float activations, gathered by running the float model in onnxruntime.

Ranges per tensor (min/max, a percentile, or the min-KL clip) for static int8, and per-channel
maxima for SmoothQuant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from slimgraph.backends.ort import inputs_of, probe_session
from slimgraph.calibration import Feeds

HISTOGRAM_BINS = 2048


@dataclasses.dataclass
class _Histogram:
    low: float
    high: float
    counts: np.ndarray


def collect_ranges(
    model: ir.Model, names: Sequence[str], feeds: Iterable[Feeds], method: str = "minmax",
    percentile: float = 99.999,
) -> dict[str, tuple[float, float]]:
    """Ranges of the named float values over ``feeds``: min/max, a percentile, or min-KL clip."""
    session, outputs = probe_session(model, names)
    feeds = list(feeds)
    lows = dict.fromkeys(outputs, np.inf)
    highs = dict.fromkeys(outputs, -np.inf)
    for feed in feeds:
        for name, array in zip(outputs, session.run(outputs, inputs_of(session, feed)), strict=True):
            if array.size:
                lows[name] = min(lows[name], float(array.min()))
                highs[name] = max(highs[name], float(array.max()))
    ranges = {n: (lows[n], highs[n]) for n in outputs if np.isfinite(lows[n])}
    if method == "minmax":
        return ranges
    histograms = {n: _Histogram(lo, hi, np.zeros(HISTOGRAM_BINS)) for n, (lo, hi) in ranges.items()}
    for feed in feeds:
        for name, array in zip(outputs, session.run(outputs, inputs_of(session, feed)), strict=True):
            hist = histograms.get(name)
            if hist is not None and hist.high > hist.low:
                hist.counts += np.histogram(array, HISTOGRAM_BINS, (hist.low, hist.high))[0]
    clip = {"percentile": _percentile_range, "entropy": _entropy_range, "mse": _mse_range}[method]
    return {n: clip(h, percentile) if h.high > h.low else ranges[n] for n, h in histograms.items()}


def _percentile_range(hist: _Histogram, percentile: float) -> tuple[float, float]:
    """Drop (100 - p)% of the mass, half from each tail (none from a tail at 0)."""
    cdf = np.cumsum(hist.counts) / hist.counts.sum()
    edges = np.linspace(hist.low, hist.high, HISTOGRAM_BINS + 1)
    tail = (100.0 - percentile) / 100.0 / 2
    low = hist.low if hist.low >= 0 else edges[int(np.searchsorted(cdf, tail))]
    high = hist.high if hist.high <= 0 else edges[int(np.searchsorted(cdf, 1 - tail)) + 1]
    return float(low), float(high)


MSE_SHRINKS = np.linspace(1.0, 0.2, 81)  # candidate clips, as fractions of the observed range


def _mse_range(hist: _Histogram, _: float) -> tuple[float, float]:
    """The clip of the observed range (both ends shrunk by one factor) whose 8-bit quantization
    has the least expected squared error: rounding noise ``step^2 / 12`` over the mass inside,
    plus each clipped value's distance to the bound."""
    edges = np.linspace(hist.low, hist.high, HISTOGRAM_BINS + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    p = hist.counts / hist.counts.sum()
    best, best_err = (hist.low, hist.high), np.inf
    for f in MSE_SHRINKS:
        low, high = min(hist.low * f, 0.0), max(hist.high * f, 0.0)
        step = (high - low) / 255
        clipped = np.clip(centers, low, high)
        inside = p[(centers >= low) & (centers <= high)].sum()
        err = inside * step * step / 12 + float(p @ (centers - clipped) ** 2)
        if err < best_err:
            best, best_err = (float(low), float(high)), err
    return best


def _entropy_range(hist: _Histogram, _: float, step: int = 8) -> tuple[float, float]:
    """Clip |x| at the threshold whose quantization keeps KL(P || Q) smallest (TensorRT's method).

    P is the histogram up to the threshold with the tail folded into its last bin; Q merges P's
    unclipped bins into as many levels as the int8 side has (256 for a one-sided range, else 128)
    and spreads each level evenly over the bins where P is non-zero.
    """
    edges = np.linspace(hist.low, hist.high, HISTOGRAM_BINS + 1)
    centers = np.abs((edges[:-1] + edges[1:]) / 2)
    amax = max(abs(hist.low), abs(hist.high))
    folded = np.histogram(centers, HISTOGRAM_BINS, (0, amax), weights=hist.counts)[0]
    levels = 256 if hist.low >= 0 or hist.high <= 0 else 128
    if levels == 256:
        # A Relu output's spike at 0 is exact at any threshold (0 is the zero point) but would
        # dominate the divergence and pull the threshold far in.
        folded[0] = 0
    best, best_kl = HISTOGRAM_BINS, np.inf
    for i in range(levels, HISTOGRAM_BINS + 1, step):
        sliced = folded[:i]
        p = sliced.copy()
        p[-1] += folded[i:].sum()
        starts = (np.arange(levels) * i) // levels
        nonzero = p > 0
        per_level = np.add.reduceat(sliced, starts) / np.maximum(np.add.reduceat(nonzero, starts), 1)
        q = np.repeat(per_level, np.diff(np.append(starts, i))) * nonzero
        if not q.sum() or (q[nonzero] == 0).any():
            continue
        pn, qn = p[nonzero] / p.sum(), q[nonzero] / q.sum()
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best_kl:
            best, best_kl = i, kl
    threshold = best / HISTOGRAM_BINS * amax
    return max(hist.low, -threshold), min(hist.high, threshold)


def channel_absmax(model: ir.Model, names: Sequence[str], feeds: Iterable[Feeds]) -> dict[str, np.ndarray]:
    """max |x| per channel (the last axis) of each named float value over ``feeds``."""
    return channel_statistics(model, names, feeds)[0]


def channel_statistics(
    model: ir.Model, names: Sequence[str], feeds: Iterable[Feeds], sample_rows: int = 0, seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per named float value: max |x| per channel (the last axis) over ``feeds``, and up to
    ``sample_rows`` of its rows (vectors along the last axis) drawn evenly from every feed."""
    session, outputs = probe_session(model, names)
    if not outputs:  # (session.run with no output names would return every graph output)
        return {}, {}
    feeds = list(feeds)
    rng = np.random.default_rng(seed)
    per_feed = -(-sample_rows // max(len(feeds), 1))
    absmax: dict[str, np.ndarray] = {}
    rows: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    for feed in feeds:
        for name, array in zip(outputs, session.run(outputs, inputs_of(session, feed)), strict=True):
            if not array.size:
                continue
            flat = array.reshape(-1, array.shape[-1])
            m = np.abs(flat).max(axis=0)
            absmax[name] = np.maximum(absmax[name], m) if name in absmax else m
            if per_feed:
                pick = rng.choice(len(flat), size=min(per_feed, len(flat)), replace=False)
                rows[name].append(flat[np.sort(pick)].astype(np.float32))
    samples = {name: np.concatenate(r) for name, r in rows.items() if r}
    return absmax, samples
