"""Lowering: an ONNX graph (int8 QDQ, binary weights, or float) -> a list of integer layers.

Every activation the design holds is a tensor of raw integers with a real-value mapping
``real = scale * (raw - zero_point)``: an int8 QDQ tensor keeps its QuantizeLinear scale and zero
point; a float tensor becomes fixed point ``ap_fixed<W,I>`` (scale ``2^-(W-I)``, zero point 0).
Each layer then computes in integers only:

    acc = sum((x - zp_x) * w) + bias                   (conv, dense; w int8, fixed, or +-1)
    y   = clamp(requant(acc, m_c, shift_c) + post_c, lo, hi)

where ``requant`` multiplies by the integer ``m_c`` and shifts right by ``shift_c`` rounding half
to even (as onnxruntime rounds), so ``m_c / 2^shift_c`` is the real multiplier
``s_x * s_w[c] / s_y`` to 31 significant bits. ``post_c`` is the output zero point (or, for binary
weights, the bias in output units). A Relu or Clip after a layer becomes its ``lo``/``hi``:
quantizing is monotone, so ``Q(relu(y)) = max(Q(y), Q(0))`` exactly.

The layer list (``layers``) is this backend's working form between the graph and the C++; nothing
else uses it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from slimgraph.backends.hls.layers import (
    ConvParams,
    DenseParams,
    Format,
    Layer,
    LayerParams,
    MergeParams,
    PoolParams,
    Requant,
    SigmoidParams,
    SoftmaxParams,
    Tensor,
    Weights,
    Window,
    bits_for,
)
from slimgraph.backends.hls.layout import to_hwc
from slimgraph.errors import BackendError, UnsupportedOpError
from slimgraph.model_stats import infer_shapes

DEFAULT_PRECISION = "ap_fixed<16,6>"
PRECISION = re.compile(r"ap_fixed<\s*([0-9]{1,2})\s*,\s*(-?[0-9]{1,2})\s*>")
MULTIPLIER_BITS = 31
LUT_INDEX_BITS = 10  # lookup tables index by the top 10 bits of a wider input
EXP_BITS = 16  # softmax's exp table: exp(-d) in unsigned 16-bit fixed point
HINTS = {
    "BatchNormalization": "fold-constants folds it into the Conv/Gemm before it",
    "Dropout": "fold-constants removes it",
}


def fixed_format(width: int, integer: int) -> Format:
    return Format(width, True, np.asarray(2.0 ** -(width - integer)))


def parse_precision(text: str) -> tuple[int, int]:
    match = PRECISION.fullmatch(text.strip())
    if not match or not 2 <= int(match.group(1)) <= 32 or not -32 <= int(match.group(2)) <= 64:
        raise BackendError(f"hls: precision {text!r} is not ap_fixed<W,I> with 2 <= W <= 32 and "
                           "-32 <= I <= 64")
    return int(match.group(1)), int(match.group(2))


def multiplier(real: np.ndarray, acc_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``real`` (float64, >= 0) -> integers m, shift with m / 2^shift == real to 31 bits.

    ``acc * m`` must fit in int64 for ``|acc| < 2^acc_bits``, so m keeps at most
    ``62 - acc_bits`` bits.
    """
    real = np.atleast_1d(np.asarray(real, np.float64))
    bits = max(2, min(MULTIPLIER_BITS, 62 - acc_bits))
    m = np.zeros(real.shape, np.int64)
    shift = np.zeros(real.shape, np.int64)
    for i, r in enumerate(real):
        if r <= 0:
            continue
        s = bits - 1 - math.floor(math.log2(r))
        if s < 0:
            raise BackendError(f"hls: a requantization multiplier {r:.4g} is too large")
        s = min(s, 62)
        m[i], shift[i] = round(r * 2.0 ** s), s
        if m[i] >= 1 << bits:  # rounding carried into the next power of two
            m[i], shift[i] = m[i] >> 1, s - 1
    return m, shift


def shared_multipliers(reals: list[float], acc_bits: int) -> tuple[list[int], int]:
    """Several multipliers with one shift (the inputs of an Add or Concat)."""
    top = max(reals)
    _, shift = multiplier(np.asarray([top]), acc_bits)
    s = int(shift[0])
    return [round(r * 2.0 ** s) for r in reals], s


