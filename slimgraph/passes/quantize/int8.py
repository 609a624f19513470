"""int8: calibrated QuantizeLinear/DequantizeLinear pairs (static) or run-time activation scales.

Activations (asymmetric, per tensor). A calibrated range [a, b] is widened to hold 0, then

    scale = (b - a) / (qmax - qmin)        zp = clip(round(qmin - a / scale), qmin, qmax)

with [qmin, qmax] = [0, 255] for uint8 and [-128, 127] for int8. A Relu whose producer is
quantized is folded into the range: its output range starts at 0, so zp = qmin and the saturating
QuantizeLinear clamps negatives exactly as the Relu did.

Weights (symmetric, per output channel c): ``s_c = max|W_c| / Q`` and ``W_q = clip(round(W / s_c),
-Q, Q)``, Q = 127 (63 with ``reduce_range``: 7-bit weights keep u8 x s8 pair sums inside int16 on
AVX2/AVX-512 CPUs without VNNI). ``weight_scales=auto`` keeps one scale ``max|W| / Q`` for a
layer whose relative weight error ``||W - s W_q|| / ||W||`` per tensor is at most
``TENSOR_SCALE_SLACK`` times the per-channel one and below 1% (saves C scales and C zero points);
static weight scales are rounded up to float16 values and stored so. The channel axis is where
output channels live: Conv W[M, C, k..] -> 0; Gemm W[N, K] (transB=1) -> 0, W[K, N] (transB=0)
-> 1; MatMul W[K, N] -> 1. A bias b becomes int32 with scale ``s_x * s_c`` and zero point 0, the
form onnxruntime's fused kernels take; ``s_x * s_c`` is a Mul of the two scale initializers
(folded at load), not stored.

Placement is a global analysis (hand-written, not rewrite rules): the layers (Conv, Gemm, MatMul
with a constant weight) are quantized; an Add, Concat or pooling joins them in int8 when one of its
inputs comes from a quantized node; data-movement ops (MaxPool, Flatten, Reshape, Transpose, ...)
pass int8 through with their input's parameters so onnxruntime drops the Q/DQ around them. Every
other op (LayerNorm, Softmax, GELU, ...) stays float.

Dynamic mode (``dynamic=true``) quantizes weights offline and activations at run time in the form
onnxruntime fuses into DynamicQuantizeMatMul:
``DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q, x_zp, 0) -> Cast -> Mul(x_scale * s)``.
Only MatMul and Gemm: onnxruntime has no u8s8 ConvInteger kernel on CPU, so Conv stays float.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from slimgraph.passes.quantize.layers import (
    FLOAT,
    LAYER_OPS,
    Counts,
    Namer,
    add_initializer,
    add_stored_as,
    constant_weight,
    fp16_ceil,
    is_float_activation,
    layer_ids,
    replace_node,
    weight_axis,
)
from slimgraph.passes.quantize.rounding import InputStatistics, round_layer

_JOIN_OPS = frozenset({"Add", "Concat", "AveragePool", "GlobalAveragePool"})
_PASSTHROUGH_OPS = frozenset(
    {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "GlobalMaxPool"}
)


@dataclasses.dataclass(frozen=True)
class Int8Target:
    """The integer kernels to aim for: activation type, 7-bit weights or not, and why."""

    activations: ir.DataType  # UINT8 (U8S8 kernels) or INT8 (S8S8)
    reduce_range: bool
    reason: str

    def describe(self) -> str:
        kind = "U8S8" if self.activations == ir.DataType.UINT8 else "S8S8"
        return f"{kind} activations, reduce_range={str(self.reduce_range).lower()} ({self.reason})"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The instruction-set flags of the first CPU, or None where /proc/cpuinfo has none."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def int8_target(flags: set[str] | None) -> Int8Target:
    """U8S8 where x86 has it fast (VNNI), U8S8 with 7-bit weights on older AVX2, S8S8 elsewhere."""
    if flags is None:
        return Int8Target(ir.DataType.INT8, False, "no x86 flags found: S8S8 kernels (ARM sdot)")
    vnni = sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    if vnni:
        return Int8Target(ir.DataType.UINT8, False, f"x86 with {'+'.join(vnni)}")
    if "avx2" in flags:
        return Int8Target(
            ir.DataType.UINT8, True, "x86 AVX2 without VNNI: 7-bit weights avoid int16 saturation"
        )
    return Int8Target(ir.DataType.UINT8, False, "x86 without AVX2")


@dataclasses.dataclass(frozen=True)
class QParams:
    """Per-tensor affine parameters of one activation."""

    scale: float
    zero_point: int
    dtype: ir.DataType


def activation_qparams(low: float, high: float, dtype: ir.DataType) -> QParams:
    """Asymmetric parameters for the range [low, high] widened to hold 0 (module docstring)."""
    qmin, qmax = (0, 255) if dtype == ir.DataType.UINT8 else (-128, 127)
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if high - low <= 0 or not np.isfinite(high - low):
        return QParams(1.0, qmin if low == 0 else (qmin + qmax + 1) // 2, dtype)
    scale = (high - low) / (qmax - qmin)
    zero_point = int(np.clip(np.round(qmin - low / scale), qmin, qmax))
    return QParams(float(np.float32(scale)), zero_point, dtype)


def quantize_weight(
    weight: np.ndarray, axis: int, reduce_range: bool = False, half_scales: bool = False,
    min_scales: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 weights along ``axis``: (int8 values, float32 scales).

    ``half_scales`` rounds the scales up to float16 values (where all fit) before quantizing;
    ``min_scales`` (per channel) is a floor under the scales (see ``bias_scale_floor``).
    """
    qmax = 63 if reduce_range else 127
    moved = np.moveaxis(weight.astype(np.float64), axis, 0)
    amax = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1)
    scales = np.where(amax > 0, amax / qmax, 1.0)
    if min_scales is not None:
        scales = np.maximum(scales, np.broadcast_to(min_scales, scales.shape))
    scales = scales.astype(np.float32)
    if half_scales:
        scales = fp16_ceil(scales) if fp16_ceil(scales) is not None else scales
    shape = [1] * weight.ndim
    shape[axis] = -1
    q = np.clip(np.round(weight / scales.reshape(shape).astype(np.float64)), -qmax, qmax)
    return q.astype(np.int8), scales


