"""ONNX operators as torch functions, for the graph interpreter that heal trains.

Each entry takes ``(inputs, attrs)``: the node's input tensors (None for an omitted optional
input) and its attributes as plain Python values, and returns a tensor or a tuple of them.
Quantized tensors (QuantizeLinear's output) are float tensors holding integer values: rounding
goes through a straight-through estimator, so a fake-quantized graph still passes gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Op = Callable[[list[Tensor | None], dict[str, Any]], Tensor | tuple[Tensor, ...]]

# ONNX TensorProto element types -> torch dtypes. int4/uint4 live in int8/uint8 tensors.
TORCH_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32,
    7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64, 12: torch.int64,
    13: torch.int64, 16: torch.bfloat16, 21: torch.uint8, 22: torch.int8,
}
# Integer ranges of the quantized element types (uint8, int8, int16, int32, uint4, int4).
QUANT_RANGES: dict[int, tuple[int, int]] = {
    2: (0, 255), 3: (-128, 127), 4: (0, 65535), 5: (-32768, 32767),
    6: (-(2**31), 2**31 - 1), 21: (0, 15), 22: (-8, 7),
}


def round_ste(x: Tensor) -> Tensor:
    """Round half to even in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def _ints(t: Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis_shape(scale: Tensor, x: Tensor, axis: int) -> Tensor:
    """A 1-D per-channel ``scale`` reshaped to broadcast along ``axis`` of ``x``."""
    if scale.dim() != 1 or x.dim() == 0:
        return scale
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return scale.reshape(shape)


def expand_qparam(p: Tensor, x: Tensor, axis: int, block: int) -> Tensor:
    """A scale or zero point broadcastable to ``x``: per tensor, per axis, or blocked along axis."""
    if block and p.dim() == x.dim():
        axis %= x.dim()
        return p.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
    return _axis_shape(p, x, axis)


def _qparams(scale: Tensor, zero_point: Tensor | None, x: Tensor, axis: int,
             block: int) -> tuple[Tensor, Tensor | float]:
    """Scale and zero point (in the scale's dtype) broadcastable to ``x``."""
    s = expand_qparam(scale, x, axis, block)
    return s, 0.0 if zero_point is None else expand_qparam(zero_point.to(s.dtype), x, axis, block)


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor | None, qrange: tuple[int, int],
               axis: int = 1, block: int = 0) -> Tensor:
    """``DequantizeLinear(QuantizeLinear(x))`` with a straight-through round: ONNX's formula."""
    s, z = _qparams(scale, zero_point, x, axis, block)
    return (torch.clamp(round_ste(x / s) + z, *qrange) - z) * s


def quantize_linear(i: list, a: dict) -> Tensor:
    x, scale, zp = i[0], i[1], i[2] if len(i) > 2 else None
    dtype = a.get("output_dtype") or (_elem_type(zp) if zp is not None else 2)
    s, z = _qparams(scale.to(x.dtype), zp, x, a.get("axis", 1), a.get("block_size", 0))
    return torch.clamp(round_ste(x / s) + z, *QUANT_RANGES[dtype])


def dequantize_linear(i: list, a: dict) -> Tensor:
    x, scale, zp = i[0], i[1], i[2] if len(i) > 2 else None
    s, z = _qparams(scale, zp, x, a.get("axis", 1), a.get("block_size", 0))
    return (x.to(s.dtype) - z) * s


def _elem_type(t: Tensor) -> int:
    """The ONNX element type a zero point's torch dtype stands for (int4 is told by attrs)."""
    return {torch.uint8: 2, torch.int8: 3, torch.int32: 6, torch.int16: 5}.get(t.dtype, 2)


