"""Which nodes are quantizable layers, and the graph edits every quantization mode shares."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

LAYER_OPS = frozenset({"Conv", "Gemm", "MatMul"})
FLOAT = ir.DataType.FLOAT


def weight_axis(node: ir.Node) -> int:
    """The axis of the node's weight (input 1) that holds its output channels."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return 1  # MatMul [K, N]


def layer_ids(graph: ir.Graph) -> dict[ir.Node, str]:
    """A stable id per node: its name, or ``OpType_i`` (the i-th node of that type) where it has none.

    Counting per op type keeps the ids of layers when other nodes (a smoothing Mul) are inserted.
    """
    seen: dict[str, int] = {}
    ids = {}
    for node in graph:
        i = seen[node.op_type] = seen.get(node.op_type, -1) + 1
        ids[node] = node.name or f"{node.op_type}_{i}"
    return ids


def is_float_activation(value: ir.Value | None, dtypes: dict[str, ir.DataType]) -> bool:
    return (
        value is not None
        and value.const_value is None
        and dtypes.get(value.name) == FLOAT
    )


def constant_weight(node: ir.Node) -> np.ndarray | None:
    """The node's float constant weight (input 1) if it has one of the rank its op needs."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    w = node.inputs[1]
    if w.const_value is None or w.is_graph_input() or w.const_value.dtype != FLOAT:
        return None
    array = w.const_value.numpy()
    rank_ok = array.ndim >= 3 if node.op_type == "Conv" else array.ndim == 2
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return None
    return array if rank_ok else None


def quantizable_layers(model: ir.Model, dtypes: dict[str, ir.DataType]) -> list[str]:
    """Ids of the Conv/Gemm/MatMul nodes with a constant float weight and a float activation."""
    ids = layer_ids(model.graph)
    return [
        ids[node] for node in model.graph
        if node.op_type in LAYER_OPS and node.domain in ("", "ai.onnx")
        and constant_weight(node) is not None and is_float_activation(node.inputs[0], dtypes)
    ]


class Namer:
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


def add_initializer(graph: ir.Graph, namer: Namer, base: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=namer(base), const_value=ir.tensor(array))
    value.dtype = value.const_value.dtype
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    return value


def replace_node(graph: ir.Graph, node: ir.Node, new_nodes: list[ir.Node], result: ir.Value) -> None:
    """Put ``new_nodes`` (computing ``result``) where ``node`` was, move every use of its output to
    ``result`` (a graph output keeps its name) and drop it."""
    graph.insert_before(node, new_nodes)
    old = node.outputs[0]
    result.shape, name, is_output = old.shape, old.name, old.is_graph_output()
    old.replace_all_uses_with(result, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    if is_output:
        result.name = name


def add_stored_as(graph: ir.Graph, namer: Namer, base: str, array: np.ndarray,
                  stored: type) -> ir.Value:
    """``array`` kept as a narrower ``stored`` initializer and widened back by a Cast at the top.

    The Cast depends only on an initializer, so onnxruntime folds it at load (before its QDQ
    fusion looks at the graph): the runtime sees ``array``; only the file is smaller. The caller
    guarantees ``array`` round-trips exactly through ``stored``.
    """
    narrow = add_initializer(graph, namer, f"{base}_{np.dtype(stored).name}", array.astype(stored))
    cast = ir.node("Cast", [narrow], {"to": ir.DataType.from_numpy(array.dtype)},
                   name=namer(f"{base}_Cast"))
    cast.outputs[0].name = namer(base)
    cast.outputs[0].dtype, cast.outputs[0].shape = ir.DataType.from_numpy(array.dtype), narrow.shape
    graph.insert_before(graph[0], cast)
    return cast.outputs[0]


def fp16_ceil(values: np.ndarray) -> np.ndarray | None:
    """The smallest float16 values >= ``values`` (as float32), or None outside float16's normal range.

    Rounding scales up keeps ``|W| / s <= Q``: no weight clips.
    """
    if values.size == 0 or values.min() < np.finfo(np.float16).tiny or values.max() > 6e4:
        return None
    half = values.astype(np.float16)
    half = np.where(half.astype(np.float32) < values, np.nextafter(half, np.float16(np.inf)), half)
    return half.astype(np.float32)


@dataclasses.dataclass
class Counts:
    layers: int = 0
    joins: int = 0
    relus_folded: int = 0
    qdq_pairs: int = 0
    biases: int = 0
    embeddings: int = 0
    gptq: int = 0
    biases_corrected: int = 0