TENSOR_SCALE_SLACK = 1.5
WEIGHT_SCALES = ("auto", "channel", "tensor")


def _relative_error(weight: np.ndarray, q: np.ndarray, scales: np.ndarray, axis: int) -> float:
    shape = [1] * weight.ndim
    shape[axis] = -1
    norm = float(np.linalg.norm(weight))
    return float(np.linalg.norm(weight - q * scales.reshape(shape))) / norm if norm else 0.0


def per_tensor_suffices(weight: np.ndarray, axis: int, reduce_range: bool = False) -> bool:
    """Whether one scale for the whole weight loses nothing that matters (module docstring)."""
    q, scales = quantize_weight(weight, axis, reduce_range)
    whole = np.moveaxis(weight, axis, 0).reshape(1, -1)
    qt, st = quantize_weight(whole, 0, reduce_range)
    per_channel = _relative_error(weight, q, scales, axis)
    per_tensor = _relative_error(whole, qt, st, 0)
    return per_tensor <= max(TENSOR_SCALE_SLACK * per_channel, 1e-6) and per_tensor < 0.01


@dataclasses.dataclass
class _Placement:
    """The int8 region: nodes that run in int8, values quantized, Relus folded into ranges."""

    layers: list[ir.Node]
    int8_nodes: set[ir.Node]
    folded_relus: dict[ir.Value, ir.Node]  # producer output -> the Relu that is folded away
    range_of: dict[ir.Value, str]  # quantized value -> the value whose range / params it takes
    quantized: list[ir.Value]  # in topological order
    float_out: set[ir.Value]  # outputs of int8 nodes left float for a layer kept float