def dynamic_quantize_linear(i: list, a: dict) -> tuple[Tensor, Tensor, Tensor]:
    """uint8 with a run-time scale; the scale and zero point pass no gradient (as in STE QAT)."""
    x = i[0]
    lo = torch.clamp(x.detach().min(), max=0.0)
    hi = torch.clamp(x.detach().max(), min=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    return torch.clamp(round_ste(x / scale) + zp, 0, 255), scale, zp


def matmul_integer(i: list, a: dict) -> Tensor:
    x, w = i[0].float(), i[1].float()
    if len(i) > 2 and i[2] is not None:
        x = x - i[2].float()
    if len(i) > 3 and i[3] is not None:
        w = w - i[3].float()
    return torch.matmul(x, w)


def _pads(a: dict, dims: int) -> list[int]:
    pads = a.get("pads") or [0] * (2 * dims)
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise NotImplementedError(f"auto_pad={a['auto_pad']}")
    return list(pads)


def _pad_input(x: Tensor, pads: list[int], dims: int, value: float = 0.0) -> tuple[Tensor, list[int]]:
    """Symmetric pads go to the op; asymmetric ones are applied with F.pad first."""
    begin, end = pads[:dims], pads[dims:]
    if begin == end:
        return x, begin
    flat: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        flat += [b, e]
    return F.pad(x, flat, value=value), [0] * dims


def conv(i: list, a: dict) -> Tensor:
    x, w, b = i[0], i[1], i[2] if len(i) > 2 else None
    dims = w.dim() - 2
    x, pads = _pad_input(x, _pads(a, dims), dims)
    fn = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    return fn(x, w, b, stride=a.get("strides") or 1, padding=pads,
              dilation=a.get("dilations") or 1, groups=a.get("group", 1))


def conv_transpose(i: list, a: dict) -> Tensor:
    x, w, b = i[0], i[1], i[2] if len(i) > 2 else None
    dims = w.dim() - 2
    pads = _pads(a, dims)
    if pads[:dims] != pads[dims:] or a.get("output_shape"):
        raise NotImplementedError("ConvTranspose with asymmetric pads or output_shape")
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
    return fn(x, w, b, stride=a.get("strides") or 1, padding=pads[:dims],
              output_padding=a.get("output_padding") or 0, groups=a.get("group", 1),
              dilation=a.get("dilations") or 1)


def gemm(i: list, a: dict) -> Tensor:
    x, w = i[0], i[1]
    if a.get("transA", 0):
        x = x.t()
    if a.get("transB", 0):
        w = w.t()
    y = a.get("alpha", 1.0) * (x @ w)
    if len(i) > 2 and i[2] is not None:
        y = y + a.get("beta", 1.0) * i[2]
    return y


def _pool(i: list, a: dict, kind: str) -> Tensor:
    x = i[0]
    kernel = a["kernel_shape"]
    dims = len(kernel)
    pads = _pads(a, dims)
    strides = a.get("strides") or [1] * dims
    if kind == "max":
        x, pads = _pad_input(x, pads, dims, value=-math.inf)
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1]
        return fn(x, kernel, strides, pads, dilation=a.get("dilations") or 1,
                  ceil_mode=bool(a.get("ceil_mode", 0)))
    if any(d != 1 for d in a.get("dilations") or []):
        raise NotImplementedError("AveragePool with dilations")
    x, pads = _pad_input(x, pads, dims)
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]
    return fn(x, kernel, strides, pads, ceil_mode=bool(a.get("ceil_mode", 0)),
              count_include_pad=bool(a.get("count_include_pad", 0)))


def _reduce_axes(i: list, a: dict, x: Tensor) -> list[int] | None:
    axes = a.get("axes")
    if axes is None and len(i) > 1 and i[1] is not None:
        axes = _ints(i[1])
    if not axes:
        return None if a.get("noop_with_empty_axes", 0) == 0 else []
    return [ax % x.dim() for ax in axes]


def _reducer(fn: Callable[..., Tensor]) -> Op:
    def reduce(i: list, a: dict) -> Tensor:
        x = i[0]
        axes = _reduce_axes(i, a, x)
        if axes == []:
            return x
        dims = list(range(x.dim())) if axes is None else axes
        return fn(x, dim=dims, keepdim=bool(a.get("keepdims", 1)))

    return reduce


