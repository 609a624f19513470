"""Counts over an IR model: weights, parameters, ops and MACs (what `slimgraph inspect` shows)."""

from __future__ import annotations

import collections
import dataclasses
import logging
import math

import onnx_ir as ir

# onnx_ir's ShapeInferencePass catches onnx's failure itself, leaves the model unchanged and logs
# a warning with the traceback; infer_shapes turns that record into its return value.
_SHAPE_LOGGER = logging.getLogger("onnx_ir.passes.common.shape_inference")


class _Failure(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.cause: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        self.cause = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() \
            else (type(exc).__name__ if exc is not None else record.getMessage())
        return False


def infer_shapes(model: ir.Model) -> str | None:
    """Fill in the shapes and types onnx can infer, in place, best effort: when onnx's inference
    rejects the graph, the model keeps what it declares and the cause (one line) is returned."""
    failure = _Failure()
    _SHAPE_LOGGER.addFilter(failure)
    try:
        ir.passes.common.ShapeInferencePass()(model)
    finally:
        _SHAPE_LOGGER.removeFilter(failure)
    return failure.cause


def _initializer_tensors(model: ir.Model):
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            yield value.const_value
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant" and node.domain == "":
            attr = node.attributes.get("value")
            if attr is not None and attr.type == ir.AttributeType.TENSOR:
                yield attr.value


def weight_bytes(model: ir.Model) -> int:
    """Bytes of all initializers and Constant tensors, as stored."""
    return sum(t.nbytes for t in _initializer_tensors(model))


def param_count(model: ir.Model) -> int:
    """Number of scalar elements in all initializers and Constant tensors."""
    return sum(math.prod(t.shape.numpy()) for t in _initializer_tensors(model))


def op_histogram(model: ir.Model) -> dict[str, int]:
    counter = collections.Counter(
        (f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
        for n in ir.traversal.RecursiveGraphIterator(model.graph)
    )
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclasses.dataclass
class LayerMacs:
    """One node's work: multiply-accumulates and the bytes it moves at the counted batch.

    ``weight_bytes`` are its constant inputs as stored; ``read_bytes`` / ``write_bytes`` its
    activation inputs and outputs (symbolic dims read as the batch; unknown shapes count 0).
    """

    node: str
    op_type: str
    macs: int
    weight_bytes: int = 0
    read_bytes: int = 0
    write_bytes: int = 0

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.read_bytes + self.write_bytes

    @property
    def intensity(self) -> float:
        """Arithmetic intensity: operations (2 per MAC) per byte moved."""
        return 2 * self.macs / self.bytes if self.bytes else 0.0

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "intensity": round(self.intensity, 3)}



def _shape_with_batch(value: ir.Value | None, batch: int) -> list[int] | None:
    """Static dims of a value, with symbolic dims read as ``batch`` (one sample per symbol)."""
    if value is None or value.shape is None:
        return None
    dims = []
    for d in value.shape:
        dims.append(d if isinstance(d, int) else batch)
    return dims


def layer_macs(model: ir.Model, batch: int = 1) -> list[LayerMacs]:
    """The matrix ops' rows of ``layer_costs`` (Conv, ConvTranspose, Gemm, MatMul, LSTM/GRU)."""
    return [row for row, matrix in _costs(model, batch) if matrix]


def layer_costs(model: ir.Model, batch: int = 1) -> list[LayerMacs]:
    """Every node's MACs (0 outside the matrix ops) and bytes moved, in graph order.

    Needs shapes in the graph (run shape inference first); symbolic dims count as ``batch``.
    """
    return [row for row, _ in _costs(model, batch)]


def _costs(model: ir.Model, batch: int):
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant":
            continue
        macs = _node_macs(node, batch)
        row = LayerMacs(node.name or node.op_type, node.op_type, macs or 0)
        for value in node.inputs:
            if value is None:
                continue
            constant = _constant(value)
            if constant is not None:
                row.weight_bytes += constant.nbytes
            else:
                row.read_bytes += _value_bytes(value, batch)
        row.write_bytes = sum(_value_bytes(v, batch) for v in node.outputs)
        yield row, macs is not None


def _constant(value: ir.Value):
    """The tensor of an initializer or a Constant node's output, else None."""
    if value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant":
        attr = producer.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return attr.value
    return None


def _value_bytes(value: ir.Value, batch: int) -> int:
    dims = _shape_with_batch(value, batch)
    if dims is None or value.dtype is None:
        return 0
    return math.ceil(math.prod(dims) * value.dtype.bitwidth / 8)


def _node_macs(node: ir.Node, batch: int) -> int | None:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return None
    if op in ("Conv", "ConvTranspose") and len(node.inputs) > 1:
        w = _shape_with_batch(node.inputs[1], batch)
        out = _shape_with_batch(node.outputs[0], batch)
        x = _shape_with_batch(node.inputs[0], batch)
        if w is None or out is None or x is None:
            return None
        kernel = math.prod(w[2:])
        if op == "Conv":
            # out elements x (Cin/groups x kernel)
            return math.prod(out) * w[1] * kernel
        # ConvTranspose: every input element scatters into Cout/groups x kernel outputs.
        return math.prod(x) * w[1] * kernel
    if op in ("Gemm", "MatMul"):
        a = _shape_with_batch(node.inputs[0], batch)
        out = _shape_with_batch(node.outputs[0], batch)
        if a is None or out is None or not a:
            return None
        trans_a = op == "Gemm" and node.attributes.get_int("transA", 0)
        k = a[0] if trans_a else a[-1]
        return math.prod(out) * k
    if op in ("LSTM", "GRU", "RNN") and len(node.inputs) > 2:
        x = _shape_with_batch(node.inputs[0], batch)
        w = _shape_with_batch(node.inputs[1], batch)
        r = _shape_with_batch(node.inputs[2], batch)
        if x is None or w is None or r is None:
            return None
        seq, n = x[0], x[1]
        # W: [dirs, gates*H, in], R: [dirs, gates*H, H]
        return seq * n * (math.prod(w) + math.prod(r))
    return None


@dataclasses.dataclass
class ModelSummary:
    """What `slimgraph inspect` shows."""

    inputs: list[dict]
    outputs: list[dict]
    ops: dict[str, int]
    nodes: int
    params: int
    weight_bytes: int
    layers: list[LayerMacs]
    batch: int

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["layers"] = [layer.to_json() for layer in self.layers]
        data["total_macs"] = self.total_macs
        return data


def summarize(model: ir.Model, batch: int = 1) -> ModelSummary:
    """Shape-infer ``model`` in place (shapes only) and count its ops, weights and MACs."""
    # A graph onnx shape inference cannot handle still gets counted: MACs then cover the layers
    # whose shapes the exporter recorded.
    infer_shapes(model)

    def value_json(v: ir.Value) -> dict:
        shape = None if v.shape is None else [d if isinstance(d, int) else str(d) for d in v.shape]
        return {"name": v.name, "dtype": v.dtype.name if v.dtype else None, "shape": shape}

    return ModelSummary(
        inputs=[value_json(v) for v in model.graph.inputs],
        outputs=[value_json(v) for v in model.graph.outputs],
        ops=op_histogram(model),
        nodes=sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph)),
        params=param_count(model),
        weight_bytes=weight_bytes(model),
        layers=layer_macs(model, batch),
        batch=batch,
    )