def place(graph: ir.Graph, dtypes: dict[str, ir.DataType], keep_float: set[str]) -> _Placement:
    ids = layer_ids(graph)
    layers = [
        n for n in graph
        if n.op_type in LAYER_OPS and n.domain in ("", "ai.onnx") and ids[n] not in keep_float
        and constant_weight(n) is not None and is_float_activation(n.inputs[0], dtypes)
    ]
    int8_nodes = set(layers)
    # Layers kept float read a float input: what produces it does not quantize its output for them.
    float_layers = {n for n in graph if n.op_type in LAYER_OPS and ids[n] in keep_float}

    def read_by_float_layer(value: ir.Value) -> bool:  # directly or through a Relu / ReLU6
        return any(user in float_layers or _foldable_activation(user) and user.outputs
                   and read_by_float_layer(user.outputs[0]) for user, _ in value.uses())

    int8_values: set[ir.Value] = set()  # values available in int8 (outputs of int8 nodes)
    folded: dict[ir.Value, ir.Node] = {}
    range_of: dict[ir.Value, str] = {}
    for node in graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        acts = [v for v in node.inputs if is_float_activation(v, dtypes)]
        if (_foldable_activation(node) and acts and acts[0].producer() in int8_nodes
                and not read_by_float_layer(node.outputs[0])):
            y = acts[0]
            if len(y.uses()) == 1 and not y.is_graph_output() and not node.outputs[0].is_graph_output():
                folded[y] = node
                range_of[y] = node.outputs[0].name
                int8_values.add(node.outputs[0])
            continue
        constant_input = any(v is not None and v.const_value is not None for v in node.inputs)
        if node.op_type in _JOIN_OPS and not constant_input and any(v in int8_values for v in acts):
            int8_nodes.add(node)
        elif node.op_type in _PASSTHROUGH_OPS and acts and node.inputs[0] in int8_values:
            int8_nodes.add(node)
            source = node.inputs[0]
            range_of[node.outputs[0]] = range_of.get(source, source.name)
        if node in int8_nodes:
            int8_values.update(v for v in node.outputs if dtypes.get(v.name) == FLOAT)

    quantized: list[ir.Value] = []
    seen: set[ir.Value] = set()
    float_out = {v for n in int8_nodes for v in n.outputs[:1] if read_by_float_layer(v)}

    def want(value: ir.Value) -> None:
        if value not in seen:
            seen.add(value)
            quantized.append(value)
            range_of.setdefault(value, value.name)

    for value in graph.inputs:
        if any(user in int8_nodes for user, _ in value.uses()) and dtypes.get(value.name) == FLOAT:
            want(value)
    for node in graph:
        if node in int8_nodes:
            for v in node.inputs:
                if is_float_activation(v, dtypes) and v.producer() is not None and (
                    v.producer() not in int8_nodes and v not in folded_outputs(folded)
                    or v in float_out
                ):
                    want(v)
        if node not in int8_nodes:
            continue
        out = node.outputs[0]
        relu = folded.get(out)
        final = relu.outputs[0] if relu is not None else out
        feeds_int8 = any(user in int8_nodes for user, _ in final.uses())
        if final.is_graph_output() or out in float_out:
            continue
        if node.op_type not in ("Gemm", "MatMul") or feeds_int8 or relu is not None:
            want(out)
    return _Placement(layers, int8_nodes, folded, range_of, quantized, float_out)


def clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    """(min, max) of a Clip whose bounds are constants (absent: -inf / inf), else None."""
    if node.op_type != "Clip":
        return None
    bounds = [-np.inf, np.inf]
    if len(node.inputs) == 1 and ("min" in node.attributes or "max" in node.attributes):
        bounds = [node.attributes.get_float("min", -np.inf), node.attributes.get_float("max", np.inf)]
    for i, v in enumerate(node.inputs[1:3]):
        if v is None:
            continue
        if v.const_value is None or v.const_value.numpy().size != 1:
            return None
        bounds[i] = float(v.const_value.numpy().reshape(()))
    return bounds[0], bounds[1]


def _foldable_activation(node: ir.Node) -> bool:
    """A Relu, or a Clip whose range holds 0 (ReLU6): the saturating QuantizeLinear of its output
    range does what it does (its minimum is the zero point's level)."""
    if node.op_type == "Relu":
        return True
    bounds = clip_bounds(node)
    return bounds is not None and bounds[0] <= 0.0 <= bounds[1]


def folded_outputs(folded: dict[ir.Value, ir.Node]) -> set[ir.Value]:
    return {relu.outputs[0] for relu in folded.values()}