def _amax(x: Tensor, dim: list[int], keepdim: bool) -> Tensor:
    return torch.amax(x, dim=dim, keepdim=keepdim)


def _amin(x: Tensor, dim: list[int], keepdim: bool) -> Tensor:
    return torch.amin(x, dim=dim, keepdim=keepdim)


def reshape(i: list, a: dict) -> Tensor:
    x, shape = i[0], _ints(i[1])
    if not a.get("allowzero", 0):
        shape = [x.shape[k] if d == 0 else d for k, d in enumerate(shape)]
    return x.reshape(shape)


def flatten(i: list, a: dict) -> Tensor:
    x, axis = i[0], a.get("axis", 1) % max(i[0].dim(), 1)
    return x.reshape(int(math.prod(x.shape[:axis])), -1)


def squeeze(i: list, a: dict) -> Tensor:
    x = i[0]
    axes = a.get("axes") or (_ints(i[1]) if len(i) > 1 and i[1] is not None else None)
    if axes is None:
        return x.squeeze()
    for ax in sorted((ax % x.dim() for ax in axes), reverse=True):
        x = x.squeeze(ax)
    return x


def unsqueeze(i: list, a: dict) -> Tensor:
    x = i[0]
    axes = a.get("axes") or _ints(i[1])
    rank = x.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(ax)
    return x


def slice_(i: list, a: dict) -> Tensor:
    x = i[0]
    starts, ends = _ints(i[1]), _ints(i[2])
    axes = _ints(i[3]) if len(i) > 3 and i[3] is not None else list(range(len(starts)))
    steps = _ints(i[4]) if len(i) > 4 and i[4] is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * x.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis %= x.dim()
        n = x.shape[axis]
        if step > 0:
            s = min(max(start + n if start < 0 else start, 0), n)
            e = min(max(end + n if end < 0 else end, 0), n)
            index[axis] = slice(s, e, step)
        else:  # torch has no negative steps: flip, then slice forward
            s = min(max(start + n if start < 0 else start, -1), n - 1)
            e = min(max(end + n if end < 0 else end, -1), n - 1)
            index[axis] = slice(n - 1 - s, n - 1 - e, -step)
            flips.append(axis)
    if flips:
        x = torch.flip(x, flips)
    return x[tuple(index)]


def split(i: list, a: dict) -> tuple[Tensor, ...]:
    x, axis = i[0], a.get("axis", 0)
    sizes = a.get("split") or (_ints(i[1]) if len(i) > 1 and i[1] is not None else None)
    if sizes is None:
        n = a["num_outputs"]
        size = -(-x.shape[axis] // n)
        return tuple(torch.split(x, size, dim=axis))
    return tuple(torch.split(x, sizes, dim=axis))


def gather(i: list, a: dict) -> Tensor:
    x, idx, axis = i[0], i[1].long(), a.get("axis", 0) % i[0].dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))


def gather_elements(i: list, a: dict) -> Tensor:
    x, idx, axis = i[0], i[1].long(), a.get("axis", 0) % i[0].dim()
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))


def gather_nd(i: list, a: dict) -> Tensor:
    x, idx, b = i[0], i[1].long(), a.get("batch_dims", 0)
    depth = idx.shape[-1]
    batch = x.shape[:b]
    flat_x = x.reshape(int(math.prod(batch)), *x.shape[b:])
    flat_idx = idx.reshape(int(math.prod(batch)), -1, depth)
    dims = torch.tensor(x.shape[b : b + depth])
    flat_idx = torch.where(flat_idx < 0, flat_idx + dims, flat_idx)
    picked = torch.stack([flat_x[n][tuple(flat_idx[n].unbind(-1))] for n in range(flat_x.shape[0])])
    return picked.reshape((*idx.shape[:-1], *x.shape[b + depth:]))