class Lowering:
    """Walks the graph once in order and builds the layer list."""

    def __init__(self, model: ir.Model, precision: str | None, io: str) -> None:
        self.model = model
        self.graph = model.graph
        self.io = io
        # Float activations (binary-weight graphs, float graphs) are fixed point at this
        # precision; float *weights* need it given explicitly.
        self.fixed = parse_precision(precision or DEFAULT_PRECISION)
        self.explicit = precision is not None
        self.quantized: dict[str, str] = {}  # QuantizeLinear output -> the tensor holding it
        self.channels_last: dict[str, tuple[int, ...]] = {}  # io=stream: flattened [H, W, C]
        self.layers: list[Layer] = []
        self.tensors: dict[str, Tensor] = {}  # ONNX value name -> the tensor holding it
        self.pending: dict[str, Layer] = {}  # float results whose output format is not chosen
        self.constants: dict[str, np.ndarray] = {}
        self.float_layers: list[str] = []
        self.inputs: list[Tensor] = []

    # -- constants ---------------------------------------------------------------------------
    def const(self, value: ir.Value | None) -> np.ndarray | None:
        if value is None:
            return None
        if value.name in self.constants:
            return self.constants[value.name]
        if value.const_value is not None:
            array = value.const_value.numpy()
        else:
            node = value.producer()
            if node is None or node.op_type in ("QuantizeLinear",) or node.domain not in ("", "ai.onnx"):
                return None
            args = [self.const(v) for v in node.inputs]
            if any(a is None for a, v in zip(args, node.inputs, strict=True) if v is not None):
                return None
            array = _evaluate(node, args)[list(node.outputs).index(value)]
        self.constants[value.name] = array
        return array

    def dequantized_weight(self, value: ir.Value) -> tuple[np.ndarray, np.ndarray] | None:
        """``DequantizeLinear(q, scale[, 0])`` of constants -> (q as int64, per-channel scale)."""
        node = value.producer()
        if node is None or node.op_type != "DequantizeLinear":
            return None
        q, scale = self.const(node.inputs[0]), self.const(node.inputs[1])
        zero = self.const(node.inputs[2]) if len(node.inputs) > 2 else None
        if q is None or scale is None:
            return None
        if zero is not None and np.any(zero != 0):
            raise BackendError(f"hls: weight {value.name!r} has a non-zero zero point")
        return q.astype(np.int64), scale.astype(np.float64)

    # -- tensors -----------------------------------------------------------------------------
    def tensor(self, value: ir.Value) -> Tensor:
        """The realized tensor behind a float value (finalizing a pending layer if needed)."""
        if value.name in self.tensors:
            return self.tensors[value.name]
        if value.name in self.pending:
            return self.finalize(value.name, self.default_format(value.name))
        raise BackendError(f"hls: value {value.name!r} is neither an input nor computed")

    def default_format(self, name: str) -> Format:
        layer = self.pending[name]
        if layer.weights is not None and layer.weights.kind == "int8":  # an int8 layer's float
            return Format(32, True, np.asarray(layer.acc_scale, np.float64))  # result: its accumulator
        return fixed_format(*self.fixed)

    def new_tensor(self, name: str, shape: tuple[int, ...], fmt: Format) -> Tensor:
        return Tensor(name, tuple(int(d) for d in shape), fmt)

    def finalize(self, name: str, fmt: Format) -> Tensor:
        """Choose the output format of a pending layer: its requantization and clamp."""
        layer = self.pending.pop(name)
        layer.output = self.new_tensor(name, layer.output.shape, fmt)
        channels = layer.output.shape[0]
        if layer.kind in ("sigmoid", "softmax"):
            layer.params = lookup_tables(layer, fmt)
            layer.output = self.new_tensor(name, layer.output.shape, fmt)
            layer.lo, layer.hi = fmt.low, fmt.high
            self.layers.append(layer)
            self.tensors[name] = layer.output
            return layer.output
        if layer.kind in ("add", "concat"):
            reals = [float(t.fmt.scale) / float(fmt.scale) for t in layer.inputs]
            ms, shift = shared_multipliers(reals, layer.acc_bits)
            layer.params = MergeParams(ms)  # per input; the shift is shared, applied after the sum
            layer.requant = Requant(np.ones(channels, np.int64), np.full(channels, shift),
                                    np.full(channels, fmt.zero_point))
        else:
            real = np.broadcast_to(layer.acc_scale, (channels,)) / np.broadcast_to(
                fmt.scale, (channels,))
            if fmt.scale.ndim:  # the accumulator is the output: no requantization
                m, shift = np.ones(channels, np.int64), np.zeros(channels, np.int64)
            else:
                m, shift = multiplier(real, layer.acc_bits)
            post = np.full(channels, fmt.zero_point, np.int64)
            bias_out = layer.weights.bias_out if layer.weights is not None else None
            if bias_out is not None:  # binary weights: the bias in output units
                post = post + np.round(bias_out / fmt.scale).astype(np.int64)
            layer.requant = Requant(m, shift, post)
        lo, hi = layer.clip
        layer.lo, layer.hi = fmt.low, fmt.high
        if fmt.scale.ndim == 0:
            layer.lo, layer.hi = fmt.code(lo), fmt.code(hi)
        self.layers.append(layer)
        self.tensors[name] = layer.output
        return layer.output

    def alias(self, value: ir.Value, tensor: Tensor) -> None:
        self.tensors[value.name] = tensor

    # -- the walk ----------------------------------------------------------------------------
    def run(self) -> tuple[list[Tensor], list[Tensor], list[Layer]]:
        self.check_supported()
        if len(self.graph.inputs) != 1 or len(self.graph.outputs) != 1:
            raise BackendError("hls: the top function takes one input and one output; this graph "
                               f"has {len(self.graph.inputs)} and {len(self.graph.outputs)}")
        for value in self.graph.inputs:
            self.inputs.append(self.lower_input(value))
        for node in self.graph:
            if all(self.const(v) is not None for v in node.outputs):
                continue
            LOWERINGS[node.op_type](self, node)  # check_supported let only these through
        outputs = [self.tensor(v) for v in self.graph.outputs]
        return self.inputs, outputs, self.layers

    def check_supported(self) -> None:
        bad = []
        for node in self.graph:
            if node.op_type in SUPPORTED and node.domain in ("", "ai.onnx"):
                continue
            if all(self.const(v) is not None for v in node.outputs):
                continue
            hint = HINTS.get(node.op_type)
            bad.append(f"{node.name or node.outputs[0].name} ({node.op_type})"
                       + (f": {hint}" if hint else ""))
        if bad:
            raise UnsupportedOpError(
                "hls: the emitter does not support these nodes: " + "; ".join(bad)
                + f" (supported: {', '.join(sorted(SUPPORTED))})")

    def lower_input(self, value: ir.Value) -> Tensor:
        shape = tuple(value.shape)[1:]
        if not all(isinstance(d, int) for d in shape):
            raise BackendError(f"hls: input {value.name!r} needs a static shape past the batch "
                               f"axis, got {value.shape}")
        consumers = list(value.uses())
        quantizers = [u.node for u in consumers if u.node.op_type == "QuantizeLinear"]
        if quantizers and len(quantizers) == len(consumers):
            fmt = self.q_format(quantizers[0])
            tensor = self.new_tensor(value.name, shape, fmt)
            for q in quantizers:
                if not self.q_format(q).same(fmt):
                    raise BackendError(f"hls: input {value.name!r} is quantized two ways")
                self.alias(q.outputs[0], tensor)
        else:
            tensor = self.new_tensor(value.name, shape, fixed_format(*self.fixed))
        self.alias(value, tensor)
        return tensor

    def q_format(self, node: ir.Node) -> Format:
        scale = self.const(node.inputs[1])
        zero = self.const(node.inputs[2]) if len(node.inputs) > 2 else None
        if scale is None or scale.size != 1:
            raise BackendError(f"hls: {node.name!r}: activations take one constant scale")
        dtype = zero.dtype if zero is not None else np.dtype(np.uint8)
        if dtype not in (np.int8, np.uint8):
            raise BackendError(f"hls: {node.name!r}: activations are int8 or uint8, not {dtype}")
        return Format(8, dtype == np.int8, np.asarray(float(scale.reshape(())), np.float64),
                      0 if zero is None else int(zero.reshape(())))

    def op_Identity(self, node: ir.Node) -> None:
        self.forward(node.inputs[0], node.outputs[0])

    def forward(self, source: ir.Value, target: ir.Value) -> None:
        if source.name in self.pending and len(list(source.uses())) == 1:
            self.pending[target.name] = self.pending.pop(source.name)
        else:
            self.alias(target, self.tensor(source))

    def op_QuantizeLinear(self, node: ir.Node) -> None:
        fmt = self.q_format(node)
        source = node.inputs[0]
        self.quantized[node.outputs[0].name] = node.outputs[0].name
        if source.name in self.pending:
            self.alias(node.outputs[0], self.finalize(source.name, fmt))
            return
        tensor = self.tensor(source)
        if tensor.fmt.same(fmt):
            self.alias(node.outputs[0], tensor)
            return
        layer = Layer("requant", node.name, [tensor], tensor, node=node.name,
                      acc_scale=tensor.fmt.scale, acc_bits=tensor.fmt.bits + 1)
        self.pending[node.outputs[0].name] = layer
        self.alias(node.outputs[0], self.finalize(node.outputs[0].name, fmt))

    def op_DequantizeLinear(self, node: ir.Node) -> None:
        tensor = self.tensor(node.inputs[0])
        fmt = self.q_format(node)
        if fmt.same(tensor.fmt):
            self.alias(node.outputs[0], tensor)
        else:  # the same raw integers read with another scale
            self.alias(node.outputs[0], Tensor(tensor.name, tensor.shape, fmt))

    def op_Relu(self, node: ir.Node) -> None:
        self.clip(node, 0.0, math.inf)

    def op_Clip(self, node: ir.Node) -> None:
        lo = self.const(node.inputs[1]) if len(node.inputs) > 1 else None
        hi = self.const(node.inputs[2]) if len(node.inputs) > 2 else None
        self.clip(node, -math.inf if lo is None else float(lo), math.inf if hi is None else float(hi))

    def clip(self, node: ir.Node, lo: float, hi: float) -> None:
        source = node.inputs[0]
        if source.name in self.pending and len(list(source.uses())) == 1:
            layer = self.pending.pop(source.name)
            old_lo, old_hi = layer.clip
            layer.clip = (max(lo, old_lo), min(hi, old_hi))
            self.pending[node.outputs[0].name] = layer
            return
        tensor = self.tensor(source)
        fmt = tensor.fmt
        layer = Layer("clamp", node.name, [tensor], self.new_tensor(node.outputs[0].name,
                                                                  tensor.shape, fmt), node=node.name)
        layer.lo, layer.hi = fmt.code(lo), fmt.code(hi)
        self.layers.append(layer)
        self.alias(node.outputs[0], layer.output)

    def uniform(self, tensor: Tensor, node: ir.Node) -> Tensor:
        """A tensor with one scale and at most 16 bits (a table index): requantized if not."""
        if tensor.fmt.scale.ndim == 0 and tensor.fmt.bits <= 16:
            return tensor
        name = f"{node.name}_input"
        self.pending[name] = Layer("requant", name, [tensor], tensor, node=node.name,
                                   acc_scale=tensor.fmt.scale, acc_bits=tensor.fmt.bits + 1)
        return self.finalize(name, fixed_format(*self.fixed))

    def op_Sigmoid(self, node: ir.Node) -> None:
        x = self.uniform(self.tensor(node.inputs[0]), node)
        self.pending[node.outputs[0].name] = Layer("sigmoid", node.name, [x],
                                                   Tensor("", x.shape, x.fmt), node=node.name)

    def op_Softmax(self, node: ir.Node) -> None:
        x = self.uniform(self.tensor(node.inputs[0]), node)
        if len(x.shape) != 1 or node.attributes.get_int("axis", -1) not in (-1, 1):
            raise BackendError(f"hls: {node.name!r}: Softmax is supported over the last axis of "
                               "a [batch, N] tensor")
        self.pending[node.outputs[0].name] = Layer("softmax", node.name, [x],
                                                   Tensor("", x.shape, x.fmt), node=node.name)

    def op_Sign(self, node: ir.Node) -> None:
        tensor = self.tensor(node.inputs[0])
        out = self.new_tensor(node.outputs[0].name, tensor.shape, Format(2, True, np.asarray(1.0)))
        self.layers.append(Layer("sign", node.name, [tensor], out, node=node.name, lo=-1, hi=1))
        self.alias(node.outputs[0], out)

    def reshape(self, node: ir.Node) -> None:
        shape = node.outputs[0].shape
        if shape is None or not all(isinstance(d, int) for d in tuple(shape)[1:]):
            raise BackendError(f"hls: {node.name!r}: the output shape must be static")
        new = tuple(shape)[1:]
        source = node.inputs[0]
        pending = self.pending.get(source.name)
        if pending is not None and len(list(source.uses())) == 1 and new and \
                new[0] == pending.output.shape[0] and np.prod(new) == np.prod(pending.output.shape):
            pending.output = Tensor("", new, pending.output.fmt)  # same memory, same channels
            self.pending[node.outputs[0].name] = self.pending.pop(source.name)
            return
        tensor = self.tensor(source)
        if int(np.prod(new)) != tensor.size:
            raise BackendError(f"hls: {node.name!r} changes the per-sample size")
        out = Tensor(tensor.name, new, tensor.fmt)
        if self.io == "stream" and len(tensor.shape) == 3 and tensor.shape[1] * tensor.shape[2] > 1:
            self.channels_last[out.name] = tensor.shape  # a stream flattens in (H, W, C) order
        self.alias(node.outputs[0], out)

    def op_MaxPool(self, node: ir.Node) -> None:
        tensor = self.tensor(node.inputs[0])
        self.maximum(node, tensor, _window(node, tensor.shape))

    def op_GlobalMaxPool(self, node: ir.Node) -> None:
        tensor = self.tensor(node.inputs[0])
        self.maximum(node, tensor, _global_window(tensor.shape))

    def maximum(self, node: ir.Node, tensor: Tensor, window: Window) -> None:
        out = self.new_tensor(node.outputs[0].name, (tensor.shape[0], *window.out), tensor.fmt)
        self.layers.append(Layer("maxpool", node.name, [tensor], out, PoolParams(window),
                                 tensor.fmt.low, tensor.fmt.high, node=node.name))
        self.alias(node.outputs[0], out)

    def average(self, node: ir.Node, window: Window) -> None:
        tensor = self.tensor(node.inputs[0])
        count = window.kernel[0] * window.kernel[1]
        shape = (tensor.shape[0], *window.out)
        if node.op_type == "ReduceMean" and node.attributes.get_int("keepdims", 1) == 0:
            shape = (tensor.shape[0],)
        self.pending[node.outputs[0].name] = Layer(
            "avgpool", node.name, [tensor], Tensor("", shape, tensor.fmt), PoolParams(window),
            node=node.name, acc_scale=tensor.fmt.scale / count,
            acc_bits=bits_for(count * (tensor.fmt.high - tensor.fmt.low)))

    def op_AveragePool(self, node: ir.Node) -> None:
        tensor = self.tensor(node.inputs[0])
        window = _window(node, tensor.shape)
        if any(window.pads):
            raise BackendError(f"hls: {node.name!r}: padded AveragePool is not supported")
        self.average(node, window)

    def op_GlobalAveragePool(self, node: ir.Node) -> None:
        self.average(node, _global_window(self.tensor(node.inputs[0]).shape))

    def op_ReduceMean(self, node: ir.Node) -> None:
        tensor = self.tensor(node.inputs[0])
        axes = self.const(node.inputs[1]) if len(node.inputs) > 1 else None
        if axes is None:
            attr = node.attributes.get("axes")
            axes = None if attr is None else np.asarray(attr.as_ints())
        if axes is None or len(tensor.shape) != 3 or sorted(int(a) % 4 for a in axes) != [2, 3]:
            raise BackendError(f"hls: {node.name!r}: ReduceMean is supported over H and W only")
        self.average(node, _global_window(tensor.shape))

    def op_Add(self, node: ir.Node) -> None:
        a, b = (self.tensor(v) for v in node.inputs)
        if a.shape != b.shape:
            raise BackendError(f"hls: {node.name!r}: Add needs equal shapes, got {a.shape} and "
                               f"{b.shape}")
        bound = max(t.fmt.high - t.fmt.low for t in (a, b))
        self.pending[node.outputs[0].name] = Layer(
            "add", node.name, [a, b], Tensor("", a.shape, a.fmt), node=node.name,
            acc_bits=bits_for(bound) + MULTIPLIER_BITS + 1)

    def op_Concat(self, node: ir.Node) -> None:
        parts = [self.tensor(v) for v in node.inputs]
        axis = node.attributes.get_int("axis", 1)
        if axis not in (1, -3 if len(parts[0].shape) == 3 else 1) or \
                any(p.shape[1:] != parts[0].shape[1:] for p in parts):
            raise BackendError(f"hls: {node.name!r}: Concat is supported along channels")
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        bound = max(p.fmt.high - p.fmt.low for p in parts)
        self.pending[node.outputs[0].name] = Layer(
            "concat", node.name, parts, Tensor("", shape, parts[0].fmt), node=node.name,
            acc_bits=bits_for(bound) + MULTIPLIER_BITS + 1)

    def weights(self, node: ir.Node, value: ir.Value, x: Tensor,
                channels_axis: int) -> tuple[np.ndarray, np.ndarray, str]:
        """The weight as integers with its per-output-channel scale, and its kind."""
        found = self.dequantized_weight(value)
        if found is not None:
            q, scale = found
            channels = q.shape[channels_axis]
            return q, np.broadcast_to(scale.reshape(-1), (channels,)).astype(np.float64), "int8"
        w = self.const(value)
        if w is None:
            raise BackendError(f"hls: {node.name!r}: the weight is not a constant")
        w = w.astype(np.float64)
        moved = np.moveaxis(w, channels_axis, 0).reshape(w.shape[channels_axis], -1)
        alpha = np.abs(moved).max(axis=1)
        if np.all(np.abs(moved) == alpha[:, None]) and np.all(alpha > 0):
            return np.sign(w).astype(np.int64), alpha, "binary"
        if not self.explicit:
            self.float_layers.append(f"{node.name} ({node.op_type})")
            return np.zeros(w.shape, np.int64), np.ones(w.shape[channels_axis]), "float"
        width, integer = self.fixed
        frac = width - integer
        limit = (1 << (width - 1)) - 1
        q = np.clip(np.rint(w * 2.0 ** frac), -limit - 1, limit).astype(np.int64)
        return q, np.full(w.shape[channels_axis], 2.0 ** -frac), "fixed"

    def linear(self, node: ir.Node, kind: str, x: Tensor, q: np.ndarray, w_scale: np.ndarray,
               w_kind: str, bias: ir.Value | None, shape: tuple[int, ...],
               params: Callable[[Weights], LayerParams]) -> None:
        """A pending conv or dense layer; ``params`` makes its parameters from its weights."""
        channels = q.shape[0]
        if x.fmt.scale.ndim:
            raise BackendError(f"hls: {node.name!r} ({node.op_type}) reads a float result with one "
                               "scale per channel (an int8 layer whose output is not quantized); "
                               "quantize this layer too, or the layer before it not at all")
        acc_scale = float(x.fmt.scale) * w_scale
        bias_acc = np.zeros(channels, np.int64)
        bias_out = None
        if bias is not None:
            found = self.dequantized_weight(bias)
            b = self.const(bias)
            if b is None:
                raise BackendError(f"hls: {node.name!r}: the bias is not a constant")
            b = b.astype(np.float64).reshape(-1)
            if found is not None and np.allclose(np.broadcast_to(found[1], (channels,)),
                                                 acc_scale, rtol=1e-6, atol=0):
                bias_acc = found[0].reshape(-1)
            elif w_kind == "binary":
                bias_out = b
            else:
                bias_acc = np.rint(b / acc_scale).astype(np.int64)
        span = max(abs(x.fmt.low - x.fmt.zero_point), abs(x.fmt.high - x.fmt.zero_point))
        per_output = np.abs(q.reshape(channels, -1)).sum(axis=1)
        bound = float((per_output * span + np.abs(bias_acc)).max())
        macs = int(np.prod(q.shape[1:])) * int(np.prod(shape))
        self.pending[node.outputs[0].name] = Layer(
            kind, node.name, [x], Tensor("", shape, x.fmt),
            params(Weights(q, w_kind, bias_acc, bias_out)), node=node.name, macs=macs,
            acc_scale=acc_scale, acc_bits=bits_for(bound))

    def op_Conv(self, node: ir.Node) -> None:
        x = self.tensor(node.inputs[0])
        q, scale, kind = self.weights(node, node.inputs[1], x, 0)
        window = _window(node, x.shape, kernel=tuple(q.shape[2:]))
        groups = node.attributes.get_int("group", 1)
        if q.shape[1] * groups != x.shape[0]:
            raise BackendError(f"hls: {node.name!r}: weight {q.shape} does not fit input {x.shape}")
        self.linear(node, "conv", x, q, scale, kind, node.inputs[2] if len(node.inputs) > 2 else None,
                    (q.shape[0], *window.out), lambda weights: ConvParams(weights, window, groups))

    def op_Gemm(self, node: ir.Node) -> None:
        if node.attributes.get_int("transA", 0) or node.attributes.get_float("alpha", 1.0) != 1.0 \
                or node.attributes.get_float("beta", 1.0) != 1.0:
            raise BackendError(f"hls: {node.name!r}: Gemm with transA, alpha or beta != 1")
        self.dense(node, node.inputs[1], bool(node.attributes.get_int("transB", 0)),
                   node.inputs[2] if len(node.inputs) > 2 else None)

    def op_MatMul(self, node: ir.Node) -> None:
        self.dense(node, node.inputs[1], False, None)

    def dense(self, node: ir.Node, weight: ir.Value, transposed: bool, bias: ir.Value | None) -> None:
        x = self.tensor(node.inputs[0])
        q, scale, kind = self.weights(node, weight, x, 0 if transposed else 1)
        if q.ndim != 2:
            raise BackendError(f"hls: {node.name!r}: the weight must be 2-D")
        if not transposed:
            q = q.T
        if q.shape[1] != x.size:
            raise BackendError(f"hls: {node.name!r}: weight {q.shape} does not fit input {x.shape}")
        source = self.channels_last.get(x.name) if x.shape != self.source_shape(x) else None
        if source is not None:  # the stream delivers (H, W, C): reorder the weight's columns
            q = to_hwc(q.reshape(-1, *source)).reshape(q.shape[0], -1)
        self.linear(node, "dense", x, q, scale, kind, bias, (q.shape[0],), DenseParams)

    def source_shape(self, tensor: Tensor) -> tuple[int, ...]:
        return self.channels_last.get(tensor.name, tensor.shape)


