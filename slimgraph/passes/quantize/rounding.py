"""rounding: int8 weights rounded to what the layer computes, not weight by weight (GPTQ), and
biases corrected for the mean error that rounding leaves (bias correction).

Rounding every weight to its nearest level (RTN) minimises ``||W - s W_q||``, but what matters is
the layer's output on real inputs, ``||(W - s W_q) X||``. On a trained mobile CNN that difference
is large: EfficientNet-Lite1 with RTN int8 weights alone (activations float) keeps 0.84 top-1
agreement with the float model over 256 photo crops.

GPTQ (Frantar et al., ICLR'23; the Optimal Brain Surgeon update of Hassibi & Stork) rounds the
columns of W [M, K] one at a time and spreads each column's rounding error over the columns not
yet rounded, weighted by the inverse of ``H = E[x x^T]``, the second moment of the layer's
inputs x (K-vectors: im2col patches for a convolution, one per group). The scales stay the
per-channel ``max|W_c| / Q`` of RTN; only which integer each weight gets changes, so the stored
format, the onnxruntime kernels and the heal pass see nothing new. ``H`` is damped by 1% of its
mean diagonal; an input channel that is never non-zero in calibration gets a unit diagonal.

Bias correction (Nagel et al., ICCV'19): the rounding error shifts the mean of each output channel
by ``(W - s W_q) E[x]``; adding that to the bias removes it (layers that have a constant bias).

Statistics come from one pass of the float model over the calibration samples; at most
``SAMPLE_ROWS`` input vectors per layer and sample enter ``H`` (drawn evenly, seeded).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from slimgraph.backends.ort import inputs_of, probe_session
from slimgraph.calibration import Feeds
from slimgraph.passes.quantize.layers import layer_ids, weight_axis

SAMPLE_ROWS = 2048
DAMPING = 0.01
BLOCK = 128  # columns rounded between two matrix-multiply updates of the rest (GPTQ's lazy batch)
ROUNDINGS = ("gptq", "nearest")


@dataclasses.dataclass
class InputStatistics:
    """Second moment and mean of a layer's input vectors, one [K, K] / [K] per group."""

    second_moment: np.ndarray  # [G, K, K], sum over rows
    total: np.ndarray  # [G, K], sum over rows
    rows: int = 0
    rounded: dict = dataclasses.field(default_factory=dict)  # round_layer's results by scales

    def add(self, vectors: np.ndarray) -> None:
        """``vectors`` [R, G, K]."""
        v = np.ascontiguousarray(vectors.transpose(1, 2, 0), dtype=np.float32)  # [G, K, R]
        self.second_moment += np.matmul(v, v.transpose(0, 2, 1))
        self.total += v.sum(axis=2, dtype=np.float64)
        self.rows += vectors.shape[0]

    @property
    def hessian(self) -> np.ndarray:
        return self.second_moment / max(self.rows, 1)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.rows, 1)


def _conv_geometry(node: ir.Node, weight: np.ndarray) -> dict | None:
    """Strides, dilations, pads and groups of a 2-D Conv with explicit pads, else None."""
    if weight.ndim != 4 or node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
        return None
    ints = node.attributes.get_ints
    return {
        "strides": tuple(ints("strides", [1, 1])),
        "dilations": tuple(ints("dilations", [1, 1])),
        "pads": tuple(ints("pads", [0, 0, 0, 0])),
        "group": node.attributes.get_int("group", 1),
        "kernel": weight.shape[2:],
    }


