"""ONNX operators as torch functions, for the graph interpreter that heal trains.

Each operator is registered for ``(domain, op_type)`` from the opset version where its current
semantics begin (``@onnx_op("ReduceSum", since=13)``); ``resolve`` picks, for a model's opset, the
newest registration at or below it, as onnxruntime's kernel registry does. An op is called as
``op(*inputs, **attributes)``: the node's input tensors in order (``None`` for an omitted
optional input) and its attributes as keyword arguments whose defaults are ONNX's. An attribute
an op does not declare is refused when the module is built, not ignored. An op that needs its
node's output count (Split before opset 18) declares the keyword ``n_outputs``; the interpreter
fills it in.

Quantized tensors (QuantizeLinear's output) are float tensors holding integer values: rounding goes
through a straight-through estimator, so a fake-quantized graph still passes gradients.
"""

from __future__ import annotations

import bisect
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import onnx_ir as ir
import torch
import torch.nn.functional as F
from onnx_ir.tensor_adapters import to_torch_dtype

Tensor = torch.Tensor
Op = Callable[..., Tensor | tuple[Tensor, ...]]
ONNX_DOMAINS = ("", "ai.onnx")
OUTPUT_COUNT = "n_outputs"  # the keyword an op declares to be given its node's output count

# Integer ranges of the quantized element types.
QUANT_RANGES: dict[ir.DataType, tuple[int, int]] = {
    ir.DataType.UINT8: (0, 255), ir.DataType.INT8: (-128, 127), ir.DataType.UINT16: (0, 65535),
    ir.DataType.INT16: (-32768, 32767), ir.DataType.INT32: (-(2**31), 2**31 - 1),
    ir.DataType.UINT4: (0, 15), ir.DataType.INT4: (-8, 7),
}
# int4 / uint4 values live in int8 / uint8 tensors (torch has no 4-bit integer type); uint32 /
# uint64 in int64 (torch's own unsigned types have few kernels).
_HELD_IN = {ir.DataType.INT4: torch.int8, ir.DataType.UINT4: torch.uint8,
            ir.DataType.UINT32: torch.int64, ir.DataType.UINT64: torch.int64}
# What Cast converts to: float8, int4, strings and complex numbers are refused (torch's float8
# conversion does not saturate as ONNX's does; int4 casts saturate and torch has no int4).
_CAST_TARGETS = frozenset({
    ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16,
    ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
    ir.DataType.UINT32, ir.DataType.UINT64, ir.DataType.BOOL})

_REGISTRY: dict[tuple[str, str], list[tuple[int, Op]]] = {}


def onnx_op(op_type: str, since: int = 1, domain: str = "") -> Callable[[Op], Op]:
    """Register the decorated function as ``op_type``'s semantics from opset ``since`` on."""

    def register(fn: Op) -> Op:
        versions = _REGISTRY.setdefault((domain, op_type), [])
        versions.append((since, fn))
        versions.sort(key=lambda v: v[0])
        return fn

    return register


def _register(op_type: str, fn: Op, since: int = 1) -> None:
    onnx_op(op_type, since)(fn)


def resolve(op_type: str, domain: str = "", opset: int | None = None) -> Op | None:
    """The op for ``op_type`` under ``opset`` of its domain (None: the newest), or None."""
    versions = _REGISTRY.get(("" if domain == "ai.onnx" else domain, op_type))
    if not versions:
        return None
    if opset is None:
        return versions[-1][1]
    at = bisect.bisect_right([since for since, _ in versions], opset)
    return versions[at - 1][1] if at else None


def op_types() -> set[str]:
    """Every ONNX op type some opset of which the interpreter runs."""
    return {op_type for (domain, op_type) in _REGISTRY if domain == ""}