def _numpy_dtype(dtype: ir.DataType) -> type:
    return np.uint8 if dtype == ir.DataType.UINT8 else np.int8


def apply_static(
    model: ir.Model, dtypes: dict[str, ir.DataType], ranges: dict[str, tuple[float, float]],
    target: Int8Target, keep_float: set[str], weight_scales: str = "auto",
    statistics: dict[str, InputStatistics] | None = None,
) -> Counts:
    """Insert Q/DQ pairs and int8 weights for the static placement; returns what it did.

    With ``statistics`` (per layer id, see ``rounding``) weights are rounded by GPTQ and biases
    corrected; without, weights round to nearest.
    """
    graph = model.graph
    ids = layer_ids(graph)
    statistics = statistics or {}
    placement = place(graph, dtypes, keep_float)
    namer = Namer(graph)
    counts = Counts()
    params = _activation_params(placement, ranges, target)
    _insert_activation_qdq(graph, namer, placement, params, counts)
    _quantize_layers(graph, namer, ids, placement, target, weight_scales, statistics, counts)
    counts.joins = len(placement.int8_nodes) - len(placement.layers)
    common.RemoveUnusedNodesPass()(model)
    return counts


def _activation_params(placement: _Placement, ranges: dict[str, tuple[float, float]],
                       target: Int8Target) -> dict[ir.Value, QParams]:
    """The quantization parameters of each quantized value whose range was calibrated."""
    params: dict[ir.Value, QParams] = {}
    for value in placement.quantized:
        key = placement.range_of[value]
        if key not in ranges:
            continue
        params[value] = activation_qparams(*ranges[key], target.activations)
    return params


def _insert_activation_qdq(graph: ir.Graph, namer: Namer, placement: _Placement,
                           params: dict[ir.Value, QParams], counts: Counts) -> None:
    """A QuantizeLinear/DequantizeLinear pair after each quantized value (folding its Relu)."""
    shared: dict[QParams, tuple[ir.Value, ir.Value]] = {}  # one scale / zero point per value
    for value in placement.quantized:
        qp = params.get(value)
        if qp is None:
            continue
        base = value.name
        if qp not in shared:
            shared[qp] = (
                add_initializer(graph, namer, f"{base}_scale", np.array(qp.scale, np.float32)),
                add_initializer(graph, namer, f"{base}_zero_point",
                                np.array(qp.zero_point, _numpy_dtype(qp.dtype))),
            )
        scale, zp = shared[qp]
        q = ir.node("QuantizeLinear", [value, scale, zp], name=namer(f"{base}_QuantizeLinear"))
        q.outputs[0].name = namer(f"{base}_quantized")
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zp],
                     name=namer(f"{base}_DequantizeLinear"))
        dq.outputs[0].name = namer(f"{base}_dequantized")
        q.outputs[0].dtype, dq.outputs[0].dtype = qp.dtype, FLOAT
        q.outputs[0].shape = dq.outputs[0].shape = value.shape
        relu = placement.folded_relus.get(value)
        producer = value.producer()
        if relu is not None:
            relu.outputs[0].replace_all_uses_with(dq.outputs[0])
            graph.insert_after(producer, [q, dq])
            graph.remove(relu, safe=True)
            counts.relus_folded += 1
        elif producer in placement.int8_nodes and value not in placement.float_out:
            for user, index in list(value.uses()):
                if user is not q:
                    user.replace_input_with(index, dq.outputs[0])
            graph.insert_after(producer, [q, dq])
        else:
            for user, index in list(value.uses()):
                if user in placement.int8_nodes:
                    user.replace_input_with(index, dq.outputs[0])
            if producer is None:
                graph.insert_before(graph[0], [q, dq])
            else:
                graph.insert_after(producer, [q, dq])
        counts.qdq_pairs += 1


_QuantizedWeight = tuple[ir.Value, ir.Value, ir.Value | None, np.ndarray]  # q, scale, zp, scales