def input_vectors(x: np.ndarray, node: ir.Node, weight: np.ndarray, rows: int,
                  rng: np.random.Generator) -> np.ndarray | None:
    """Up to ``rows`` input vectors [R, G, K] of ``node`` from its input activation ``x``: the
    im2col patches of a 2-D Conv (grouped as its weight is), the last axis of a Gemm / MatMul."""
    if node.op_type != "Conv":
        return _pick_rows(x.reshape(-1, x.shape[-1]), rows, rng)[:, None, :]
    geometry = _conv_geometry(node, weight)
    if geometry is None or x.ndim != 4:
        return None
    (sh, sw), (dh, dw) = geometry["strides"], geometry["dilations"]
    top, left, bottom, right = geometry["pads"]
    kh, kw = geometry["kernel"]
    group = geometry["group"]
    if (kh, kw) == (1, 1) and not any(geometry["pads"]):  # pointwise: pixels are the vectors
        pixels = np.moveaxis(x[:, :, ::sh, ::sw], 1, -1).reshape(-1, x.shape[1])
        return _pick_rows(pixels, rows, rng).reshape(-1, group, x.shape[1] // group)
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    out_h = (padded.shape[2] - span_h) // sh + 1
    out_w = (padded.shape[3] - span_w) // sw + 1
    count = x.shape[0] * out_h * out_w
    pick = np.sort(rng.choice(count, size=min(rows, count), replace=False))
    n, rest = np.divmod(pick, out_h * out_w)
    i, j = np.divmod(rest, out_w)
    di, dj = np.meshgrid(np.arange(kh) * dh, np.arange(kw) * dw, indexing="ij")
    rows_idx = (i * sh)[:, None, None] + di[None]
    cols_idx = (j * sw)[:, None, None] + dj[None]
    # [R, C, kh, kw]
    patches = padded[n[:, None, None, None], np.arange(x.shape[1])[None, :, None, None],
                     rows_idx[:, None], cols_idx[:, None]]
    return patches.reshape(len(pick), group, -1)


def _pick_rows(flat: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    if len(flat) <= rows:
        return flat
    return flat[np.sort(rng.choice(len(flat), size=rows, replace=False))]


def layer_statistics(model: ir.Model, layers: Sequence[str], feeds: Sequence[Feeds],
                     seed: int = 0) -> dict[str, InputStatistics]:
    """Input statistics of the named layers (ids as ``layer_ids`` gives them) over ``feeds``."""
    ids = layer_ids(model.graph)
    nodes = {ids[n]: n for n in model.graph if ids[n] in set(layers)}
    wanted = sorted({n.inputs[0].name for n in nodes.values()})
    if not wanted or not feeds:
        return {}
    session, outputs = probe_session(model, wanted)
    rng = np.random.default_rng(seed)
    stats: dict[str, InputStatistics] = {}
    for feed in feeds:
        arrays = dict(zip(outputs, session.run(outputs, inputs_of(session, feed)), strict=True))
        for name, node in nodes.items():
            x = arrays.get(node.inputs[0].name)
            weight = node.inputs[1].const_value.numpy()
            if x is None or not x.size:
                continue
            vectors = input_vectors(x, node, weight, SAMPLE_ROWS, rng)
            if vectors is None:
                continue
            if name not in stats:
                g, k = vectors.shape[1:]
                stats[name] = InputStatistics(np.zeros((g, k, k)), np.zeros((g, k)))
            stats[name].add(vectors)
    return stats


def as_rows(weight: np.ndarray, node: ir.Node) -> np.ndarray:
    """The weight as [G, M/G, K]: output channels by group, each a row over the input vector."""
    group = node.attributes.get_int("group", 1) if node.op_type == "Conv" else 1
    rows = weight if weight_axis(node) == 0 else weight.T
    return rows.reshape(group, rows.shape[0] // group, -1)


def from_rows(rows: np.ndarray, weight: np.ndarray, node: ir.Node) -> np.ndarray:
    """Inverse of ``as_rows``."""
    return rows.reshape(weight.shape) if weight_axis(node) == 0 else rows[0].T


def gptq(rows: np.ndarray, scales: np.ndarray, hessian: np.ndarray, qmax: int) -> np.ndarray | None:
    """Integer weights [G, M, K] for ``rows`` at per-row ``scales`` [G, M], rounded column by
    column with each column's error pushed onto the later ones (module docstring); None where
    the damped second moment is not positive definite."""
    w = rows.astype(np.float64).copy()
    s = scales.astype(np.float64)[:, :, None]
    h = hessian.copy()
    groups, dead = np.nonzero(np.einsum("gkk->gk", h) <= 0)
    h[groups, dead, dead] = 1.0
    damp = DAMPING * np.einsum("gkk->gk", h).mean(axis=1)
    h += damp[:, None, None] * np.eye(h.shape[-1])[None]
    try:
        upper = np.swapaxes(np.linalg.cholesky(_spd_inverse(h)), 1, 2)  # U^T U = H^-1
    except np.linalg.LinAlgError:
        return None
    q = np.empty_like(w)
    k = w.shape[-1]
    for start in range(0, k, BLOCK):  # lazy batch updates: rank-1 inside a block, one matmul after
        end = min(start + BLOCK, k)
        block = w[:, :, start:end].copy()
        errors = np.empty_like(block)
        for j in range(end - start):
            column = block[:, :, j]
            q[:, :, start + j] = np.clip(np.round(column / s[:, :, 0]), -qmax, qmax)
            err = (column - q[:, :, start + j] * s[:, :, 0]) / upper[:, start + j, start + j][:, None]
            block[:, :, j + 1:] -= err[:, :, None] * upper[:, None, start + j, start + j + 1:end]
            errors[:, :, j] = err
        if end < k:
            w[:, :, end:] -= np.matmul(errors, upper[:, start:end, end:])
    if not np.isfinite(q).all():
        return None
    return q


def _spd_inverse(h: np.ndarray) -> np.ndarray:
    """Inverses of symmetric positive definite [G, K, K] matrices, through their Cholesky factors
    (LAPACK potrf + potri, a third of a general inverse's work) where K is large."""
    if h.shape[-1] < 256:
        return np.linalg.inv(h)
    from scipy.linalg import lapack

    out = np.empty_like(h)
    for g in range(h.shape[0]):
        factor, info = lapack.dpotrf(h[g], lower=True)
        inverse, info2 = lapack.dpotri(factor, lower=True) if info == 0 else (None, info)
        if info2 != 0:
            raise np.linalg.LinAlgError(f"not positive definite (LAPACK info {info2})")
        out[g] = np.tril(inverse) + np.tril(inverse, -1).T
    return out


def round_layer(node: ir.Node, weight: np.ndarray, scales: np.ndarray, axis: int, qmax: int,
                stats: InputStatistics | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(int8 weight in ``weight``'s layout, the bias correction per output channel or None).

    ``scales`` are per output channel (along ``axis``) or one scalar. Without statistics, or
    where GPTQ cannot run, the weights round to nearest and nothing is corrected.
    """
    shape = [1] * weight.ndim
    shape[axis] = -1
    per_channel = np.broadcast_to(scales.reshape(shape) if scales.ndim else scales, weight.shape)
    if stats is None:
        return _nearest(weight, per_channel, qmax).astype(np.int8), None
    key = (scales.tobytes(), qmax)
    if key not in stats.rounded:  # the guard rebuilds the model many times: round each layer once
        stats.rounded[key] = _round_with(node, weight, per_channel, qmax, stats)
    return stats.rounded[key]


def _nearest(weight: np.ndarray, per_channel: np.ndarray, qmax: int) -> np.ndarray:
    return np.clip(np.round(weight / per_channel.astype(np.float64)), -qmax, qmax)


def _round_with(node: ir.Node, weight: np.ndarray, per_channel: np.ndarray, qmax: int,
                stats: InputStatistics) -> tuple[np.ndarray, np.ndarray | None]:
    rows = as_rows(weight, node)
    row_scales = as_rows(per_channel, node)[:, :, 0]
    if rows.shape[:1] + rows.shape[2:] != stats.mean.shape:
        return _nearest(weight, per_channel, qmax).astype(np.int8), None
    q = gptq(rows, row_scales, stats.hessian, qmax)
    if q is None:
        q = as_rows(_nearest(weight, per_channel, qmax), node)
    error = rows.astype(np.float64) - q * row_scales[:, :, None]
    correction = np.einsum("gmk,gk->gm", error, stats.mean).reshape(-1)
    return from_rows(q, weight, node).astype(np.int8), correction
