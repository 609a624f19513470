"""SmoothQuant: move activation outliers into the weights of MatMul/Gemm layers, exactly in float.

For a layer ``y = x W`` with W[K, N] and any per-input-channel factor s_k > 0,

    y = (x / s) (diag(s) W)

holds in real arithmetic. Transformer activations have a few channels far larger than the rest,
so a per-tensor activation scale wastes most int8 levels on them; weights are quantized per output
channel and absorb a row scaling well. With a_k = max |x_k| over calibration and
w_k = max_n |W_kn|, SmoothQuant (Xiao et al. 2023) picks

    s_k = a_k^alpha / w_k^(1 - alpha)

so that after the move both sides have channel maxima a_k^(1-alpha) w_k^alpha: alpha = 0 leaves
the activations, 1 flattens them completely (at the weights' expense). For int4 weight-only
layers a small alpha works the other way round (as AWQ does): the weight rows that meet large
activations are scaled up and so lose less to int4 rounding. Layers that read the same x
(attention's Q, K and V) share one s, with w_k the maximum over their weights, and one
``Mul(x, 1/s)`` that feeds only them; other readers of x (a residual Add) still see x.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slimgraph.passes.quantize.layers import FLOAT, Namer, add_initializer, layer_ids

_SMOOTH_OPS = frozenset({"MatMul", "Gemm"})
_S_MIN, _S_MAX = 1e-5, 1e5  # keeps 1/s and s * W finite in float32


def reduction_axis(node: ir.Node) -> int:
    """The axis of a MatMul/Gemm weight that is summed over (K): 0 for W[K, N], 1 for Gemm transB."""
    return 1 if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else 0


def smoothing_groups(graph: ir.Graph, layers: set[str]) -> dict[ir.Value, list[ir.Node]]:
    """The MatMul/Gemm nodes among ``layers`` grouped by the activation they read."""
    ids = layer_ids(graph)
    groups: dict[ir.Value, list[ir.Node]] = {}
    for node in graph:
        if ids[node] in layers and node.op_type in _SMOOTH_OPS:
            groups.setdefault(node.inputs[0], []).append(node)
    return groups


def smoothing_factors(act_absmax: np.ndarray, weights: list[np.ndarray], axes: list[int],
                      alpha: float) -> np.ndarray:
    """s_k = a_k^alpha / w_k^(1 - alpha) (module docstring); 1 where a channel is all zero."""
    w = np.max([np.abs(np.moveaxis(x, axis, 0)).max(axis=1) for x, axis in zip(weights, axes, strict=True)],
               axis=0).astype(np.float64)
    a = act_absmax.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where((a > 0) & (w > 0), a**alpha / w ** (1 - alpha), 1.0)
    return np.clip(s, _S_MIN, _S_MAX)


def smooth_layers(model: ir.Model, groups: dict[ir.Value, list[ir.Node]],
                  absmax: dict[str, np.ndarray], alpha: float) -> int:
    """Insert ``Mul(x, 1/s)`` before each group and scale its weights by s; returns layers smoothed."""
    graph = model.graph
    namer = Namer(graph)
    smoothed = 0
    for x, nodes in groups.items():
        a = absmax.get(x.name)
        weights = [n.inputs[1].const_value.numpy() for n in nodes]
        axes = [reduction_axis(n) for n in nodes]
        if a is None or any(w.shape[axis] != a.shape[0] for w, axis in zip(weights, axes, strict=True)):
            continue
        s = smoothing_factors(a, weights, axes, alpha)
        inverse = add_initializer(graph, namer, f"{x.name}_smooth", (1.0 / s).astype(np.float32))
        mul = ir.node("Mul", [x, inverse], name=namer(f"{x.name}_smooth_Mul"))
        mul.outputs[0].name = namer(f"{x.name}_smoothed")
        mul.outputs[0].dtype, mul.outputs[0].shape = FLOAT, x.shape
        graph.insert_before(nodes[0], mul)
        for node, w, axis in zip(nodes, weights, axes, strict=True):
            shape = [1, 1]
            shape[axis] = -1
            scaled = (w.astype(np.float64) * s.reshape(shape)).astype(np.float32)
            name = node.inputs[1].name
            node.replace_input_with(0, mul.outputs[0])
            node.replace_input_with(1, add_initializer(graph, namer, f"{name}_smoothed", scaled))
            smoothed += 1
    return smoothed