def _quantize_layers(graph: ir.Graph, namer: Namer, ids: dict[ir.Node, str], placement: _Placement,
                     target: Int8Target, weight_scales: str,
                     statistics: dict[str, InputStatistics], counts: Counts) -> None:
    """Each placed layer reads its weight through a DequantizeLinear of int8 (a weight shared
    along the same axis is quantized once), and its bias as int32 where it can."""
    weights: dict[tuple[ir.Value, int], _QuantizedWeight] = {}
    for node in placement.layers:
        axis = weight_axis(node)
        w = node.inputs[1]
        x_dq = node.inputs[0].producer()
        x_scale = x_dq.inputs[1] if x_dq is not None and x_dq.op_type == "DequantizeLinear" else None
        if (w, axis) not in weights:
            weights[(w, axis)] = _quantize_layer_weight(
                graph, namer, node, axis, x_scale, target, weight_scales,
                statistics.get(ids[node]), counts)
        wq, ws, wz, scales = weights[(w, axis)]
        dq = ir.node("DequantizeLinear", [wq, ws] + ([wz] if wz is not None else []),
                     {"axis": axis} if scales.ndim else {},
                     name=namer(f"{w.name}_DequantizeLinear"))
        dq.outputs[0].name = namer(f"{w.name}_dequantized")
        dq.outputs[0].dtype, dq.outputs[0].shape = FLOAT, w.shape
        graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
        counts.layers += 1
        if len(node.inputs) > 2 and x_scale is not None:
            counts.biases += _quantize_bias(graph, namer, node, x_scale, ws, scales)


def _quantize_layer_weight(
    graph: ir.Graph, namer: Namer, node: ir.Node, axis: int, x_scale: ir.Value | None,
    target: Int8Target, weight_scales: str, statistics: InputStatistics | None, counts: Counts,
) -> _QuantizedWeight:
    """The layer's weight as int8 initializers: values, scales (stored as float16 within its
    range) and, but for a Conv, zero points; by GPTQ with ``statistics`` (correcting the bias)."""
    w = node.inputs[1]
    weight = w.const_value.numpy()
    floor = bias_scale_floor(node, x_scale)
    tensor = weight_scales == "tensor" or (
        weight_scales == "auto" and per_tensor_suffices(weight, axis, target.reduce_range))
    if tensor:
        whole = np.moveaxis(weight, axis, 0).reshape(1, -1)
        _, scales = quantize_weight(whole, 0, target.reduce_range, True,
                                    None if floor is None else floor.max(initial=0.0))
        scales = scales.reshape(())
    else:
        _, scales = quantize_weight(weight, axis, target.reduce_range, True, floor)
    qmax = 63 if target.reduce_range else 127
    q, correction = round_layer(node, weight, scales, axis, qmax, statistics)
    if correction is not None:
        counts.gptq += 1
        counts.biases_corrected += _correct_bias(graph, namer, node, correction)
    wq = add_initializer(graph, namer, f"{w.name}_quantized", q)
    if fp16_ceil(scales) is not None:
        ws = add_stored_as(graph, namer, f"{w.name}_scale", scales, np.float16)
    else:
        ws = add_initializer(graph, namer, f"{w.name}_scale", scales)
    # onnxruntime 1.32 fuses DQ -> Conv without a weight zero point (0 is the default;
    # less to store) but fuses Gemm/MatMul into QGemm/QLinearMatMul only with one.
    wz = None if node.op_type == "Conv" else add_initializer(
        graph, namer, f"{w.name}_zero_point", np.zeros(scales.shape, np.int8)
    )
    return wq, ws, wz, scales


def _float_bias(node: ir.Node) -> ir.Value | None:
    """The layer's bias (input 2) where it is a float constant, else None."""
    b = node.inputs[2] if len(node.inputs) > 2 else None
    if b is None or b.const_value is None or b.const_value.dtype != FLOAT:
        return None
    return b


def _correct_bias(graph: ir.Graph, namer: Namer, node: ir.Node, correction: np.ndarray) -> bool:
    """Add ``correction`` to the layer's constant 1-D float bias (a new initializer); False where
    it has none (or a Gemm scales it by beta != 1)."""
    b = _float_bias(node)
    if b is None or b.const_value.numpy().shape != correction.shape:
        return False
    if node.op_type == "Gemm" and node.attributes.get_float("beta", 1.0) != 1.0:
        return False
    bias = b.const_value.numpy().astype(np.float64) + correction
    node.replace_input_with(2, add_initializer(graph, namer, f"{b.name}_corrected",
                                               bias.astype(np.float32)))
    return True