def _l2(x: Tensor, dim: list[int], keepdim: bool) -> Tensor:
    return torch.sqrt(torch.sum(x * x, dim=dim, keepdim=keepdim))


def expand(i: list, a: dict) -> Tensor:
    x, shape = i[0], _ints(i[1])
    target = torch.broadcast_shapes(tuple(x.shape), tuple(shape))
    return x.expand(target)


def cast(i: list, a: dict) -> Tensor:
    if a["to"] in (21, 22) or a["to"] not in TORCH_DTYPES:  # int4 casts saturate; torch has no int4
        raise NotImplementedError(f"Cast to ONNX type {a['to']}")
    return i[0].to(TORCH_DTYPES[a["to"]])


def constant(i: list, a: dict) -> Tensor:
    if "value" in a:
        return a["value"]
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in a:
            return torch.tensor(a[key], dtype=dtype)
    raise NotImplementedError(f"Constant with {', '.join(a)}")


def argmax(i: list, a: dict) -> Tensor:
    x, axis, keep = i[0], a.get("axis", 0), bool(a.get("keepdims", 1))
    if not a.get("select_last_index", 0):
        return torch.argmax(x, axis, keepdim=keep)
    axis %= x.dim()
    return x.shape[axis] - 1 - torch.argmax(torch.flip(x, [axis]), axis, keepdim=keep)


def clip(i: list, a: dict) -> Tensor:
    x = i[0]
    lo = i[1] if len(i) > 1 and i[1] is not None else a.get("min")
    hi = i[2] if len(i) > 2 and i[2] is not None else a.get("max")
    if lo is not None:
        x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype))
    if hi is not None:
        x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype))
    return x


def layer_norm(i: list, a: dict) -> Tensor:
    x, gamma, beta = i[0], i[1], i[2] if len(i) > 2 else None
    axis = a.get("axis", -1) % x.dim()
    shape = x.shape[axis:]
    return F.layer_norm(x, shape, gamma.expand(shape), None if beta is None else beta.expand(shape),
                        eps=a.get("epsilon", 1e-5))


def batch_norm(i: list, a: dict) -> Tensor:
    x, gamma, beta, mean, var = i[:5]
    return F.batch_norm(x, mean, var, gamma, beta, training=False, eps=a.get("epsilon", 1e-5))


def softmax(i: list, a: dict) -> Tensor:
    return torch.softmax(i[0], dim=a.get("axis", -1))


def log_softmax(i: list, a: dict) -> Tensor:
    return torch.log_softmax(i[0], dim=a.get("axis", -1))


def gelu(i: list, a: dict) -> Tensor:
    return F.gelu(i[0], approximate="tanh" if a.get("approximate", "none") == "tanh" else "none")


def pad(i: list, a: dict) -> Tensor:
    x, pads = i[0], _ints(i[1])
    value = float(i[2]) if len(i) > 2 and i[2] is not None and i[2].numel() else 0.0
    dims = x.dim()
    axes = _ints(i[3]) if len(i) > 3 and i[3] is not None else list(range(dims))
    full = [0] * (2 * dims)
    for k, ax in enumerate(axes):
        full[ax % dims], full[ax % dims + dims] = pads[k], pads[k + len(axes)]
    flat: list[int] = []
    for d in reversed(range(dims)):
        flat += [full[d], full[d + dims]]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate",
            "wrap": "circular"}[a.get("mode", "constant")]
    return F.pad(x, flat, mode=mode, value=value if mode == "constant" else None)


def shape(i: list, a: dict) -> Tensor:
    dims = list(i[0].shape)
    start, end = a.get("start", 0), a.get("end")
    return torch.tensor(dims[start:end], dtype=torch.int64)


def constant_of_shape(i: list, a: dict) -> Tensor:
    value = a.get("value")
    fill = torch.zeros(1) if value is None else value
    return torch.full(_ints(i[0]), fill.reshape(-1)[0].item(), dtype=fill.dtype)