@functools.cache
def _keywords(fn: Op) -> tuple[frozenset[str], bool]:
    params = inspect.signature(fn).parameters.values()
    names = frozenset(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
    return names, OUTPUT_COUNT in names


def bind(fn: Op, attributes: dict[str, Any], outputs: int) -> dict[str, Any]:
    """The keyword arguments to call ``fn`` with, or ValueError naming an attribute it lacks."""
    names, wants_count = _keywords(fn)
    unknown = sorted(set(attributes) - (names - {OUTPUT_COUNT}))
    if unknown:
        raise ValueError(f"attribute(s) {', '.join(unknown)} not supported")
    return {**attributes, OUTPUT_COUNT: outputs} if wants_count else dict(attributes)


def torch_dtype(dtype: ir.DataType) -> torch.dtype:
    """The torch dtype that holds an ONNX element type (see ``_HELD_IN``)."""
    return _HELD_IN.get(dtype) or to_torch_dtype(dtype)


# -- quantization -------------------------------------------------------------------------------


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


_ZERO_POINT_TYPES = {torch.uint8: ir.DataType.UINT8, torch.int8: ir.DataType.INT8,
                     torch.int16: ir.DataType.INT16, torch.int32: ir.DataType.INT32}


@onnx_op("QuantizeLinear")
def quantize_linear(x: Tensor, scale: Tensor, zero_point: Tensor | None = None, *, axis: int = 1,
                    block_size: int = 0, output_dtype: int = 0, saturate: int = 1,
                    precision: int = 0) -> Tensor:
    """The zero point's type (int4 told by ``output_dtype``), uint8 without one."""
    dtype = ir.DataType(output_dtype) if output_dtype else (
        _ZERO_POINT_TYPES.get(zero_point.dtype, ir.DataType.UINT8) if zero_point is not None
        else ir.DataType.UINT8)
    s, z = _qparams(scale.to(x.dtype), zero_point, x, axis, block_size)
    return torch.clamp(round_ste(x / s) + z, *QUANT_RANGES[dtype])


@onnx_op("DequantizeLinear")
def dequantize_linear(x: Tensor, scale: Tensor, zero_point: Tensor | None = None, *, axis: int = 1,
                      block_size: int = 0, output_dtype: int = 0) -> Tensor:
    s, z = _qparams(scale, zero_point, x, axis, block_size)
    return (x.to(s.dtype) - z) * s


@onnx_op("DynamicQuantizeLinear")
def dynamic_quantize_linear(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """uint8 with a run-time scale; the scale and zero point pass no gradient (as in STE QAT)."""
    lo = torch.clamp(x.detach().min(), max=0.0)
    hi = torch.clamp(x.detach().max(), min=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    return torch.clamp(round_ste(x / scale) + zp, 0, 255), scale, zp


@onnx_op("MatMulInteger")
def matmul_integer(a: Tensor, b: Tensor, a_zero_point: Tensor | None = None,
                   b_zero_point: Tensor | None = None) -> Tensor:
    x, w = a.float(), b.float()
    if a_zero_point is not None:
        x = x - a_zero_point.float()
    if b_zero_point is not None:
        w = w - b_zero_point.float()
    return torch.matmul(x, w)


# -- convolution and pooling ----------------------------------------------------------------------


def _pads(pads: Sequence[int] | None, auto_pad: str, dims: int) -> list[int]:
    if auto_pad not in ("NOTSET", "VALID"):
        raise NotImplementedError(f"auto_pad={auto_pad}")
    return list(pads) if pads else [0] * (2 * dims)


def _pad_input(x: Tensor, pads: list[int], dims: int, value: float = 0.0) -> tuple[Tensor, list[int]]:
    """Symmetric pads go to the op; asymmetric ones are applied with F.pad first."""
    begin, end = pads[:dims], pads[dims:]
    if begin == end:
        return x, begin
    flat: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        flat += [b, e]
    return F.pad(x, flat, value=value), [0] * dims


@onnx_op("Conv")
def conv(x: Tensor, w: Tensor, b: Tensor | None = None, *, auto_pad: str = "NOTSET",
         dilations: list[int] | None = None, group: int = 1, kernel_shape: list[int] | None = None,
         pads: list[int] | None = None, strides: list[int] | None = None) -> Tensor:
    dims = w.dim() - 2
    x, padding = _pad_input(x, _pads(pads, auto_pad, dims), dims)
    fn = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    return fn(x, w, b, stride=strides or 1, padding=padding, dilation=dilations or 1, groups=group)


@onnx_op("ConvTranspose")
def conv_transpose(x: Tensor, w: Tensor, b: Tensor | None = None, *, auto_pad: str = "NOTSET",
                   dilations: list[int] | None = None, group: int = 1,
                   kernel_shape: list[int] | None = None, output_padding: list[int] | None = None,
                   output_shape: list[int] | None = None, pads: list[int] | None = None,
                   strides: list[int] | None = None) -> Tensor:
    dims = w.dim() - 2
    padding = _pads(pads, auto_pad, dims)
    if padding[:dims] != padding[dims:] or output_shape:
        raise NotImplementedError("ConvTranspose with asymmetric pads or output_shape")
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
    return fn(x, w, b, stride=strides or 1, padding=padding[:dims],
              output_padding=output_padding or 0, groups=group, dilation=dilations or 1)


@onnx_op("MaxPool")
def max_pool(x: Tensor, *, auto_pad: str = "NOTSET", ceil_mode: int = 0,
             dilations: list[int] | None = None, kernel_shape: list[int],
             pads: list[int] | None = None, storage_order: int = 0,
             strides: list[int] | None = None) -> Tensor:
    """The pooled values; the Indices output (and so ``storage_order``) is not computed."""
    dims = len(kernel_shape)
    x, padding = _pad_input(x, _pads(pads, auto_pad, dims), dims, value=-math.inf)
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1]
    return fn(x, kernel_shape, strides or [1] * dims, padding, dilation=dilations or 1,
              ceil_mode=bool(ceil_mode))


@onnx_op("AveragePool")
def average_pool(x: Tensor, *, auto_pad: str = "NOTSET", ceil_mode: int = 0,
                 count_include_pad: int = 0, dilations: list[int] | None = None,
                 kernel_shape: list[int], pads: list[int] | None = None,
                 strides: list[int] | None = None) -> Tensor:
    dims = len(kernel_shape)
    if any(d != 1 for d in dilations or []):
        raise NotImplementedError("AveragePool with dilations")
    x, padding = _pad_input(x, _pads(pads, auto_pad, dims), dims)
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]
    return fn(x, kernel_shape, strides or [1] * dims, padding, ceil_mode=bool(ceil_mode),
              count_include_pad=bool(count_include_pad))


@onnx_op("GlobalAveragePool")
def global_average_pool(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@onnx_op("GlobalMaxPool")
def global_max_pool(x: Tensor) -> Tensor:
    return torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)


# -- linear algebra and normalization -------------------------------------------------------------


@onnx_op("Gemm")
def gemm(a: Tensor, b: Tensor, c: Tensor | None = None, *, alpha: float = 1.0, beta: float = 1.0,
         transA: int = 0, transB: int = 0) -> Tensor:
    y = alpha * ((a.t() if transA else a) @ (b.t() if transB else b))
    return y if c is None else y + beta * c


@onnx_op("LayerNormalization", since=17)
def layer_norm(x: Tensor, scale: Tensor, bias: Tensor | None = None, *, axis: int = -1,
               epsilon: float = 1e-5, stash_type: int = 1) -> Tensor:
    shape = x.shape[axis % x.dim():]
    return F.layer_norm(x, shape, scale.expand(shape), None if bias is None else bias.expand(shape),
                        eps=epsilon)


@onnx_op("BatchNormalization", since=9)
def batch_norm(x: Tensor, scale: Tensor, b: Tensor, mean: Tensor, var: Tensor, *,
               epsilon: float = 1e-5, momentum: float = 0.9, training_mode: int = 0) -> Tensor:
    if training_mode:
        raise NotImplementedError("BatchNormalization with training_mode=1")
    return F.batch_norm(x, mean, var, scale, b, training=False, eps=epsilon)


def _coerced(fn: Callable[[Tensor, int], Tensor]) -> Op:
    """Softmax / LogSoftmax before opset 13: over the input flattened to 2-D at ``axis``."""

    def run(x: Tensor, *, axis: int = 1) -> Tensor:
        axis %= max(x.dim(), 1)
        flat = x.reshape(int(math.prod(x.shape[:axis])), -1)
        return fn(flat, -1).reshape(x.shape)

    return run


def _along(fn: Callable[[Tensor, int], Tensor]) -> Op:
    def run(x: Tensor, *, axis: int = -1) -> Tensor:
        return fn(x, axis)

    return run


_register("Softmax", _coerced(torch.softmax))
_register("Softmax", _along(torch.softmax), since=13)
_register("LogSoftmax", _coerced(torch.log_softmax))
_register("LogSoftmax", _along(torch.log_softmax), since=13)


@onnx_op("Gelu", since=20)
def gelu(x: Tensor, *, approximate: str = "none") -> Tensor:
    return F.gelu(x, approximate="tanh" if approximate == "tanh" else "none")


# -- reductions -----------------------------------------------------------------------------------


def _reduce(fn: Callable[..., Tensor], x: Tensor, axes: list[int] | None, keepdims: int,
            noop_with_empty_axes: int) -> Tensor:
    if not axes:
        if noop_with_empty_axes:
            return x
        axes = list(range(x.dim()))
    return fn(x, dim=[ax % x.dim() for ax in axes], keepdim=bool(keepdims))


def _reducers(op_type: str, fn: Callable[..., Tensor], axes_input_since: int) -> None:
    """``op_type`` with ``axes`` as an attribute, then (from ``axes_input_since``) as an input."""

    def by_attribute(x: Tensor, *, axes: list[int] | None = None, keepdims: int = 1) -> Tensor:
        return _reduce(fn, x, axes, keepdims, 0)

    def by_input(x: Tensor, axes: Tensor | None = None, *, keepdims: int = 1,
                 noop_with_empty_axes: int = 0) -> Tensor:
        return _reduce(fn, x, _ints(axes), keepdims, noop_with_empty_axes)

    _register(op_type, by_attribute)
    _register(op_type, by_input, since=axes_input_since)


def _amax(x: Tensor, dim: list[int], keepdim: bool) -> Tensor:
    return torch.amax(x, dim=dim, keepdim=keepdim)


def _amin(x: Tensor, dim: list[int], keepdim: bool) -> Tensor:
    return torch.amin(x, dim=dim, keepdim=keepdim)


def _l2(x: Tensor, dim: list[int], keepdim: bool) -> Tensor:
    return torch.sqrt(torch.sum(x * x, dim=dim, keepdim=keepdim))


_reducers("ReduceSum", torch.sum, 13)
_reducers("ReduceMean", torch.mean, 18)
_reducers("ReduceMax", _amax, 18)
_reducers("ReduceMin", _amin, 18)
_reducers("ReduceL2", _l2, 18)


@onnx_op("ArgMax")
def argmax(x: Tensor, *, axis: int = 0, keepdims: int = 1, select_last_index: int = 0) -> Tensor:
    if not select_last_index:
        return torch.argmax(x, axis, keepdim=bool(keepdims))
    axis %= x.dim()
    return x.shape[axis] - 1 - torch.argmax(torch.flip(x, [axis]), axis, keepdim=bool(keepdims))


@onnx_op("CumSum")
def cumsum(x: Tensor, axis: Tensor, *, exclusive: int = 0, reverse: int = 0) -> Tensor:
    dim = int(axis.item()) % max(x.dim(), 1)
    if reverse:
        x = torch.flip(x, [dim])
    out = torch.cumsum(x, dim)
    if exclusive:
        out = out - x
    return torch.flip(out, [dim]) if reverse else out


# -- shapes ---------------------------------------------------------------------------------------


@onnx_op("Reshape", since=5)
def reshape(x: Tensor, shape: Tensor, *, allowzero: int = 0) -> Tensor:
    dims = _ints(shape)
    if not allowzero:
        dims = [x.shape[k] if d == 0 else d for k, d in enumerate(dims)]
    return x.reshape(dims)


@onnx_op("Flatten")
def flatten(x: Tensor, *, axis: int = 1) -> Tensor:
    axis %= max(x.dim(), 1)
    return x.reshape(int(math.prod(x.shape[:axis])), -1)


def _squeeze(x: Tensor, axes: list[int] | None) -> Tensor:
    if not axes:
        return x.squeeze()
    for ax in sorted((ax % x.dim() for ax in axes), reverse=True):
        x = x.squeeze(ax)
    return x


def _unsqueeze(x: Tensor, axes: list[int]) -> Tensor:
    rank = x.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(ax)
    return x


@onnx_op("Squeeze")
def squeeze_1(x: Tensor, *, axes: list[int] | None = None) -> Tensor:
    return _squeeze(x, axes)


@onnx_op("Squeeze", since=13)
def squeeze(x: Tensor, axes: Tensor | None = None) -> Tensor:
    return _squeeze(x, _ints(axes) or None)


@onnx_op("Unsqueeze")
def unsqueeze_1(x: Tensor, *, axes: list[int]) -> Tensor:
    return _unsqueeze(x, axes)


@onnx_op("Unsqueeze", since=13)
def unsqueeze(x: Tensor, axes: Tensor) -> Tensor:
    return _unsqueeze(x, _ints(axes))


def _slice(x: Tensor, starts: list[int], ends: list[int], axes: list[int] | None,
           steps: list[int] | None) -> Tensor:
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
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


@onnx_op("Slice")
def slice_1(x: Tensor, *, axes: list[int] | None = None, ends: list[int],
            starts: list[int]) -> Tensor:
    return _slice(x, starts, ends, axes, None)


@onnx_op("Slice", since=10)
def slice_(x: Tensor, starts: Tensor, ends: Tensor, axes: Tensor | None = None,
           steps: Tensor | None = None) -> Tensor:
    return _slice(x, _ints(starts), _ints(ends), _ints(axes) or None, _ints(steps) or None)


def _split(x: Tensor, axis: int, sizes: list[int] | None, parts: int) -> tuple[Tensor, ...]:
    if not sizes:
        sizes = -(-x.shape[axis] // parts)
    return tuple(torch.split(x, sizes, dim=axis))


@onnx_op("Split", since=2)
def split_2(x: Tensor, *, axis: int = 0, split: list[int] | None = None,
            n_outputs: int) -> tuple[Tensor, ...]:
    return _split(x, axis, split, n_outputs)


@onnx_op("Split", since=13)
def split_13(x: Tensor, split: Tensor | None = None, *, axis: int = 0,
             n_outputs: int) -> tuple[Tensor, ...]:
    return _split(x, axis, _ints(split), n_outputs)


@onnx_op("Split", since=18)
def split_18(x: Tensor, split: Tensor | None = None, *, axis: int = 0,
             num_outputs: int | None = None, n_outputs: int) -> tuple[Tensor, ...]:
    return _split(x, axis, _ints(split), num_outputs or n_outputs)


@onnx_op("Concat", since=4)
def concat(*inputs: Tensor | None, axis: int) -> Tensor:
    return torch.cat([t for t in inputs if t is not None], dim=axis)


@onnx_op("Transpose")
def transpose(x: Tensor, *, perm: list[int] | None = None) -> Tensor:
    return x.permute(perm or list(reversed(range(x.dim()))))


@onnx_op("Expand", since=8)
def expand(x: Tensor, shape: Tensor) -> Tensor:
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


@onnx_op("Tile", since=6)
def tile(x: Tensor, repeats: Tensor) -> Tensor:
    return x.repeat(_ints(repeats))


@onnx_op("Shape")
def shape(x: Tensor, *, end: int | None = None, start: int = 0) -> Tensor:
    return torch.tensor(list(x.shape)[start:end], dtype=torch.int64)


@onnx_op("Size")
def size(x: Tensor) -> Tensor:
    return torch.tensor(x.numel(), dtype=torch.int64)


@onnx_op("Pad", since=2)
def pad_1(x: Tensor, *, mode: str = "constant", pads: list[int], value: float = 0.0) -> Tensor:
    return _pad(x, list(pads), value, None, mode)


@onnx_op("Pad", since=11)
def pad(x: Tensor, pads: Tensor, constant_value: Tensor | None = None, axes: Tensor | None = None,
        *, mode: str = "constant") -> Tensor:
    value = float(constant_value) if constant_value is not None and constant_value.numel() else 0.0
    return _pad(x, _ints(pads), value, _ints(axes) or None, mode)


def _pad(x: Tensor, pads: list[int], value: float, axes: list[int] | None, mode: str) -> Tensor:
    dims = x.dim()
    axes = axes if axes is not None else list(range(dims))
    full = [0] * (2 * dims)
    for k, ax in enumerate(axes):
        full[ax % dims], full[ax % dims + dims] = pads[k], pads[k + len(axes)]
    flat: list[int] = []
    for d in reversed(range(dims)):
        flat += [full[d], full[d + dims]]
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate",
                  "wrap": "circular"}[mode]
    return F.pad(x, flat, mode=torch_mode, value=value if torch_mode == "constant" else None)


# -- indexing -------------------------------------------------------------------------------------


@onnx_op("Gather")
def gather(x: Tensor, indices: Tensor, *, axis: int = 0) -> Tensor:
    axis %= x.dim()
    idx = indices.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))