# The ONNX ops the backend lowers, each to the method that lowers it.
LOWERINGS: dict[str, Callable[[Lowering, ir.Node], None]] = {
    "QuantizeLinear": Lowering.op_QuantizeLinear, "DequantizeLinear": Lowering.op_DequantizeLinear,
    "Conv": Lowering.op_Conv, "Gemm": Lowering.op_Gemm, "MatMul": Lowering.op_MatMul,
    "MaxPool": Lowering.op_MaxPool, "GlobalMaxPool": Lowering.op_GlobalMaxPool,
    "AveragePool": Lowering.op_AveragePool, "GlobalAveragePool": Lowering.op_GlobalAveragePool,
    "ReduceMean": Lowering.op_ReduceMean, "Add": Lowering.op_Add, "Concat": Lowering.op_Concat,
    "Sign": Lowering.op_Sign, "Identity": Lowering.op_Identity, "Sigmoid": Lowering.op_Sigmoid,
    "Softmax": Lowering.op_Softmax, "Relu": Lowering.op_Relu, "Clip": Lowering.op_Clip,
    "Reshape": Lowering.reshape, "Flatten": Lowering.reshape, "Squeeze": Lowering.reshape,
    "Unsqueeze": Lowering.reshape,
}
SUPPORTED = frozenset(LOWERINGS)


