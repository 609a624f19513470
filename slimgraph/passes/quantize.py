"""quantize: QuantizeLinear/DequantizeLinear insertion (int8 static or dynamic, int4, binary).

Activations (asymmetric, per tensor). A calibrated range [a, b] is widened to hold 0, then

    scale = (b - a) / (qmax - qmin)        zp = clip(round(qmin - a / scale), qmin, qmax)

with [qmin, qmax] = [0, 255] for uint8 and [-128, 127] for int8. A Relu whose producer is
quantized is folded into the range: its output range starts at 0, so zp = qmin and the saturating
QuantizeLinear clamps negatives exactly as the Relu did.

Weights (symmetric, per output channel c): ``s_c = max|W_c| / Q`` and ``W_q = clip(round(W / s_c),
-Q, Q)``, Q = 127 (63 with ``reduce_range``: 7-bit weights keep u8 x s8 pair sums inside int16 on
AVX2/AVX-512 CPUs without VNNI). The channel axis is where output channels live: Conv W[M, C, k..]
-> 0; Gemm W[N, K] (transB=1) -> 0, W[K, N] (transB=0) -> 1; MatMul W[K, N] -> 1. A bias b
becomes int32 with scale ``s_x * s_c`` and zero point 0, the form onnxruntime's fused kernels take.

Placement is a global analysis (hand-written, not rewrite rules): the layers (Conv, Gemm, MatMul
with a constant weight) are quantized; an Add, Concat or pooling joins them in int8 when one of its
inputs comes from a quantized node; data-movement ops (MaxPool, Flatten, Reshape, Transpose, ...)
pass int8 through with their input's parameters so onnxruntime drops the Q/DQ around them. Every
other op (LayerNorm, Softmax, GELU, ...) stays float.

Dynamic mode (``dynamic=true``) quantizes weights offline and activations at run time in the form
onnxruntime fuses into DynamicQuantizeMatMul:
``DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q, x_zp, 0) -> Cast -> Mul(x_scale * s)``.
Only MatMul and Gemm: onnxruntime has no u8s8 ConvInteger kernel on CPU, so Conv stays float.

int4 (weight-only, MatMul/Gemm): blocks of ``block`` weights along K share a scale
``max|block| / 7``; the weight is a blocked DequantizeLinear of INT4 values (opset 21).

binary (XNOR-Net weights): ``W ~ sign(W) * alpha_c`` with ``alpha_c = mean |W_c|`` per output
channel (the L2-optimal scale for a fixed sign pattern). Signs are stored packed, 1 bit per weight,
and decoded by standard ops on initializers only (see ``_binary_decode``).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from slimgraph.calibration import Feeds
from slimgraph.passes.base import SlimgraphPass
from slimgraph.passes.report import Tolerance

logger = logging.getLogger(__name__)

MODES = ("int8", "int4", "binary")
BLOCK_SIZES = (32, 64, 128)
CALIBRATORS = ("minmax", "percentile", "entropy")
ACTIVATION_TYPES = ("auto", "u8", "s8")
INT8_TOLERANCE = Tolerance(max_rel_err=0.25, min_cosine=0.99, min_top1=0.97)
INT4_TOLERANCE = Tolerance(max_rel_err=0.5, min_cosine=0.97, min_top1=0.9)
# Binary weights without retraining keep little of a model's function: verification records the
# metrics but nothing is enforced (recovery by fine-tuning is a separate step).
BINARY_TOLERANCE = Tolerance(max_rel_err=1e9, min_cosine=-1.0, min_top1=0.0)
BINARY_WEIGHT_TAG = "slimgraph.binary_weight"

_LAYER_OPS = frozenset({"Conv", "Gemm", "MatMul"})
_JOIN_OPS = frozenset({"Add", "Concat", "AveragePool", "GlobalAveragePool"})
_PASSTHROUGH_OPS = frozenset(
    {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "GlobalMaxPool"}
)
_FLOAT = ir.DataType.FLOAT
_HISTOGRAM_BINS = 2048
_SPEED_ROUNDS = 5


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
    weight: np.ndarray, axis: int, reduce_range: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 weights along ``axis``: (int8 values, float32 scales)."""
    qmax = 63 if reduce_range else 127
    moved = np.moveaxis(weight.astype(np.float64), axis, 0)
    amax = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1)
    scales = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    q = np.clip(np.round(weight / scales.reshape(shape).astype(np.float64)), -qmax, qmax)
    return q.astype(np.int8), scales