@onnx_op("GatherElements")
def gather_elements(x: Tensor, indices: Tensor, *, axis: int = 0) -> Tensor:
    axis %= x.dim()
    idx = indices.long()
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))


@onnx_op("GatherND", since=11)
def gather_nd(x: Tensor, indices: Tensor, *, batch_dims: int = 0) -> Tensor:
    idx, b = indices.long(), batch_dims
    depth = idx.shape[-1]
    batch = x.shape[:b]
    flat_x = x.reshape(int(math.prod(batch)), *x.shape[b:])
    flat_idx = idx.reshape(int(math.prod(batch)), -1, depth)
    dims = torch.tensor(x.shape[b : b + depth])
    flat_idx = torch.where(flat_idx < 0, flat_idx + dims, flat_idx)
    picked = torch.stack([flat_x[n][tuple(flat_idx[n].unbind(-1))] for n in range(flat_x.shape[0])])
    return picked.reshape((*idx.shape[:-1], *x.shape[b + depth:]))


@onnx_op("Where", since=9)
def where(condition: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return torch.where(condition.bool(), x, y)


@onnx_op("Trilu", since=14)
def trilu(x: Tensor, k: Tensor | None = None, *, upper: int = 1) -> Tensor:
    diagonal = int(k.item()) if k is not None else 0
    return torch.triu(x, diagonal) if upper else torch.tril(x, diagonal)


# -- constants and types --------------------------------------------------------------------------


@onnx_op("Cast", since=6)
def cast(x: Tensor, *, to: int, saturate: int = 1, round_mode: str = "up") -> Tensor:
    target = ir.DataType(to)
    if target not in _CAST_TARGETS:
        raise NotImplementedError(f"Cast to {target.name}")
    return x.to(torch_dtype(target))


@onnx_op("CastLike", since=15)
def cast_like(x: Tensor, target_type: Tensor, *, saturate: int = 1,
              round_mode: str = "up") -> Tensor:
    return x.to(target_type.dtype)


@onnx_op("Constant")
def constant(*, value: Tensor | None = None, value_float: float | None = None,
             value_floats: list[float] | None = None, value_int: int | None = None,
             value_ints: list[int] | None = None) -> Tensor:
    if value is not None:
        return value
    for given, dtype in ((value_float, torch.float32), (value_floats, torch.float32),
                         (value_int, torch.int64), (value_ints, torch.int64)):
        if given is not None:
            return torch.tensor(given, dtype=dtype)
    raise NotImplementedError("Constant without a value")


@onnx_op("ConstantOfShape", since=9)
def constant_of_shape(shape: Tensor, *, value: Tensor | None = None) -> Tensor:
    fill = torch.zeros(1) if value is None else value
    return torch.full(_ints(shape), fill.reshape(-1)[0].item(), dtype=fill.dtype)


@onnx_op("Range", since=11)
def range_(start: Tensor, limit: Tensor, delta: Tensor) -> Tensor:
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


# -- element-wise ---------------------------------------------------------------------------------


@onnx_op("Clip", since=6)
def clip_1(x: Tensor, *, max: float | None = None, min: float | None = None) -> Tensor:
    return _clip(x, min, max)


@onnx_op("Clip", since=11)
def clip(x: Tensor, min: Tensor | None = None, max: Tensor | None = None) -> Tensor:
    return _clip(x, min, max)


def _clip(x: Tensor, lo: Tensor | float | None, hi: Tensor | float | None) -> Tensor:
    if lo is not None:
        x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype))
    if hi is not None:
        x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype))
    return x