BIAS_LIMIT = 2**30  # |int32 bias| at most this, leaving the accumulator headroom


def bias_scale_floor(node: ir.Node, x_scale: ir.Value | None) -> np.ndarray | None:
    """Per-channel weight scales below which the layer's bias would not fit int32, or None.

    The bias is stored as ``round(b / (s_x * s_w))``. A channel that BatchNorm folding left
    all but dead (|W_c| ~ 1e-10, trained networks have them) gets a tiny ``s_w`` and a bias far
    beyond int32; a float bias then keeps onnxruntime from fusing the layer into QLinearConv /
    QGemm. Raising such a channel's scale to ``|b_c| / (s_x * BIAS_LIMIT)`` costs nothing: its
    weights round to 0 either way, as they nearly are.
    """
    b = _float_bias(node)
    if b is None or x_scale is None or x_scale.const_value is None:
        return None
    s_x = float(x_scale.const_value.numpy().reshape(-1)[0])
    bias = np.abs(b.const_value.numpy().astype(np.float64)).reshape(-1)
    return bias / (s_x * BIAS_LIMIT) if s_x > 0 else None


def _quantize_bias(
    graph: ir.Graph, namer: Namer, node: ir.Node, x_scale: ir.Value, w_scales: ir.Value,
    weight_scales: np.ndarray,
) -> int:
    """Replace a 1-D float bias by DequantizeLinear(int32, s_x * s_w); 1 if done, else 0.

    The bias scale is not stored: a Mul of the two scale initializers computes it (in float32,
    as here) and onnxruntime folds it at load. Integer biases that fit int16 are stored so.
    """
    b = _float_bias(node)
    if b is None:
        return 0
    if node.op_type == "Gemm" and (
        node.attributes.get_float("alpha", 1.0) != 1.0 or node.attributes.get_float("beta", 1.0) != 1.0
    ):
        return 0
    bias = b.const_value.numpy().astype(np.float64)
    if weight_scales.ndim and bias.shape != weight_scales.shape or x_scale.const_value is None:
        return 0
    scales = x_scale.const_value.numpy().astype(np.float32) * weight_scales.astype(np.float32)
    q = np.round(bias / np.broadcast_to(scales, bias.shape).astype(np.float64))
    if np.abs(q).max(initial=0) >= 2**31 - 1 or (scales == 0).any():
        return 0
    if np.abs(q).max(initial=0) <= np.iinfo(np.int16).max:
        bq = add_stored_as(graph, namer, f"{b.name}_quantized", q.astype(np.int32), np.int16)
    else:
        bq = add_initializer(graph, namer, f"{b.name}_quantized", q.astype(np.int32))
    mul = ir.node("Mul", [x_scale, w_scales], name=namer(f"{b.name}_scale_Mul"))
    mul.outputs[0].name = namer(f"{b.name}_scale")
    mul.outputs[0].dtype, mul.outputs[0].shape = FLOAT, ir.Shape(scales.shape)
    graph.insert_before(node, mul)
    dq = ir.node("DequantizeLinear", [bq, mul.outputs[0]], {"axis": 0} if scales.ndim else {},
                 name=namer(f"{b.name}_DequantizeLinear"))
    dq.outputs[0].name = namer(f"{b.name}_dequantized")
    dq.outputs[0].dtype, dq.outputs[0].shape = FLOAT, b.shape
    graph.insert_before(node, dq)
    node.replace_input_with(2, dq.outputs[0])
    return 1