@dataclasses.dataclass
class Lowered:
    inputs: list[Tensor]
    outputs: list[Tensor]
    layers: list[Layer]
    quantized: dict[str, Tensor]  # each QuantizeLinear output of the graph -> its tensor
    stream: bool
    precision: str | None = None


def lower(model: ir.Model, precision: str | None = None, io: str = "parallel") -> Lowered:
    """The graph as integer layers, or UnsupportedOpError / BackendError before anything is written."""
    model = model.clone()
    infer_shapes(model)  # shapes the graph does not carry (Flatten, Reshape)
    lowering = Lowering(model, precision, io)
    inputs, outputs, layers = lowering.run()
    if lowering.float_layers:
        raise UnsupportedOpError(
            "hls: these layers have float weights: " + "; ".join(lowering.float_layers)
            + ". Run quantize (int8 or binary) first, or pass precision=ap_fixed<W,I> to emit "
            "them in fixed point")
    produced = [t.name for t in inputs] + [layer.output.name for layer in layers]
    twice = sorted({name for name in produced if produced.count(name) > 1})
    if twice:  # tensors are keyed by their ONNX value names (the emitter makes C names)
        raise BackendError(f"hls: value names defined twice: {', '.join(map(repr, twice))}")
    quantized = {name: lowering.tensors[name] for name in lowering.quantized
                 if name in lowering.tensors}
    return Lowered(inputs, outputs, layers, quantized, io == "stream", precision)


