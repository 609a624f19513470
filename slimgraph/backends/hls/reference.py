"""The integer reference: the lowered layers executed in NumPy int64, written apart from the C++.

The C simulation must equal this exactly; both implement the arithmetic that ``lower`` documents.
Arrays are [batch, C, H, W] or [batch, N]; in ``io=stream`` a [C, H, W] tensor flattened for a
dense layer is read in pixel order (H, W, C), as the stream delivers it.
"""

from __future__ import annotations

import numpy as np

from slimgraph.backends.hls.layers import Format, Layer, Window
from slimgraph.backends.hls.layout import to_hwc
from slimgraph.backends.hls.lower import Lowered

# Float64 sums of integer products are exact while every partial sum stays below 2^53.
_EXACT_IN_FLOAT64 = 2.0**53
_ROWS_PER_CHUNK = 1 << 16  # output pixels per matrix product: bounds the unfolded windows' memory


def rounding_shift(values: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``values / 2^shift`` rounded to nearest, ties to even (int64 in and out). ``shift``
    broadcasts against ``values`` (per channel) and is not expanded to their size."""
    shift = np.asarray(shift, np.int64)
    floor = values >> shift
    remainder = values - (floor << shift)
    positive = shift > 0
    half = np.where(positive, np.int64(1) << np.maximum(shift - 1, 0), 1)
    up = (remainder > half) | ((remainder == half) & ((floor & 1) == 1) & positive)
    return floor + up


def _grouped_products(cols: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``cols`` [G, R, K] times ``weight`` [G, O, K] -> [G, R, O], exact int64: through float64
    BLAS where no sum can reach 2^53 (every int8 and fixed-point layer), else in int64."""
    bound = float(np.abs(cols).max(initial=0)) * float(np.abs(weight).max(initial=0)) * cols.shape[-1]
    if bound >= _EXACT_IN_FLOAT64:
        return np.matmul(cols, weight.transpose(0, 2, 1))
    w = weight.astype(np.float64).transpose(0, 2, 1)
    out = np.empty((cols.shape[0], cols.shape[1], weight.shape[1]), np.int64)
    for start in range(0, cols.shape[1], _ROWS_PER_CHUNK):
        part = cols[:, start:start + _ROWS_PER_CHUNK].astype(np.float64)
        out[:, start:start + _ROWS_PER_CHUNK] = np.rint(np.matmul(part, w))
    return out


def _conv(windows: np.ndarray, weight: np.ndarray, groups: int) -> np.ndarray:
    """Windows [B, C, HO, WO, KH, KW] and weights [O, C / groups, KH, KW] -> [B, O, HO, WO]."""
    b, c, ho, wo, kh, kw = windows.shape
    per, out_per = c // groups, weight.shape[0] // groups
    cols = windows.reshape(b, groups, per, ho, wo, kh, kw).transpose(1, 0, 3, 4, 2, 5, 6)
    cols = cols.reshape(groups, b * ho * wo, per * kh * kw)
    acc = _grouped_products(cols, weight.reshape(groups, out_per, per * kh * kw))
    return acc.reshape(groups, b, ho, wo, out_per).transpose(1, 0, 4, 2, 3).reshape(b, -1, ho, wo)


def quantize_input(x: np.ndarray, fmt: Format) -> np.ndarray:
    """Float feed -> raw integers, as QuantizeLinear computes it in float32 (ties to even)."""
    scaled = np.rint(x.astype(np.float32) / np.float32(fmt.scale))
    return np.clip(scaled.astype(np.int64) + fmt.zero_point, fmt.low, fmt.high)


def dequantize_output(raw: np.ndarray, fmt: Format) -> np.ndarray:
    scale = fmt.scale
    if scale.ndim:
        scale = scale.reshape((-1,) + (1,) * (raw.ndim - 2))
    return ((raw - fmt.zero_point) * scale).astype(np.float32)


def _channel(values: np.ndarray, ndim: int) -> np.ndarray:
    return values.reshape((-1,) + (1,) * (ndim - 2))


def _windows(x: np.ndarray, window: Window, fill: int) -> np.ndarray:
    """[B, C, H, W] -> [B, C, HO, WO, KH, KW] after padding with ``fill``."""
    top, left, bottom, right = window.pads
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=fill)
    kh, kw = window.kernel
    sh, sw = window.strides
    view = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    return view[:, :, ::sh, ::sw][:, :, :window.out[0], :window.out[1]]