def apply_dynamic(model: ir.Model, dtypes: dict[str, ir.DataType], target: Int8Target,
                   keep_float: set[str]) -> Counts:
    """MatMul/Gemm -> DynamicQuantizeLinear + MatMulInteger + Cast + Mul (+ Add bias)."""
    graph = model.graph
    ids = layer_ids(graph)
    namer = Namer(graph)
    counts = Counts()
    dynamic_inputs: dict[ir.Value, ir.Node] = {}
    for node in list(graph):
        if (
            node.op_type not in ("Gemm", "MatMul") or node.domain not in ("", "ai.onnx")
            or ids[node] in keep_float or constant_weight(node) is None
            or not is_float_activation(node.inputs[0], dtypes)
        ):
            continue
        x, w = node.inputs[0], node.inputs[1]
        weight = w.const_value.numpy()
        alpha = node.attributes.get_float("alpha", 1.0) if node.op_type == "Gemm" else 1.0
        if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
            weight = weight.T
        q, scales = quantize_weight(weight, 1, target.reduce_range)
        new_nodes = []
        dql = dynamic_inputs.get(x)
        if dql is None:
            dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3,
                          name=namer(f"{x.name}_DynamicQuantizeLinear"))
            for out, suffix, dtype in zip(dql.outputs, ("quantized", "scale", "zero_point"),
                                          (ir.DataType.UINT8, FLOAT, ir.DataType.UINT8), strict=True):
                out.name, out.dtype = namer(f"{x.name}_{suffix}"), dtype
            dql.outputs[0].shape = x.shape
            dynamic_inputs[x] = dql
            new_nodes.append(dql)
        wq = add_initializer(graph, namer, f"{w.name}_quantized", q)
        wz = add_initializer(graph, namer, f"{w.name}_zero_point", np.zeros(len(scales), np.int8))
        ws = add_initializer(graph, namer, f"{w.name}_scale", (scales * np.float32(alpha)).astype(np.float32))
        base = node.name or ids[node]
        mm = ir.node("MatMulInteger", [dql.outputs[0], wq, dql.outputs[2], wz],
                     name=namer(f"{base}_MatMulInteger"))
        cast = ir.node("Cast", [mm.outputs[0]], {"to": FLOAT}, name=namer(f"{base}_Cast"))
        scale = ir.node("Mul", [dql.outputs[1], ws], name=namer(f"{base}_scale_Mul"))
        out = ir.node("Mul", [cast.outputs[0], scale.outputs[0]], name=namer(f"{base}_Mul"))
        for n, suffix, dtype in ((mm, "int32", ir.DataType.INT32), (cast, "cast", FLOAT),
                                 (scale, "scale", FLOAT), (out, "output", FLOAT)):
            n.outputs[0].name, n.outputs[0].dtype = namer(f"{base}_{suffix}"), dtype
        new_nodes += [mm, cast, scale, out]
        replace_gemm(graph, namer, node, base, new_nodes, out.outputs[0])
        counts.layers += 1
    common.RemoveUnusedNodesPass()(model)
    return counts


def replace_gemm(graph: ir.Graph, namer: Namer, node: ir.Node, base: str,
                 new_nodes: list[ir.Node], result: ir.Value) -> None:
    """Finish rewriting Gemm ``node`` as ``new_nodes`` computing ``result``: add its bias, insert
    the nodes, move every use (a graph output keeps its name) and drop the Gemm."""
    bias = gemm_bias(graph, namer, node, base, new_nodes)
    if bias is not None:
        add = ir.node("Add", [result, bias], name=namer(f"{base}_bias_Add"))
        add.outputs[0].dtype = FLOAT
        new_nodes.append(add)
        result = add.outputs[0]
    replace_node(graph, node, new_nodes, result)


def gemm_bias(
    graph: ir.Graph, namer: Namer, node: ir.Node, base: str, new_nodes: list[ir.Node]
) -> ir.Value | None:
    """``beta * C`` of a Gemm (folded into a new initializer when C is constant), else None."""
    if node.op_type != "Gemm" or len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    c = node.inputs[2]
    beta = node.attributes.get_float("beta", 1.0)
    if beta == 1.0:
        return c
    if c.const_value is not None:
        return add_initializer(graph, namer, f"{c.name}_scaled",
                            (c.const_value.numpy() * beta).astype(np.float32))
    factor = add_initializer(graph, namer, f"{base}_beta", np.array(beta, np.float32))
    mul = ir.node("Mul", [c, factor], name=namer(f"{base}_beta_Mul"))
    mul.outputs[0].dtype = FLOAT
    new_nodes.append(mul)
    return mul.outputs[0]