def lookup_tables(layer: Layer, out: Format) -> SigmoidParams | SoftmaxParams:
    """Sigmoid: out.code(sigmoid(x)) for each input code (or each bin of ``2^drop`` codes, read at
    its centre). Softmax: exp(-d) in 16-bit fixed point for each distance d (in input codes,
    binned the same way) from the row's maximum, and the divider ``m = round(2^16 / s_out)``:
    ``y = (e * m + S / 2) // S + zero_point`` with ``S = 2^16 * sum(e)``."""
    fmt = layer.inputs[0].fmt
    drop = max(0, fmt.bits - LUT_INDEX_BITS)
    entries = 1 << (fmt.bits - drop)
    centre = (1 << drop) // 2
    if layer.kind == "sigmoid":
        raw = fmt.low + (np.arange(entries) << drop) + centre
        real = float(fmt.scale) * (raw - fmt.zero_point)
        table = [out.code(float(v)) for v in 1.0 / (1.0 + np.exp(-real))]
        return SigmoidParams(drop, np.asarray(table, np.int64))
    distance = (np.arange(entries) << drop) + (centre if drop else 0)
    table = np.rint(np.exp(-float(fmt.scale) * distance) * (1 << EXP_BITS)).astype(np.int64)
    return SoftmaxParams(drop, table, round(2.0 ** EXP_BITS / float(out.scale)))