@onnx_op("BitShift", since=11)
def bit_shift(x: Tensor, y: Tensor, *, direction: str) -> Tensor:
    a, n = x.to(torch.int64), y.to(torch.int64)
    return (a >> n if direction == "RIGHT" else a << n).to(x.dtype)


@onnx_op("Mod", since=10)
def mod(a: Tensor, b: Tensor, *, fmod: int = 0) -> Tensor:
    return torch.fmod(a, b) if fmod else torch.remainder(a, b)


def _div(x: Tensor, y: Tensor) -> Tensor:
    if x.dtype.is_floating_point or y.dtype.is_floating_point:
        return x / y
    return torch.div(x, y, rounding_mode="trunc")


@onnx_op("Dropout")
def dropout_1(data: Tensor, *, is_test: int = 0, ratio: float = 0.5, seed: int | None = None,
              ) -> Tensor:
    """Inference: the identity."""
    return data


@onnx_op("Dropout", since=12)
def dropout(data: Tensor, ratio: Tensor | None = None, training_mode: Tensor | None = None, *,
            seed: int | None = None) -> Tensor:
    """Inference: the identity (a training-mode Dropout is refused)."""
    if training_mode is not None and bool(training_mode.item()):
        raise NotImplementedError("Dropout with training_mode=true")
    return data


