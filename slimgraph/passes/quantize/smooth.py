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

``smooth=auto`` searches the factors per group instead (``search_factors``): on sampled calibration
rows X of the group's input it tries no smoothing, SmoothQuant's s for alpha 0.1 ... 1, and AWQ's
``s = a^alpha`` (Lin et al. 2024) for the same alphas, quantizes ``diag(s) W`` exactly as the
mode will (and ``X / s`` too, for int8), and keeps the factors whose quantized product is closest
to the float ``X W``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from slimgraph.passes.quantize.layers import FLOAT, Namer, add_initializer, layer_ids

_SMOOTH_OPS = frozenset({"MatMul", "Gemm"})
_S_MIN, _S_MAX = 1e-5, 1e5  # keeps 1/s and s * W finite in float32
SEARCH_ALPHAS = tuple(round(0.1 * i, 1) for i in range(1, 11))


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


def _kn(weight: np.ndarray, axis: int) -> np.ndarray:
    """A MatMul/Gemm weight as [K, N] float64 (K, the reduction, first)."""
    return (weight if axis == 0 else weight.T).astype(np.float64)


def alpha_factors(groups: dict[ir.Value, list[ir.Node]], absmax: dict[str, np.ndarray],
                  alpha: float) -> dict[ir.Value, np.ndarray]:
    """SmoothQuant's factors at one ``alpha`` for every group whose input has statistics."""
    factors = {}
    for x, nodes in groups.items():
        a = absmax.get(x.name)
        weights = [n.inputs[1].const_value.numpy() for n in nodes]
        axes = [reduction_axis(n) for n in nodes]
        if a is not None and all(w.shape[axis] == a.shape[0] for w, axis in zip(weights, axes, strict=True)):
            factors[x] = smoothing_factors(a, weights, axes, alpha)
    return factors


def fake_quant_activation(x: np.ndarray) -> np.ndarray:
    """``x`` through per-tensor asymmetric uint8 and back (the int8 modes' activations)."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if high <= low:
        return x
    scale = (high - low) / 255.0
    zero = np.round(-low / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def search_factors(
    groups: dict[ir.Value, list[ir.Node]], absmax: dict[str, np.ndarray], samples: dict[str, np.ndarray],
    dequantized: Callable[[np.ndarray], np.ndarray], quantize_inputs: bool,
) -> tuple[dict[ir.Value, np.ndarray], dict[str, str]]:
    """Per group, the candidate factors (module docstring) with the least relative squared error
    of the quantized product on the sampled rows; also which candidate won, by input name.

    ``dequantized`` maps a [K, N] weight to its quantized-then-dequantized value; with
    ``quantize_inputs`` the scaled rows go through uint8 too.
    """
    factors, chosen = {}, {}
    for x, nodes in groups.items():
        a, rows = absmax.get(x.name), samples.get(x.name)
        weights = [_kn(n.inputs[1].const_value.numpy(), reduction_axis(n)) for n in nodes]
        if a is None or rows is None or any(w.shape[0] != a.shape[0] for w in weights):
            continue
        rows = rows.astype(np.float64)
        reference = [rows @ w for w in weights]
        total = sum(float((r**2).sum()) for r in reference) or 1.0
        candidates = {"none": np.ones_like(a, dtype=np.float64)}
        for alpha in SEARCH_ALPHAS:
            candidates[f"smoothquant {alpha:g}"] = smoothing_factors(a, weights, [0] * len(weights), alpha)
            awq = np.where(a > 0, a.astype(np.float64) ** alpha, 1.0)
            candidates[f"awq {alpha:g}"] = np.clip(awq / np.exp(np.log(awq).mean()), _S_MIN, _S_MAX)

        errors = {name: _product_error(rows, weights, reference, s, dequantized, quantize_inputs) / total
                  for name, s in candidates.items()}
        best = min(errors, key=errors.__getitem__)
        factors[x], chosen[x.name] = candidates[best], best
    return factors, chosen


def _product_error(rows: np.ndarray, weights: list[np.ndarray], reference: list[np.ndarray], s: np.ndarray,
                   dequantized: Callable[[np.ndarray], np.ndarray], quantize_inputs: bool) -> float:
    """Squared error of the quantized ``(rows / s) (diag(s) W)`` against ``rows W``, over the group."""
    scaled = rows / s
    if quantize_inputs:
        scaled = fake_quant_activation(scaled)
    return sum(float(((scaled @ dequantized(w * s[:, None]) - r) ** 2).sum())
               for w, r in zip(weights, reference, strict=True))


def smooth_layers(model: ir.Model, groups: dict[ir.Value, list[ir.Node]],
                  factors: dict[ir.Value, np.ndarray]) -> int:
    """Insert ``Mul(x, 1/s)`` before each group with factors and scale its weights by s; returns
    the layers smoothed. A group whose factors are all 1 is left as it is."""
    graph = model.graph
    namer = Namer(graph)
    smoothed = 0
    for x, nodes in groups.items():
        s = factors.get(x)
        if s is None or np.all(s == 1.0):
            continue
        weights = [n.inputs[1].const_value.numpy() for n in nodes]
        axes = [reduction_axis(n) for n in nodes]
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
