"""sparsify: magnitude pruning of weights to a target sparsity, unstructured or N:M.

Which weights: the constant float weight (input 1) of every Conv, Gemm and MatMul, as
quantize sees them (``quantize.layers.constant_weight``); biases, norms and embedding tables
stay dense. ``skip=`` names layers to leave dense (node names, or their weights' names).

Unstructured: the smallest ``|w|`` go until ``sparsity`` of the weights are zero, under one
threshold for every layer (``scope=global``: layers of small weights lose more) or per layer
(``scope=layer``). Ties at the threshold are broken by position, so exactly the requested count
goes.

N:M (``pattern=2:4`` or ``4:8``): in every M consecutive weights along the reduction axis, at most N
are non-zero (the largest ``|w|`` stay), the layout GPU sparse tensor cores run. The reduction
axis is a Gemm's/MatMul's K and a Conv's input channels (per output channel and kernel position);
a layer whose reduction length is not a multiple of M stays dense and is named in the report.
``sparsity`` is then ``1 - N/M`` and may be left out.

The zeros are exact, and heal keeps them (it records a mask of a weight's zeros when it builds
its module).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from slimgraph.errors import PipelineSpecError, UnsupportedOpError
from slimgraph.passes.base import SlimgraphPass, one_of
from slimgraph.passes.prune.channels import _QDQ_OPS
from slimgraph.passes.quantize.layers import LAYER_OPS, constant_weight, layer_ids
from slimgraph.tolerance import LOSSY

logger = logging.getLogger(__name__)

PATTERNS = ("unstructured", "2:4", "4:8")
SCOPES = ("layer", "global")


def _reduction_view(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """``w`` transposed so that the last axis is the reduction axis (a view where possible)."""
    if node.op_type == "Conv":  # [O, I, kh, kw] -> [O, kh, kw, I]
        return np.moveaxis(w, 1, -1)
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return w  # [N, K]
    return w.T  # Gemm [K, N], MatMul [K, N] -> [N, K]


def n_of_m_mask(node: ir.Node, w: np.ndarray, n: int, m: int) -> np.ndarray | None:
    """True where a weight stays under the N:M pattern; None if the reduction length is not a
    multiple of M."""
    view = _reduction_view(node, np.abs(w))
    if view.shape[-1] % m:
        return None
    groups = view.reshape(-1, m)
    # The N largest of each group stay; a stable sort keeps the earlier of equal magnitudes.
    order = np.argsort(-groups, axis=1, kind="stable")
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    keep = keep.reshape(view.shape)
    if node.op_type == "Conv":
        return np.moveaxis(keep, -1, 1)
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return keep
    return keep.T


def _magnitude_keep(magnitudes: np.ndarray, sparsity: float) -> np.ndarray:
    """True for all but the ``round(sparsity * size)`` smallest entries (ties broken by position)."""
    flat = magnitudes.ravel()
    k = int(round(sparsity * flat.size))
    keep = np.ones(flat.size, dtype=bool)
    if k:
        keep[np.argsort(flat, kind="stable")[:k]] = False
    return keep.reshape(magnitudes.shape)


def refuse_quantized(model: ir.Model, name: str) -> None:
    qdq = next((n for n in model.graph if n.op_type in _QDQ_OPS), None)
    if qdq is not None:
        raise UnsupportedOpError(
            f"{name}: the graph is already quantized ({qdq.op_type}); {name} before "
            f"quantizing, e.g. '{name},heal,quantize:int8'")


def weighted_layers(model: ir.Model, skip: list[str] | None, name: str
                    ) -> list[tuple[ir.Node, str, np.ndarray]]:
    """(node, layer id, weight) of every Conv/Gemm/MatMul with a constant float weight, less the
    layers ``skip`` names (by layer id or weight name; an unknown name is an error)."""
    ids = layer_ids(model.graph)
    found = []
    for node in model.graph:
        if node.op_type not in LAYER_OPS or node.domain not in ("", "ai.onnx"):
            continue
        w = constant_weight(node)
        if w is not None:
            found.append((node, ids[node], w))
    skip_set = set(skip or [])
    names = {layer for _, layer, _ in found} | {node.inputs[1].name for node, _, _ in found}
    unknown = sorted(skip_set - names)
    if unknown:
        raise PipelineSpecError(
            f"{name}: skip names unknown layers {unknown}; layers with weights: "
            f"{', '.join(layer for _, layer, _ in found) or 'none'}")
    return [(node, layer, w) for node, layer, w in found
            if layer not in skip_set and node.inputs[1].name not in skip_set]


class SparsifyPass(SlimgraphPass):
    """Zeroes the smallest weights: to ``sparsity`` per layer or globally, or to an N:M pattern."""

    name = "sparsify"
    tolerance = LOSSY
    positional_option = "sparsity"  # sparsify:0.9 is sparsify:sparsity=0.9

    def __init__(self, sparsity: float | None = None, scope: str = "layer",
                 pattern: str = "unstructured", skip: list[str] | None = None) -> None:
        where = "sparsify"
        one_of(where, "pattern", pattern, PATTERNS)
        one_of(where, "scope", scope, SCOPES)
        if pattern != "unstructured":
            n, m = map(int, pattern.split(":"))
            implied = 1 - n / m
            if sparsity is not None and abs(sparsity - implied) > 1e-9:
                raise PipelineSpecError(f"{where}: pattern={pattern} means sparsity {implied:g}, "
                                        f"got sparsity={sparsity:g}")
            sparsity = implied
        if sparsity is None:
            raise PipelineSpecError(f"{where}: give the sparsity, e.g. 'sparsify:0.9'")
        if not 0 < sparsity < 1:
            raise PipelineSpecError(f"{where}: sparsity must be in (0, 1), got {sparsity:g}")
        self.sparsity, self.scope, self.pattern, self.skip = sparsity, scope, pattern, skip
        super().__init__()

    def options(self) -> dict[str, object]:
        defaults = {"scope": "layer", "pattern": "unstructured", "skip": None}
        opts = super().options()
        if self.pattern != "unstructured":
            opts.pop("sparsity")  # implied by the pattern
        return {k: ("+".join(v) if isinstance(v, list) else v) for k, v in opts.items()
                if k not in defaults or v != defaults[k]}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        refuse_quantized(model, self.name)
        layers = weighted_layers(model, self.skip, self.name)
        if not layers:
            return ir.passes.PassResult(model, False)
        masks = self._masks(layers)
        zeroed = total = 0
        for (node, name, w), keep in zip(layers, masks, strict=True):
            total += w.size
            if keep is None:
                self.report.notes.append(f"{name}: left dense (reduction length not a multiple "
                                         f"of {self.pattern.split(':')[1]})")
                continue
            new = np.where(keep, w, np.float32(0)).astype(w.dtype)
            zeros = int(np.sum(new == 0))
            zeroed += zeros - int(np.sum(w == 0))
            weight = node.inputs[1]
            weight.const_value = ir.tensor(new, name=weight.name)
            self.report.notes.append(f"{name}: sparsity {zeros / w.size:.4f} "
                                     f"({zeros:,} of {w.size:,} weights zero)")
        self.report.count("layers", len(layers))
        self.report.count("weights", total)
        self.report.count("weights_zeroed", zeroed)
        self.report.notes.insert(0, f"sparsify: {zeroed:,} of {total:,} weights newly zero "
                                    f"({self.pattern}, scope {self.scope})")
        logger.info("sparsify zeroed %d of %d weights", zeroed, total)
        return ir.passes.PassResult(model, zeroed > 0)

    def _masks(self, layers) -> list[np.ndarray | None]:
        if self.pattern != "unstructured":
            n, m = map(int, self.pattern.split(":"))
            return [n_of_m_mask(node, w, n, m) for node, _, w in layers]
        if self.scope == "layer":
            return [_magnitude_keep(np.abs(w), self.sparsity) for _, _, w in layers]
        flat = np.concatenate([np.abs(w).ravel() for _, _, w in layers])
        keep = _magnitude_keep(flat, self.sparsity)
        out, start = [], 0
        for _, _, w in layers:
            out.append(keep[start:start + w.size].reshape(w.shape))
            start += w.size
        return out