@onnx_op("Elu", since=6)
def elu(x: Tensor, *, alpha: float = 1.0) -> Tensor:
    return F.elu(x, alpha)


@onnx_op("LeakyRelu", since=6)
def leaky_relu(x: Tensor, *, alpha: float = 0.01) -> Tensor:
    return F.leaky_relu(x, alpha)


@onnx_op("HardSigmoid", since=6)
def hard_sigmoid(x: Tensor, *, alpha: float = 0.2, beta: float = 0.5) -> Tensor:
    return torch.clamp(alpha * x + beta, 0, 1)


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Op:
    def run(a: Tensor, b: Tensor) -> Tensor:
        return fn(a, b)

    return run


def _unary(fn: Callable[[Tensor], Tensor]) -> Op:
    def run(x: Tensor) -> Tensor:
        return fn(x)

    return run


def _variadic(fn: Callable[[Tensor, Tensor], Tensor], mean: bool = False) -> Op:
    def run(*inputs: Tensor) -> Tensor:
        out = inputs[0]
        for t in inputs[1:]:
            out = fn(out, t)
        return out / len(inputs) if mean else out

    return run


# No attributes in any version still current: an old node's attribute (broadcast, axis,
# consumed_inputs) is refused by the attribute check.
for _name, _fn in {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div,
                   "Pow": torch.pow, "MatMul": torch.matmul, "Equal": torch.eq, "Greater": torch.gt,
                   "GreaterOrEqual": torch.ge, "Less": torch.lt, "LessOrEqual": torch.le,
                   "And": torch.logical_and, "Or": torch.logical_or,
                   "Xor": torch.logical_xor}.items():
    _register(_name, _binary(_fn))