def range_(i: list, a: dict) -> Tensor:
    start, limit, delta = (t.item() for t in i[:3])
    return torch.arange(start, limit, delta, dtype=i[0].dtype)


def where(i: list, a: dict) -> Tensor:
    return torch.where(i[0].bool(), i[1], i[2])


def trilu(i: list, a: dict) -> Tensor:
    k = int(i[1].item()) if len(i) > 1 and i[1] is not None else 0
    return torch.triu(i[0], k) if a.get("upper", 1) else torch.tril(i[0], k)


def bit_shift(i: list, a: dict) -> Tensor:
    x, n = i[0].to(torch.int64), i[1].to(torch.int64)
    out = x >> n if a["direction"] == "RIGHT" else x << n
    return out.to(i[0].dtype)


def mod(i: list, a: dict) -> Tensor:
    return torch.fmod(i[0], i[1]) if a.get("fmod", 0) else torch.remainder(i[0], i[1])


def lstm(i: list, a: dict) -> tuple[Tensor, Tensor, Tensor]:
    """ONNX LSTM (forward or bidirectional, default activations, gates i, o, f, c)."""
    x, w, r = i[0], i[1], i[2]
    b = i[3] if len(i) > 3 else None
    if len(i) > 4 and i[4] is not None:
        raise NotImplementedError("LSTM with sequence_lens")
    if a.get("layout", 0) or a.get("input_forget", 0) or a.get("clip") or a.get("activations"):
        raise NotImplementedError("LSTM with layout, input_forget, clip or custom activations")
    hidden = w.shape[1] // 4
    dirs = w.shape[0]
    batch = x.shape[1]
    h0 = i[5] if len(i) > 5 and i[5] is not None else x.new_zeros(dirs, batch, hidden)
    c0 = i[6] if len(i) > 6 and i[6] is not None else x.new_zeros(dirs, batch, hidden)
    if len(i) > 7 and i[7] is not None:
        raise NotImplementedError("LSTM with peepholes")
    ys, hs, cs = [], [], []
    for d in range(dirs):
        bias = 0.0 if b is None else b[d, : 4 * hidden] + b[d, 4 * hidden:]
        h, c = h0[d], c0[d]
        steps = range(x.shape[0]) if d == 0 and a.get("direction", "forward") != "reverse" else \
            reversed(range(x.shape[0]))
        out = [None] * x.shape[0]
        for t in steps:
            gates = x[t] @ w[d].t() + h @ r[d].t() + bias
            gi, go, gf, gc = gates.chunk(4, dim=-1)
            c = torch.sigmoid(gf) * c + torch.sigmoid(gi) * torch.tanh(gc)
            h = torch.sigmoid(go) * torch.tanh(c)
            out[t] = h
        ys.append(torch.stack(out))
        hs.append(h)
        cs.append(c)
    return torch.stack(ys, dim=1), torch.stack(hs), torch.stack(cs)


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Op:
    return lambda i, a: fn(i[0], i[1])


def _unary(fn: Callable[[Tensor], Tensor]) -> Op:
    return lambda i, a: fn(i[0])


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Op:
    def run(i: list, a: dict) -> Tensor:
        out = i[0]
        for t in i[1:]:
            out = fn(out, t)
        return out

    return run


def _div(x: Tensor, y: Tensor) -> Tensor:
    if x.dtype.is_floating_point or y.dtype.is_floating_point:
        return x / y
    return torch.div(x, y, rounding_mode="trunc")