def _requantize(layer: Layer, acc: np.ndarray) -> np.ndarray:
    rq = layer.requant
    ndim = acc.ndim
    out = rounding_shift(acc * _channel(rq.m, ndim), _channel(rq.shift, ndim)) + _channel(rq.post, ndim)
    return np.clip(out, layer.lo, layer.hi)


def run_layer(layer: Layer, args: list[np.ndarray], stream: bool) -> np.ndarray:
    kind, p = layer.kind, layer.params
    if kind in ("conv", "dense", "avgpool", "requant"):
        x = args[0] - layer.inputs[0].fmt.zero_point
        if kind == "conv":
            # A padded position is the real value 0.
            acc = _conv(_windows(x, p.window, 0), p.weights.q, p.groups)
        elif kind == "dense":
            if stream and x.ndim == 4:
                x = to_hwc(x)
            acc = _grouped_products(x.reshape(1, len(x), -1), p.weights.q[None])[0]
        elif kind == "avgpool":
            acc = _windows(x, p.window, 0).sum(axis=(4, 5))
            acc = acc.reshape((len(x), *layer.output.shape))
        else:
            acc = x.reshape((len(x), *layer.output.shape))
        if layer.weights is not None:
            acc = acc + _channel(layer.weights.bias, acc.ndim)
        return _requantize(layer, acc)
    if kind in ("add", "concat"):
        parts = [m * (a - t.fmt.zero_point) for m, a, t in zip(p.m, args, layer.inputs,
                                                              strict=True)]
        acc = sum(parts) if kind == "add" else np.concatenate(parts, axis=1)
        return _requantize(layer, acc)
    if kind == "maxpool":
        return _windows(args[0], p.window, np.iinfo(np.int64).min).max(axis=(4, 5))
    if kind == "clamp":
        return np.clip(args[0], layer.lo, layer.hi)
    if kind == "sigmoid":
        return p.table[(args[0] - layer.inputs[0].fmt.low) >> p.drop]
    if kind == "softmax":
        x = args[0]
        distance = (x.max(axis=1, keepdims=True) - x) >> p.drop
        e = p.table[np.minimum(distance, len(p.table) - 1)]
        total = e.sum(axis=1, keepdims=True) << 16
        y = (e * p.divider + total // 2) // total + layer.output.fmt.zero_point
        return np.clip(y, layer.lo, layer.hi)
    if kind == "sign":
        return np.sign(args[0] - layer.inputs[0].fmt.zero_point)
    raise ValueError(f"unknown layer kind {kind!r}")


def run(lowered: Lowered, raw_inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Raw integer inputs [batch, ...] -> every tensor's raw integers, by tensor name."""
    inputs, layers, stream = lowered.inputs, lowered.layers, lowered.stream
    values = {t.name: np.asarray(a, np.int64).reshape((len(a), *t.shape))
              for t, a in zip(inputs, raw_inputs, strict=True)}
    for layer in layers:
        args = [values[t.name] for t in layer.inputs]
        args = [a.reshape((len(a), *t.shape)) if t.shape != a.shape[1:] and not (
            stream and layer.kind == "dense") else a for a, t in zip(args, layer.inputs, strict=True)]
        values[layer.output.name] = run_layer(layer, args, stream)
    return values


def outputs(lowered: Lowered, raw_inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Raw integer inputs -> raw integer outputs [batch, *shape]."""
    values = run(lowered, raw_inputs)
    return [values[t.name].reshape(len(values[t.name]), *t.shape) for t in lowered.outputs]