def _window(node: ir.Node, shape: tuple[int, ...], kernel: tuple[int, ...] | None = None
            ) -> Window:
    if len(shape) != 3:
        raise BackendError(f"hls: {node.name!r}: expects a [C, H, W] input, got {shape}")
    attrs = node.attributes
    kernel = tuple(kernel or attrs.get_ints("kernel_shape"))
    strides = tuple(attrs.get_ints("strides", [1, 1]))
    dilations = tuple(attrs.get_ints("dilations", [1, 1]))
    pads = tuple(attrs.get_ints("pads", [0, 0, 0, 0]))
    if attrs.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or dilations != (1, 1) \
            or attrs.get_int("ceil_mode", 0):
        raise BackendError(f"hls: {node.name!r}: auto_pad SAME, dilation and ceil_mode are not "
                           "supported")
    _, h, w = shape
    out = ((h + pads[0] + pads[2] - kernel[0]) // strides[0] + 1,
           (w + pads[1] + pads[3] - kernel[1]) // strides[1] + 1)
    return Window(kernel, strides, pads, out)


def _global_window(shape: tuple[int, ...]) -> Window:
    _, h, w = shape
    return Window((h, w), (1, 1), (0, 0, 0, 0), (1, 1))


def _evaluate(node: ir.Node, args: list[np.ndarray | None]) -> list[np.ndarray]:
    """One constant node evaluated by onnx's reference implementation."""
    proto = ir.serde.serialize_node(node)
    names = [v.name if v is not None else "" for v in node.inputs]
    graph = onnx.helper.make_graph(
        [proto], "const",
        [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype),
                                            a.shape) for n, a in zip(names, args, strict=True) if n],
        [onnx.helper.make_tensor_value_info(v.name, 0, None) for v in node.outputs])
    opset = node.version or 21
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", max(opset, 21))])
    feeds = {n: a for n, a in zip(names, args, strict=True) if n}
    return ReferenceEvaluator(model).run(None, feeds)