OPS: dict[str, Op] = {
    "Abs": _unary(torch.abs), "Add": _binary(torch.add), "And": _binary(torch.logical_and),
    "ArgMax": argmax,
    "AveragePool": lambda i, a: _pool(i, a, "avg"),
    "BatchNormalization": batch_norm, "BitShift": bit_shift, "Cast": cast,
    "CastLike": lambda i, a: i[0].to(i[1].dtype), "Ceil": _unary(torch.ceil), "Clip": clip,
    "Concat": lambda i, a: torch.cat([t for t in i if t is not None], dim=a["axis"]),
    "Constant": constant, "ConstantOfShape": constant_of_shape, "Conv": conv,
    "ConvTranspose": conv_transpose, "Cos": _unary(torch.cos), "CumSum": lambda i, a: torch.cumsum(
        i[0], int(i[1].item())), "DequantizeLinear": dequantize_linear, "Div": _binary(_div),
    "Dropout": lambda i, a: i[0], "DynamicQuantizeLinear": dynamic_quantize_linear,
    "Elu": lambda i, a: F.elu(i[0], a.get("alpha", 1.0)), "Equal": _binary(torch.eq),
    "Erf": _unary(torch.erf), "Exp": _unary(torch.exp), "Expand": expand, "Flatten": flatten,
    "Floor": _unary(torch.floor), "Gather": gather, "GatherElements": gather_elements, "GatherND": gather_nd,
    "Gelu": gelu, "Gemm": gemm, "GlobalAveragePool": lambda i, a: i[0].mean(
        dim=tuple(range(2, i[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda i, a: torch.amax(i[0], dim=tuple(range(2, i[0].dim())), keepdim=True),
    "Greater": _binary(torch.gt), "GreaterOrEqual": _binary(torch.ge),
    "HardSigmoid": lambda i, a: torch.clamp(a.get("alpha", 0.2) * i[0] + a.get("beta", 0.5), 0, 1),
    "HardSwish": _unary(F.hardswish), "Identity": lambda i, a: i[0],
    "LayerNormalization": layer_norm, "LeakyRelu": lambda i, a: F.leaky_relu(i[0], a.get("alpha", 0.01)),
    "Less": _binary(torch.lt), "LessOrEqual": _binary(torch.le), "Log": _unary(torch.log),
    "LogSoftmax": log_softmax, "LSTM": lstm, "MatMul": _binary(torch.matmul),
    "MatMulInteger": matmul_integer, "Max": _variadic(torch.maximum),
    "MaxPool": lambda i, a: _pool(i, a, "max"), "Mean": lambda i, a: _variadic(torch.add)(i, a) / len(i),
    "Min": _variadic(torch.minimum), "Mod": mod,
    "Mul": _binary(torch.mul), "Neg": _unary(torch.neg), "Not": _unary(torch.logical_not),
    "Or": _binary(torch.logical_or), "Pad": pad, "Pow": _binary(torch.pow),
    "QuantizeLinear": quantize_linear, "Range": range_, "Reciprocal": _unary(torch.reciprocal),
    "ReduceL2": _reducer(_l2), "ReduceMax": _reducer(_amax), "ReduceMean": _reducer(torch.mean),
    "ReduceMin": _reducer(_amin),
    "ReduceSum": _reducer(torch.sum), "Relu": _unary(torch.relu), "Reshape": reshape,
    "Round": _unary(torch.round), "Shape": shape, "Sigmoid": _unary(torch.sigmoid),
    "Sign": _unary(torch.sign), "Sin": _unary(torch.sin), "Size": lambda i, a: torch.tensor(
        i[0].numel(), dtype=torch.int64), "Slice": slice_, "Softmax": softmax,
    "Softplus": _unary(F.softplus), "Split": split, "Sqrt": _unary(torch.sqrt),
    "Squeeze": squeeze, "Sub": _binary(torch.sub), "Sum": _variadic(torch.add),
    "Tanh": _unary(torch.tanh), "Tile": lambda i, a: i[0].repeat(_ints(i[1])),
    "Transpose": lambda i, a: i[0].permute(a.get("perm") or list(reversed(range(i[0].dim())))),
    "Trilu": trilu, "Unsqueeze": unsqueeze, "Where": where, "Xor": _binary(torch.logical_xor),
}


def supported(op_type: str, domain: str) -> bool:
    return domain in ("", "ai.onnx") and op_type in OPS


def as_list(out: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]