def weight_axis(node: ir.Node) -> int:
    """The axis of the node's weight (input 1) that holds its output channels."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return 1  # MatMul [K, N]


# ---------------------------------------------------------------------------------------------
# Calibration: ranges of float activations, collected by running the float model in onnxruntime.


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
    session, outputs = _probe_session(model, names)
    feeds = list(feeds)
    lows = dict.fromkeys(outputs, np.inf)
    highs = dict.fromkeys(outputs, -np.inf)
    for feed in feeds:
        for name, array in zip(outputs, session.run(outputs, _inputs_of(session, feed)), strict=True):
            if array.size:
                lows[name] = min(lows[name], float(array.min()))
                highs[name] = max(highs[name], float(array.max()))
    ranges = {n: (lows[n], highs[n]) for n in outputs if np.isfinite(lows[n])}
    if method == "minmax":
        return ranges
    histograms = {n: _Histogram(lo, hi, np.zeros(_HISTOGRAM_BINS)) for n, (lo, hi) in ranges.items()}
    for feed in feeds:
        for name, array in zip(outputs, session.run(outputs, _inputs_of(session, feed)), strict=True):
            hist = histograms.get(name)
            if hist is not None and hist.high > hist.low:
                hist.counts += np.histogram(array, _HISTOGRAM_BINS, (hist.low, hist.high))[0]
    clip = _percentile_range if method == "percentile" else _entropy_range
    return {n: clip(h, percentile) if h.high > h.low else ranges[n] for n, h in histograms.items()}


def _percentile_range(hist: _Histogram, percentile: float) -> tuple[float, float]:
    """Drop (100 - p)% of the mass, half from each tail (none from a tail at 0)."""
    cdf = np.cumsum(hist.counts) / hist.counts.sum()
    edges = np.linspace(hist.low, hist.high, _HISTOGRAM_BINS + 1)
    tail = (100.0 - percentile) / 100.0 / 2
    low = hist.low if hist.low >= 0 else edges[int(np.searchsorted(cdf, tail))]
    high = hist.high if hist.high <= 0 else edges[int(np.searchsorted(cdf, 1 - tail)) + 1]
    return float(low), float(high)


def _entropy_range(hist: _Histogram, _: float, step: int = 8) -> tuple[float, float]:
    """Clip |x| at the threshold whose quantization keeps KL(P || Q) smallest (TensorRT's method).

    P is the histogram up to the threshold with the tail folded into its last bin; Q merges P's
    unclipped bins into as many levels as the int8 side has (256 for a one-sided range, else 128)
    and spreads each level evenly over the bins where P is non-zero.
    """
    edges = np.linspace(hist.low, hist.high, _HISTOGRAM_BINS + 1)
    centers = np.abs((edges[:-1] + edges[1:]) / 2)
    amax = max(abs(hist.low), abs(hist.high))
    folded = np.histogram(centers, _HISTOGRAM_BINS, (0, amax), weights=hist.counts)[0]
    levels = 256 if hist.low >= 0 or hist.high <= 0 else 128
    if levels == 256:
        # A Relu output's spike at 0 is exact at any threshold (0 is the zero point) but would
        # dominate the divergence and pull the threshold far in.
        folded[0] = 0
    best, best_kl = _HISTOGRAM_BINS, np.inf
    for i in range(levels, _HISTOGRAM_BINS + 1, step):
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
    threshold = best / _HISTOGRAM_BINS * amax
    return max(hist.low, -threshold), min(hist.high, threshold)


def _probe_session(model: ir.Model, names: Sequence[str]):
    """A session on a copy of ``model`` whose outputs include the named values."""
    from slimgraph.backends.ort import session_for

    probe = model.clone()
    values = _values_by_name(probe.graph)
    present = {v.name for v in probe.graph.outputs}
    for name in names:
        value = values.get(name)
        if value is not None and name not in present:
            if value.type is None:
                value.dtype = _FLOAT
            probe.graph.outputs.append(value)
            present.add(name)
    session = session_for(_serialize(probe), {"allow_spinning": False})
    return session, [n for n in names if n in present]


def _inputs_of(session, feed: Feeds) -> Feeds:
    wanted = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feed.items() if k in wanted}


def _serialize(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs}
    for node in graph:
        for v in node.outputs:
            values[v.name] = v
    return values


# ---------------------------------------------------------------------------------------------
# Placement: which nodes run in int8 and which values get a QuantizeLinear/DequantizeLinear pair.


def _layer_ids(graph: ir.Graph) -> dict[ir.Node, str]:
    """A stable id per node: its name, or op type and position where it has none."""
    return {node: node.name or f"{node.op_type}_{i}" for i, node in enumerate(graph)}


def _is_float_activation(value: ir.Value | None, dtypes: dict[str, ir.DataType]) -> bool:
    return (
        value is not None
        and value.const_value is None
        and dtypes.get(value.name) == _FLOAT
    )


def _constant_weight(node: ir.Node) -> np.ndarray | None:
    """The node's float constant weight (input 1) if it has one of the rank its op needs."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    w = node.inputs[1]
    if w.const_value is None or w.is_graph_input() or w.const_value.dtype != _FLOAT:
        return None
    array = w.const_value.numpy()
    rank_ok = array.ndim >= 3 if node.op_type == "Conv" else array.ndim == 2
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return None
    return array if rank_ok else None


def quantizable_layers(model: ir.Model, dtypes: dict[str, ir.DataType]) -> list[str]:
    """Ids of the Conv/Gemm/MatMul nodes with a constant float weight and a float activation."""
    ids = _layer_ids(model.graph)
    return [
        ids[node] for node in model.graph
        if node.op_type in _LAYER_OPS and node.domain in ("", "ai.onnx")
        and _constant_weight(node) is not None and _is_float_activation(node.inputs[0], dtypes)
    ]


@dataclasses.dataclass
class _Placement:
    """The int8 region: nodes that run in int8, values quantized, Relus folded into ranges."""

    layers: list[ir.Node]
    int8_nodes: set[ir.Node]
    folded_relus: dict[ir.Value, ir.Node]  # producer output -> the Relu that is folded away
    range_of: dict[ir.Value, str]  # quantized value -> the value whose range / params it takes
    quantized: list[ir.Value]  # in topological order


def _place(graph: ir.Graph, dtypes: dict[str, ir.DataType], keep_float: set[str]) -> _Placement:
    ids = _layer_ids(graph)
    layers = [
        n for n in graph
        if n.op_type in _LAYER_OPS and n.domain in ("", "ai.onnx") and ids[n] not in keep_float
        and _constant_weight(n) is not None and _is_float_activation(n.inputs[0], dtypes)
    ]
    int8_nodes = set(layers)
    int8_values: set[ir.Value] = set()  # values available in int8 (outputs of int8 nodes)
    folded: dict[ir.Value, ir.Node] = {}
    range_of: dict[ir.Value, str] = {}
    for node in graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        acts = [v for v in node.inputs if _is_float_activation(v, dtypes)]
        if node.op_type == "Relu" and acts and acts[0].producer() in int8_nodes:
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
            int8_values.update(v for v in node.outputs if dtypes.get(v.name) == _FLOAT)

    quantized: list[ir.Value] = []
    seen: set[ir.Value] = set()

    def want(value: ir.Value) -> None:
        if value not in seen:
            seen.add(value)
            quantized.append(value)
            range_of.setdefault(value, value.name)

    for value in graph.inputs:
        if any(user in int8_nodes for user, _ in value.uses()) and dtypes.get(value.name) == _FLOAT:
            want(value)
    for node in graph:
        if node in int8_nodes:
            for v in node.inputs:
                if _is_float_activation(v, dtypes) and v.producer() is not None and (
                    v.producer() not in int8_nodes and v not in folded_outputs(folded)
                ):
                    want(v)
        if node not in int8_nodes:
            continue
        out = node.outputs[0]
        relu = folded.get(out)
        final = relu.outputs[0] if relu is not None else out
        feeds_int8 = any(user in int8_nodes for user, _ in final.uses())
        if final.is_graph_output():
            continue
        if node.op_type not in ("Gemm", "MatMul") or feeds_int8 or relu is not None:
            want(out)
    return _Placement(layers, int8_nodes, folded, range_of, quantized)


def folded_outputs(folded: dict[ir.Value, ir.Node]) -> set[ir.Value]:
    return {relu.outputs[0] for relu in folded.values()}


# ---------------------------------------------------------------------------------------------
# Graph edits.


class _Namer:
    """Fresh names that no value or initializer of the graph uses yet."""

    def __init__(self, graph: ir.Graph) -> None:
        self.taken = set(graph.initializers) | {v.name for v in graph.inputs}
        self.taken |= {v.name for n in graph for v in n.outputs}

    def __call__(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name


def _initializer(graph: ir.Graph, namer: _Namer, base: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=namer(base), const_value=ir.tensor(array))
    value.dtype = value.const_value.dtype
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    return value


def _numpy_dtype(dtype: ir.DataType) -> type:
    return np.uint8 if dtype == ir.DataType.UINT8 else np.int8


@dataclasses.dataclass
class _Counts:
    layers: int = 0
    joins: int = 0
    relus_folded: int = 0
    qdq_pairs: int = 0
    biases: int = 0


def _apply_static(
    model: ir.Model, dtypes: dict[str, ir.DataType], ranges: dict[str, tuple[float, float]],
    target: Int8Target, keep_float: set[str],
) -> _Counts:
    """Insert Q/DQ pairs and int8 weights for the static placement; returns what it did."""
    graph = model.graph
    placement = _place(graph, dtypes, keep_float)
    namer = _Namer(graph)
    counts = _Counts()
    params: dict[ir.Value, QParams] = {}
    for value in placement.quantized:
        key = placement.range_of[value]
        if key not in ranges:
            continue
        params[value] = activation_qparams(*ranges[key], target.activations)

    for value in placement.quantized:
        qp = params.get(value)
        if qp is None:
            continue
        base = value.name
        scale = _initializer(graph, namer, f"{base}_scale", np.array(qp.scale, np.float32))
        zp = _initializer(graph, namer, f"{base}_zero_point",
                          np.array(qp.zero_point, _numpy_dtype(qp.dtype)))
        q = ir.node("QuantizeLinear", [value, scale, zp], name=namer(f"{base}_QuantizeLinear"))
        q.outputs[0].name = namer(f"{base}_quantized")
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zp],
                     name=namer(f"{base}_DequantizeLinear"))
        dq.outputs[0].name = namer(f"{base}_dequantized")
        q.outputs[0].dtype, dq.outputs[0].dtype = qp.dtype, _FLOAT
        q.outputs[0].shape = dq.outputs[0].shape = value.shape
        relu = placement.folded_relus.get(value)
        producer = value.producer()
        if relu is not None:
            relu.outputs[0].replace_all_uses_with(dq.outputs[0])
            graph.insert_after(producer, [q, dq])
            graph.remove(relu, safe=True)
            counts.relus_folded += 1
        elif producer in placement.int8_nodes:
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

    weights: dict[tuple[ir.Value, int], tuple[ir.Value, ir.Value, ir.Value | None, np.ndarray]] = {}
    for node in placement.layers:
        axis = weight_axis(node)
        w = node.inputs[1]
        if (w, axis) not in weights:
            q, scales = quantize_weight(w.const_value.numpy(), axis, target.reduce_range)
            wq = _initializer(graph, namer, f"{w.name}_quantized", q)
            ws = _initializer(graph, namer, f"{w.name}_scale", scales)
            # onnxruntime 1.32 fuses DQ -> Conv without a weight zero point (0 is the default;
            # less to store) but fuses Gemm/MatMul into QGemm/QLinearMatMul only with one.
            wz = None if node.op_type == "Conv" else _initializer(
                graph, namer, f"{w.name}_zero_point", np.zeros(len(scales), np.int8)
            )
            weights[(w, axis)] = (wq, ws, wz, scales)
        wq, ws, wz, scales = weights[(w, axis)]
        dq = ir.node("DequantizeLinear", [wq, ws] + ([wz] if wz is not None else []), {"axis": axis},
                     name=namer(f"{w.name}_DequantizeLinear"))
        dq.outputs[0].name = namer(f"{w.name}_dequantized")
        dq.outputs[0].dtype, dq.outputs[0].shape = _FLOAT, w.shape
        graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
        counts.layers += 1
        x_params = params.get(node.inputs[0]) or params.get(_dq_source(node.inputs[0]))
        if len(node.inputs) > 2 and x_params is not None:
            counts.biases += _quantize_bias(graph, namer, node, x_params.scale * scales)
    counts.joins = len(placement.int8_nodes) - len(placement.layers)
    common.RemoveUnusedNodesPass()(model)
    return counts