for _name, _fn in {"Abs": torch.abs, "Ceil": torch.ceil, "Cos": torch.cos, "Erf": torch.erf,
                   "Exp": torch.exp, "Floor": torch.floor, "HardSwish": F.hardswish,
                   "Identity": lambda x: x, "Log": torch.log, "Neg": torch.neg,
                   "Not": torch.logical_not, "Reciprocal": torch.reciprocal, "Relu": torch.relu,
                   "Round": torch.round, "Sigmoid": torch.sigmoid, "Sign": torch.sign,
                   "Sin": torch.sin, "Softplus": F.softplus, "Sqrt": torch.sqrt,
                   "Tanh": torch.tanh}.items():
    _register(_name, _unary(_fn))
for _name, _fn in {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add}.items():
    _register(_name, _variadic(_fn))
_register("Mean", _variadic(torch.add, mean=True))


# -- recurrent ------------------------------------------------------------------------------------


@onnx_op("LSTM", since=7)
def lstm(x: Tensor, w: Tensor, r: Tensor, b: Tensor | None = None,
         sequence_lens: Tensor | None = None, initial_h: Tensor | None = None,
         initial_c: Tensor | None = None, p: Tensor | None = None, *,
         activation_alpha: list[float] | None = None, activation_beta: list[float] | None = None,
         activations: list[str] | None = None, clip: float | None = None,
         direction: str = "forward", hidden_size: int | None = None, input_forget: int = 0,
         layout: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """ONNX LSTM (forward, reverse or bidirectional, default activations, gates i, o, f, c)."""
    if sequence_lens is not None:
        raise NotImplementedError("LSTM with sequence_lens")
    if layout or input_forget or clip or activations or p is not None:
        raise NotImplementedError("LSTM with layout, input_forget, clip, custom activations or "
                                  "peepholes")
    hidden = w.shape[1] // 4
    dirs = w.shape[0]
    batch = x.shape[1]
    h0 = initial_h if initial_h is not None else x.new_zeros(dirs, batch, hidden)
    c0 = initial_c if initial_c is not None else x.new_zeros(dirs, batch, hidden)
    ys, hs, cs = [], [], []
    for d in range(dirs):
        bias = 0.0 if b is None else b[d, : 4 * hidden] + b[d, 4 * hidden:]
        h, c = h0[d], c0[d]
        steps = range(x.shape[0]) if d == 0 and direction != "reverse" else \
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


def as_list(out: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]
