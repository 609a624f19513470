"""share-weights: k-means weight sharing (Deep Compression's second stage) in standard ONNX.

Each Conv/Gemm/MatMul weight's non-zero values are clustered into ``2**bits`` centroids by 1-D
k-means (linear initialisation over [min, max], which Han et al. found best, then Lloyd steps).
The weight becomes::

    W = Gather(codebook, Cast<int64>(index))      index: uint8 (uint16 past 255 entries), W's shape

A weight with zeros (after sparsify) gets a codebook whose entry 0 is an exact zero and the
centroids after it, so its index is itself sparse (0 where the weight is zero) and fold-sparse
stores it once: positions plus ``bits``-bit codes, as Deep Compression stores them. The Gather
is tagged ``slimgraph.codebook_zero`` and heal holds that entry at zero. Every input is an
initializer, so onnxruntime folds the decode once when it loads the model and runs at dense
speed. ``scope=layer`` gives each layer its own codebook, ``scope=global`` one shared by all.
Heal trains the codebook (the gradient of every weight in a cluster sums into its centroid, as
in Deep Compression) and keeps the assignments and the zeros: they are integer initializers.
``biases=true`` clusters each layer's bias with its weights (the same codebook): on a small
model the float biases are a large part of what is left once the weights are coded.
Run it after the passes that rewrite weights (a later fold-constants would fold the decode back
into a dense tensor).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.tape import Tape

from slimgraph.errors import PipelineSpecError
from slimgraph.passes.base import SlimgraphPass, one_of
from slimgraph.passes.quantize.layers import Namer, add_initializer
from slimgraph.passes.sparse.sparsify import SCOPES, refuse_quantized, weighted_layers
from slimgraph.tags import CODEBOOK_ZERO_TAG
from slimgraph.tolerance import LOSSY


def kmeans_1d(values: np.ndarray, k: int, iterations: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (sorted, float32) and each value's cluster index, by Lloyd's algorithm from a
    linear initialisation. An empty cluster keeps its previous centroid."""
    values = values.astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    centroids = np.linspace(lo, hi, k) if hi > lo else np.full(k, lo)
    assign = np.zeros(values.size, dtype=np.int64)
    for _ in range(iterations):
        edges = (centroids[1:] + centroids[:-1]) / 2
        new = np.searchsorted(edges, values)
        sums = np.bincount(new, weights=values, minlength=k)
        counts = np.bincount(new, minlength=k)
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        done = np.array_equal(new, assign) and np.allclose(updated, centroids)
        assign, centroids = new, updated
        if done:
            break
    return centroids.astype(np.float32), assign


class ShareWeightsPass(SlimgraphPass):
    """Replaces each weight by indices into a codebook of 2**bits centroids (k-means)."""

    name = "share-weights"
    tolerance = LOSSY

    def __init__(self, bits: int = 4, scope: str = "layer", skip: list[str] | None = None,
                 iterations: int = 30, biases: bool = False) -> None:
        if not 1 <= bits <= 8:
            raise PipelineSpecError(f"share-weights: bits must be in 1..8, got {bits}")
        one_of("share-weights", "scope", scope, SCOPES)
        if iterations < 1:
            raise PipelineSpecError(f"share-weights: iterations must be >= 1, got {iterations}")
        self.bits, self.scope, self.skip, self.iterations = bits, scope, skip, iterations
        self.biases = biases
        super().__init__()

    def options(self) -> dict[str, object]:
        defaults = {"bits": 4, "scope": "layer", "skip": None, "iterations": 30, "biases": False}
        opts = super().options()
        return {k: ("+".join(v) if isinstance(v, list) else v) for k, v in opts.items()
                if v != defaults[k]}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        refuse_quantized(model, self.name)
        layers = weighted_layers(model, self.skip, self.name)
        if not layers:
            return ir.passes.PassResult(model, False)
        k = 2**self.bits
        graph, namer = model.graph, Namer(model.graph)
        sparse = any(not (w != 0).all() for _, _, w in layers)
        biases = {node: _bias(node) if self.biases else None for node, _, _ in layers}
        shared = None
        if self.scope == "global":
            values = np.concatenate([w[w != 0] for _, _, w in layers]
                                    + [b for b in biases.values() if b is not None])
            centroids, _ = kmeans_1d(values, k, self.iterations)
            shared = add_initializer(graph, namer, "shared_codebook", _with_zero(centroids, sparse))
        self._first = next(iter(graph))
        for node, name, w in layers:
            nonzero, bias = w != 0, biases[node]
            offset = int(sparse if shared is not None else not nonzero.all())
            pool = w[nonzero] if bias is None else np.concatenate([w[nonzero], bias])
            if shared is not None:
                codebook = shared
                assign = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, pool)
            else:
                centroids, assign = kmeans_1d(pool, k, self.iterations)
                codebook = add_initializer(graph, namer, f"{name}.codebook",
                                           _with_zero(centroids, bool(offset)))
            dtype = np.uint8 if k + offset <= 256 else np.uint16
            index = np.zeros(w.shape, dtype=dtype)
            index[nonzero] = assign[:int(nonzero.sum())] + offset
            decoded = self._decode(graph, namer, node.inputs[1], codebook, index, offset)
            err = float(np.abs(decoded - w).max() / max(float(np.abs(w).max()), 1e-12))
            note = (f"{name}: {int(nonzero.sum()):,} weights in {k} clusters, "
                    f"max relative error {err:.4f}")
            if bias is not None:
                codes = (assign[int(nonzero.sum()):] + offset).astype(dtype)
                self._decode(graph, namer, node.inputs[2], codebook, codes, offset)
                note += f", and its {bias.size} biases"
            self.report.notes.append(note)
        self.report.count("layers", len(layers))
        self.report.count("codebook_entries", k * (1 if shared is not None else len(layers)))
        return ir.passes.PassResult(model, True)

    def _decode(self, graph: ir.Graph, namer: Namer, value: ir.Value, codebook: ir.Value,
                index: np.ndarray, offset: int) -> np.ndarray:
        """Replace the initializer ``value`` by ``Gather(codebook, Cast(index))``; return the
        tensor it decodes to."""
        stem = value.name
        idx = add_initializer(graph, namer, f"{stem}.index", index)
        tape = Tape()
        cast = tape.op("Cast", [idx], {"to": ir.DataType.INT64}, name=namer(f"{stem}/cast"))
        result = tape.op("Gather", [codebook, cast], {"axis": 0}, name=namer(f"{stem}/gather"),
                         metadata_props={CODEBOOK_ZERO_TAG: "1"} if offset else None)
        result.dtype, result.shape = ir.DataType.FLOAT, ir.Shape(index.shape)
        graph.insert_before(self._first, tape.nodes)
        value.replace_all_uses_with(result)
        graph.initializers.pop(stem)
        value.name = None
        result.name = stem  # the decoded tensor keeps the initializer's name
        return codebook.const_value.numpy()[index]


def _bias(node: ir.Node) -> np.ndarray | None:
    """The layer's constant float bias (Conv/Gemm input 2), if it has one."""
    if len(node.inputs) < 3 or node.inputs[2] is None or node.inputs[2].const_value is None:
        return None
    bias = node.inputs[2].const_value.numpy()
    return bias if bias.dtype == np.float32 and len(node.inputs[2].uses()) == 1 else None


def _with_zero(centroids: np.ndarray, zero: bool) -> np.ndarray:
    """The codebook: the centroids, after an exact-zero entry 0 when the weights have zeros."""
    return np.concatenate([np.zeros(1, np.float32), centroids]) if zero else centroids