def _dq_source(value: ir.Value) -> ir.Value | None:
    """The float value a DequantizeLinear output stands for (input of the matching Q)."""
    dq = value.producer()
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = dq.inputs[0].producer()
    return q.inputs[0] if q is not None and q.op_type == "QuantizeLinear" else None


def _quantize_bias(
    graph: ir.Graph, namer: _Namer, node: ir.Node, scales: np.ndarray
) -> int:
    """Replace a 1-D float bias by DequantizeLinear(int32, s_x * s_w); 1 if done, else 0."""
    b = node.inputs[2]
    if b is None or b.const_value is None or b.const_value.dtype != _FLOAT:
        return 0
    if node.op_type == "Gemm" and (
        node.attributes.get_float("alpha", 1.0) != 1.0 or node.attributes.get_float("beta", 1.0) != 1.0
    ):
        return 0
    bias = b.const_value.numpy().astype(np.float64)
    if bias.shape != scales.shape:
        return 0
    scales = scales.astype(np.float32)
    q = np.round(bias / scales.astype(np.float64))
    if np.abs(q).max(initial=0) >= 2**31 - 1 or (scales == 0).any():
        return 0
    bq = _initializer(graph, namer, f"{b.name}_quantized", q.astype(np.int32))
    bs = _initializer(graph, namer, f"{b.name}_scale", scales)
    dq = ir.node("DequantizeLinear", [bq, bs], {"axis": 0},
                 name=namer(f"{b.name}_DequantizeLinear"))
    dq.outputs[0].name = namer(f"{b.name}_dequantized")
    dq.outputs[0].dtype, dq.outputs[0].shape = _FLOAT, b.shape
    graph.insert_before(node, dq)
    node.replace_input_with(2, dq.outputs[0])
    return 1


def _apply_dynamic(model: ir.Model, dtypes: dict[str, ir.DataType], target: Int8Target,
                   keep_float: set[str]) -> _Counts:
    """MatMul/Gemm -> DynamicQuantizeLinear + MatMulInteger + Cast + Mul (+ Add bias)."""
    graph = model.graph
    ids = _layer_ids(graph)
    namer = _Namer(graph)
    counts = _Counts()
    dynamic_inputs: dict[ir.Value, ir.Node] = {}
    for node in list(graph):
        if (
            node.op_type not in ("Gemm", "MatMul") or node.domain not in ("", "ai.onnx")
            or ids[node] in keep_float or _constant_weight(node) is None
            or not _is_float_activation(node.inputs[0], dtypes)
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
                                          (ir.DataType.UINT8, _FLOAT, ir.DataType.UINT8), strict=True):
                out.name, out.dtype = namer(f"{x.name}_{suffix}"), dtype
            dql.outputs[0].shape = x.shape
            dynamic_inputs[x] = dql
            new_nodes.append(dql)
        wq = _initializer(graph, namer, f"{w.name}_quantized", q)
        wz = _initializer(graph, namer, f"{w.name}_zero_point", np.zeros(len(scales), np.int8))
        ws = _initializer(graph, namer, f"{w.name}_scale", (scales * np.float32(alpha)).astype(np.float32))
        base = node.name or ids[node]
        mm = ir.node("MatMulInteger", [dql.outputs[0], wq, dql.outputs[2], wz],
                     name=namer(f"{base}_MatMulInteger"))
        cast = ir.node("Cast", [mm.outputs[0]], {"to": _FLOAT}, name=namer(f"{base}_Cast"))
        scale = ir.node("Mul", [dql.outputs[1], ws], name=namer(f"{base}_scale_Mul"))
        out = ir.node("Mul", [cast.outputs[0], scale.outputs[0]], name=namer(f"{base}_Mul"))
        for n, suffix, dtype in ((mm, "int32", ir.DataType.INT32), (cast, "cast", _FLOAT),
                                 (scale, "scale", _FLOAT), (out, "output", _FLOAT)):
            n.outputs[0].name, n.outputs[0].dtype = namer(f"{base}_{suffix}"), dtype
        new_nodes += [mm, cast, scale, out]
        result = out.outputs[0]
        bias = _gemm_bias(graph, namer, node, base, new_nodes)
        if bias is not None:
            add = ir.node("Add", [result, bias], name=namer(f"{base}_bias_Add"))
            add.outputs[0].dtype = _FLOAT
            new_nodes.append(add)
            result = add.outputs[0]
        graph.insert_before(node, new_nodes)
        old = node.outputs[0]
        result.shape = old.shape
        old_name = old.name
        is_output = old.is_graph_output()
        old.replace_all_uses_with(result, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if is_output:
            result.name = old_name
        counts.layers += 1
    common.RemoveUnusedNodesPass()(model)
    return counts


def _gemm_bias(
    graph: ir.Graph, namer: _Namer, node: ir.Node, base: str, new_nodes: list[ir.Node]
) -> ir.Value | None:
    """``beta * C`` of a Gemm (folded into a new initializer when C is constant), else None."""
    if node.op_type != "Gemm" or len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    c = node.inputs[2]
    beta = node.attributes.get_float("beta", 1.0)
    if beta == 1.0:
        return c
    if c.const_value is not None:
        return _initializer(graph, namer, f"{c.name}_scaled",
                            (c.const_value.numpy() * beta).astype(np.float32))
    factor = _initializer(graph, namer, f"{base}_beta", np.array(beta, np.float32))
    mul = ir.node("Mul", [c, factor], name=namer(f"{base}_beta_Mul"))
    mul.outputs[0].dtype = _FLOAT
    new_nodes.append(mul)
    return mul.outputs[0]


# ---------------------------------------------------------------------------------------------
# Weight-only modes: int4 blocks and binary signs.


def quantize_int4_blocks(weight: np.ndarray, axis: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 along ``axis`` in blocks of ``block``: (int4 values, float32 block scales).

    The scales have the weight's shape with ``ceil(dim / block)`` along ``axis``, the layout of a
    blocked DequantizeLinear (opset 21).
    """
    import ml_dtypes

    moved = np.moveaxis(weight.astype(np.float64), axis, 0)
    dim = moved.shape[0]
    blocks = -(-dim // block)
    padded = np.zeros((blocks * block, *moved.shape[1:]))
    padded[:dim] = moved
    amax = np.abs(padded.reshape(blocks, block, *moved.shape[1:])).max(axis=1)
    scales = np.where(amax > 0, amax / 7, 1.0)
    q = np.clip(np.round(moved / np.repeat(scales, block, axis=0)[:dim]), -8, 7)
    return (np.moveaxis(q, 0, axis).astype(ml_dtypes.int4),
            np.moveaxis(scales, 0, axis).astype(np.float32))


def pack_signs(weight: np.ndarray) -> np.ndarray:
    """One bit per weight, 1 where w >= 0, packed big-endian into uint8 (np.packbits order)."""
    return np.packbits((weight.ravel() >= 0).astype(np.uint8))


def unpack_signs(packed: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The +1/-1 float32 array ``pack_signs`` stored."""
    n = int(np.prod(shape))
    bits = np.unpackbits(packed)[:n].astype(np.float32)
    return (bits * 2 - 1).reshape(shape)


def binary_weight(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """XNOR-Net binary weights: (packed signs, alpha = mean |W| per output channel along ``axis``)."""
    moved = np.moveaxis(np.abs(weight.astype(np.float64)), axis, 0)
    alpha = moved.reshape(moved.shape[0], -1).mean(axis=1).astype(np.float32)
    return pack_signs(weight), alpha


def _binary_decode(
    graph: ir.Graph, namer: _Namer, node: ir.Node, w: ir.Value, axis: int
) -> list[ir.Node]:
    """Nodes that rebuild ``sign(W) * alpha`` from packed bits with standard ops.

    ``Unsqueeze(bits, [1]) >> [7..0] mod 2 -> Reshape(-1) -> Slice(0, n) -> Cast -> *2 - 1 ->
    Reshape(W.shape) * alpha``; every input is an initializer, so runtimes fold it at load. The
    last Mul carries the metadata ``slimgraph.binary_weight`` = ``axis=A`` for backends.
    """
    weight = w.const_value.numpy()
    packed, alpha = binary_weight(weight, axis)
    shape = [1] * weight.ndim
    shape[axis] = -1
    const = {
        "bits": packed,
        "shifts": np.arange(7, -1, -1, dtype=np.uint8),
        "two_u8": np.array(2, np.uint8),
        "axes": np.array([1], np.int64),
        "flat": np.array([-1], np.int64),
        "start": np.array([0], np.int64),
        "stop": np.array([weight.size], np.int64),
        "two": np.array(2, np.float32),
        "one": np.array(1, np.float32),
        "shape": np.array(weight.shape, np.int64),
        "alpha": alpha.reshape(shape),
    }
    v = {k: _initializer(graph, namer, f"{w.name}_binary_{k}", a) for k, a in const.items()}
    steps = [
        ("Unsqueeze", [v["bits"], v["axes"]], {}, ir.DataType.UINT8),
        ("BitShift", [None, v["shifts"]], {"direction": "RIGHT"}, ir.DataType.UINT8),
        ("Mod", [None, v["two_u8"]], {}, ir.DataType.UINT8),
        ("Reshape", [None, v["flat"]], {}, ir.DataType.UINT8),
        ("Slice", [None, v["start"], v["stop"]], {}, ir.DataType.UINT8),
        ("Cast", [None], {"to": _FLOAT}, _FLOAT),
        ("Mul", [None, v["two"]], {}, _FLOAT),
        ("Sub", [None, v["one"]], {}, _FLOAT),
        ("Reshape", [None, v["shape"]], {}, _FLOAT),
        ("Mul", [None, v["alpha"]], {}, _FLOAT),
    ]
    nodes: list[ir.Node] = []
    for op, inputs, attrs, dtype in steps:
        if nodes:
            inputs = [nodes[-1].outputs[0], *inputs[1:]]
        n = ir.node(op, inputs, attrs, name=namer(f"{w.name}_binary_{op}"))
        n.outputs[0].name, n.outputs[0].dtype = namer(f"{w.name}_binary_{op.lower()}"), dtype
        nodes.append(n)
    nodes[-1].outputs[0].shape = w.shape
    nodes[-1].metadata_props[BINARY_WEIGHT_TAG] = f"axis={axis}"
    return nodes


def _weight_only_axis(node: ir.Node, mode: str) -> int | None:
    """int4: the axis holding K (blocks run along the reduction); binary: the output channels."""
    if mode == "binary":
        return weight_axis(node)
    if node.op_type == "Conv":
        return None
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return 1
    return 0


def _apply_weight_only(model: ir.Model, mode: str, block: int, keep_float: set[str]) -> _Counts:
    """Replace each layer's float weight by a decode from int4 blocks or packed sign bits."""
    graph = model.graph
    ids = _layer_ids(graph)
    namer = _Namer(graph)
    counts = _Counts()
    decoded: dict[tuple[ir.Value, int], ir.Value] = {}
    for node in list(graph):
        if (
            node.op_type not in _LAYER_OPS or node.domain not in ("", "ai.onnx")
            or ids[node] in keep_float or _constant_weight(node) is None
        ):
            continue
        axis = _weight_only_axis(node, mode)
        if axis is None:
            continue
        w = node.inputs[1]
        if (w, axis) not in decoded:
            if mode == "binary":
                new_nodes = _binary_decode(graph, namer, node, w, axis)
            else:
                q, scales = quantize_int4_blocks(w.const_value.numpy(), axis, block)
                wq = _initializer(graph, namer, f"{w.name}_int4", q)
                ws = _initializer(graph, namer, f"{w.name}_scale", scales)
                dq = ir.node("DequantizeLinear", [wq, ws], {"axis": axis, "block_size": block},
                             name=namer(f"{w.name}_DequantizeLinear"))
                dq.outputs[0].name = namer(f"{w.name}_dequantized")
                dq.outputs[0].dtype, dq.outputs[0].shape = _FLOAT, w.shape
                new_nodes = [dq]
            graph.insert_before(node, new_nodes)
            decoded[(w, axis)] = new_nodes[-1].outputs[0]
        node.replace_input_with(1, decoded[(w, axis)])
        counts.layers += 1
    common.RemoveUnusedNodesPass()(model)
    return counts


# ---------------------------------------------------------------------------------------------
# The pass.


class InsertQDQPass(SlimgraphPass):
    """Quantizes a model: ``int8`` static (calibrated QDQ) or ``dynamic=true``.

    ``tolerance=`` (a minimum cosine to the float model on held-out calibration samples) turns on
    the accuracy guard: layers are ranked by the error each causes alone and the worst stay float
    until the tolerance holds. ``speed_check`` times the result against the float model in
    onnxruntime and warns in the report when int8 is not faster.
    """

    name = "quantize"
    tolerance: ClassVar[Tolerance] = INT8_TOLERANCE
    needs_calibration = True

    def __init__(
        self,
        mode: str = "int8",
        *,
        dynamic: bool = False,
        calib: str = "percentile",
        percentile: float = 99.999,
        activations: str = "auto",
        reduce_range: bool | None = None,
        tolerance: float | None = None,
        exclude: list[str] | None = None,
        speed_check: bool = True,
        block: int = 32,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
        if calib not in CALIBRATORS:
            raise ValueError(f"unknown calib {calib!r}; valid: {', '.join(CALIBRATORS)}")
        if activations not in ACTIVATION_TYPES:
            raise ValueError(f"unknown activations {activations!r}; valid: {', '.join(ACTIVATION_TYPES)}")
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        if tolerance is not None and not 0.0 < tolerance <= 1.0:
            raise ValueError(f"tolerance is a minimum cosine in (0, 1], got {tolerance}")
        if dynamic and activations == "s8":
            raise ValueError("dynamic=true quantizes activations to uint8 (DynamicQuantizeLinear)")
        self.mode = mode
        self.dynamic = dynamic
        self.calib = calib
        self.percentile = percentile
        self.activations = activations
        self.reduce_range = reduce_range
        self.tolerance = (
            INT8_TOLERANCE if tolerance is None
            else dataclasses.replace(INT8_TOLERANCE, min_cosine=min(tolerance, INT8_TOLERANCE.min_cosine))
        )
        self.guard_cosine = tolerance
        self.exclude = list(exclude or [])
        if block not in BLOCK_SIZES:
            raise ValueError(f"block must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block}")
        if mode != "int8" and (dynamic or activations != "auto" or reduce_range is not None):
            raise ValueError(f"mode {mode!r} is weight-only: dynamic, activations and reduce_range "
                             "apply to int8")
        self.block = block
        self.speed_check = speed_check
        self.needs_calibration = (mode == "int8" and not dynamic) or tolerance is not None
        if mode == "int4":
            self.tolerance = INT4_TOLERANCE if tolerance is None else dataclasses.replace(
                INT4_TOLERANCE, min_cosine=tolerance)
        elif mode == "binary":
            self.tolerance = BINARY_TOLERANCE if tolerance is None else dataclasses.replace(
                BINARY_TOLERANCE, min_cosine=tolerance)
        super().__init__()

    def options(self) -> dict:
        opts = super().options()
        opts["tolerance"] = self.guard_cosine
        return opts

    def target(self) -> Int8Target:
        """The int8 kernels aimed at: from the options, else from this CPU's flags."""
        detected = int8_target(cpu_flags())
        activations = {"u8": ir.DataType.UINT8, "s8": ir.DataType.INT8}.get(
            self.activations, detected.activations
        )
        if self.dynamic:
            activations = ir.DataType.UINT8
        reduce_range = detected.reduce_range if self.reduce_range is None else self.reduce_range
        reason = detected.reason if (self.activations == "auto" and self.reduce_range is None) else "as asked"
        return Int8Target(activations, reduce_range, reason)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not quantizable_layers(model, _dtypes(model)):
            self.report.notes.append("nothing to quantize: no Conv/Gemm/MatMul with a constant weight")
            return ir.passes.PassResult(model, False)
        if self.mode == "int4" and model.opset_imports.get("", 1) < 21:
            from onnxscript.version_converter import convert_version

            # Blocked DequantizeLinear with INT4 weights exists from opset 21 on.
            self.report.notes.append(f"opset {model.opset_imports.get('', 1)} -> 21 for int4 weights")
            convert_version(model, 21)
        dtypes = _dtypes(model)
        layers = quantizable_layers(model, dtypes)
        target = self.target()
        if self.mode == "int8":
            self.report.notes.append(f"int8 target: {target.describe()}")
        unknown = sorted(set(self.exclude) - set(layers))
        if unknown:
            self.report.notes.append(f"exclude: no quantizable layer named {', '.join(unknown)}")
        timed = self.speed_check and self.mode == "int8"
        float_model = model.clone() if (timed or self.guard_cosine is not None) else None
        feeds = list(self.calibration) if self.calibration is not None else []
        calib_feeds, held_out = _split(feeds)

        ranges: dict[str, tuple[float, float]] = {}
        static = self.mode == "int8" and not self.dynamic
        if static:
            wanted = _range_candidates(model, dtypes, set(self.exclude))
            ranges = collect_ranges(model, wanted, calib_feeds, self.calib, self.percentile)

        def build(keep_float: set[str], into: ir.Model) -> _Counts:
            if self.mode != "int8":
                return _apply_weight_only(into, self.mode, self.block, keep_float)
            if self.dynamic:
                return _apply_dynamic(into, dtypes, target, keep_float)
            return _apply_static(into, dtypes, ranges, target, keep_float)

        keep_float = set(self.exclude)
        if self.guard_cosine is not None:
            keep_float = self._guard(model, build, keep_float, layers, held_out)
        counts = build(keep_float, model)
        self.report.count("layers_quantized", counts.layers)
        self.report.count("layers_float", len([x for x in layers if x in keep_float]))
        if static:
            self.report.count("joins_quantized", counts.joins)
            self.report.count("relus_folded", counts.relus_folded)
            self.report.count("qdq_pairs", counts.qdq_pairs)
            self.report.count("biases_quantized", counts.biases)
        untouched = {"dynamic": "Conv", "int4": "Conv"}.get("dynamic" if self.dynamic else self.mode)
        convs = sum(1 for n in model.graph if n.op_type == "Conv") if untouched else 0
        if convs and self.dynamic:
            self.report.notes.append(
                f"dynamic: {convs} Conv node(s) stay float (onnxruntime has no u8s8 ConvInteger "
                "kernel on CPU); use static int8 for CNNs"
            )
        elif convs:
            self.report.notes.append(f"int4: {convs} Conv node(s) stay float (int4 is for MatMul/Gemm)")
        if timed and float_model is not None and counts.layers:
            self._speed_guard(float_model, model, held_out or feeds)
        logger.info("quantize: %s", self.report.counts)
        return ir.passes.PassResult(model, counts.layers > 0)

    def _guard(self, model, build, keep_float: set[str], layers: list[str],
               held_out: list[Feeds]) -> set[str]:
        """Keep the most sensitive layers float until the held-out cosine reaches the tolerance."""
        threshold = self.guard_cosine
        assert threshold is not None
        if not held_out:
            raise ValueError("the accuracy guard (tolerance=) needs calibration samples")
        reference = _run_all(model, held_out)

        def cosine(keep: set[str]) -> float:
            candidate = model.clone()
            build(keep, candidate)
            return _min_cosine(reference, _run_all(candidate, held_out))

        score = cosine(keep_float)
        self.report.notes.append(f"accuracy guard: all layers int8 -> cosine {score:.5f}")
        if score >= threshold:
            return keep_float
        active = [x for x in layers if x not in keep_float]
        errors = {x: 1.0 - cosine(set(layers) - {x}) for x in active}
        ranked = sorted(active, key=lambda x: -errors[x])
        self.report.notes.append(
            "layer sensitivity (1 - cosine, alone): "
            + ", ".join(f"{x}={errors[x]:.3g}" for x in ranked)
        )
        fallen: list[str] = []
        for layer in ranked:
            keep_float = keep_float | {layer}
            fallen.append(layer)
            score = cosine(keep_float)
            if score >= threshold:
                break
        verdict = "holds" if score >= threshold else "STILL MISSED"
        self.report.notes.append(
            f"accuracy guard: kept float {', '.join(fallen)} -> cosine {score:.5f}, "
            f"tolerance {threshold:g} {verdict}"
        )
        return keep_float

    def _speed_guard(self, float_model: ir.Model, model: ir.Model, feeds: list[Feeds]) -> None:
        from slimgraph.frontend import random_feeds

        feed = feeds[0] if feeds else random_feeds(float_model, batch=1)
        ratio = latency_ratio(float_model, model, feed)
        logger.info("quantize: int8/fp32 latency %.3fx", ratio)
        if ratio >= 1.0:
            warning = (
                "WARNING: speed guard: the int8 model is NOT faster than fp32 in onnxruntime here "
                "(int8/fp32 latency >= 1.0x); check the activation type and which nodes fused"
            )
            logger.warning("quantize: %s (%.2fx)", warning, ratio)
            self.report.notes.append(warning)
        else:
            self.report.notes.append("speed guard: the int8 model is faster than fp32 in onnxruntime")


def latency_ratio(float_model: ir.Model, quantized: ir.Model, feed: Feeds, threads: int = 2,
                  rounds: int = _SPEED_ROUNDS) -> float:
    """Median quantized/float latency over interleaved rounds (onnxruntime CPU, no spinning)."""
    from slimgraph.backends.ort import session_for

    config = {"allow_spinning": False, "intra_op_num_threads": threads}
    sessions = [session_for(_serialize(m), config) for m in (float_model, quantized)]
    inputs = [_inputs_of(s, feed) for s in sessions]
    for s, x in zip(sessions, inputs, strict=True):
        s.run(None, x)
    per_round = max(1, int(0.05 / max(_time_once(sessions[0], inputs[0]), 1e-6)))
    times: list[list[float]] = [[], []]
    for _ in range(rounds):
        for i, (s, x) in enumerate(zip(sessions, inputs, strict=True)):
            start = time.perf_counter()
            for _ in range(per_round):
                s.run(None, x)
            times[i].append((time.perf_counter() - start) / per_round)
    return statistics.median(times[1]) / statistics.median(times[0])


def _time_once(session, feed: Feeds) -> float:
    start = time.perf_counter()
    session.run(None, feed)
    return time.perf_counter() - start


def _split(feeds: list[Feeds]) -> tuple[list[Feeds], list[Feeds]]:
    """Calibration and held-out feeds: the last quarter is held out (all of them below 4)."""
    if len(feeds) < 4:
        return feeds, feeds
    held = max(1, len(feeds) // 4)
    return feeds[:-held], feeds[-held:]


def _run_all(model: ir.Model, feeds: list[Feeds]) -> list[list[np.ndarray]]:
    from slimgraph.backends.ort import session_for

    session = session_for(_serialize(model), {"allow_spinning": False})
    return [session.run(None, _inputs_of(session, f)) for f in feeds]


def _min_cosine(reference: list[list[np.ndarray]], actual: list[list[np.ndarray]]) -> float:
    from slimgraph.verify import compare_outputs

    names = [str(i) for i in range(len(reference[0]))]
    return min(m.cosine for m in compare_outputs(names, reference, actual))


def _dtypes(model: ir.Model) -> dict[str, ir.DataType]:
    """Element type of every value, with shape inference on a copy where the graph lacks types."""
    probe = model.clone()
    if any(v.dtype is None for n in probe.graph for v in n.outputs):
        try:
            common.ShapeInferencePass()(probe)
        except Exception as exc:  # onnx shape inference rejects some valid graphs
            logger.info("quantize: shape inference failed (%s); using the types present", exc)
    dtypes = {name: v.dtype for name, v in _values_by_name(probe.graph).items() if v.dtype is not None}
    for name, v in probe.graph.initializers.items():
        if v.const_value is not None:
            dtypes[name] = v.const_value.dtype
    return dtypes


def _range_candidates(model: ir.Model, dtypes: dict[str, ir.DataType], keep_float: set[str]) -> list[str]:
    """Every value the full int8 placement may quantize (fallbacks only ever drop some)."""
    probe = model.clone()
    placement = _place(probe.graph, dtypes, keep_float)
    names = {placement.range_of[v] for v in placement.quantized}
    # A layer kept float by the guard un-folds its Relu, so both sides of each Relu are needed.
    for y, relu in placement.folded_relus.items():
        names |= {y.name, relu.outputs[0].name}
    for node in placement.int8_nodes:
        names |= {v.name for v in (*node.inputs, *node.outputs) if _is_float_activation(v, dtypes)}
    return sorted(names)
