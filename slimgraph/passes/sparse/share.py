"""share-weights: k-means weight sharing (Deep Compression's second stage) in standard ONNX.

Each Conv/Gemm/MatMul weight's non-zero values are clustered into ``2**bits`` centroids by 1-D
k-means (linear initialisation over [min, max], which Han et al. found best, then Lloyd steps).
The weight becomes::

    W = Gather(codebook[2**bits], Cast<int64>(index[uint8, W's shape]))   (x Cast<float>(nonzero))

``index`` holds one byte per weight (an entropy coder packs it to about ``bits`` bits); a weight
with zeros (after sparsify) multiplies by a ``nonzero`` byte mask, so the zeros stay exact. Every
input is an initializer, so onnxruntime folds the decode once when it loads the model and runs
at dense speed. ``scope=layer`` gives each layer its own codebook, ``scope=global`` one shared by
all. Heal trains the codebook (the gradient of every weight in a cluster sums into its centroid,
as in Deep Compression) and keeps the assignments and the zeros: they are integer initializers.
Run it after the passes that rewrite weights (a later fold-constants would fold the decode back
into a dense tensor).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slimgraph.errors import PipelineSpecError
from slimgraph.passes.base import SlimgraphPass, one_of
from slimgraph.passes.prune.channels import LOSSY
from slimgraph.passes.quantize.layers import Namer, add_initializer
from slimgraph.passes.sparse.sparsify import SCOPES, refuse_quantized, weighted_layers


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
                 iterations: int = 30) -> None:
        if not 1 <= bits <= 8:
            raise PipelineSpecError(f"share-weights: bits must be in 1..8, got {bits}")
        one_of("share-weights", "scope", scope, SCOPES)
        if iterations < 1:
            raise PipelineSpecError(f"share-weights: iterations must be >= 1, got {iterations}")
        self.bits, self.scope, self.skip, self.iterations = bits, scope, skip, iterations
        super().__init__()

    def options(self) -> dict[str, object]:
        defaults = {"bits": 4, "scope": "layer", "skip": None, "iterations": 30}
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
        shared = None
        if self.scope == "global":
            values = np.concatenate([w[w != 0] for _, _, w in layers])
            centroids, _ = kmeans_1d(values, k, self.iterations)
            shared = add_initializer(graph, namer, "shared_codebook", centroids)
        first = next(iter(graph))
        for node, name, w in layers:
            nonzero = w != 0
            if self.scope == "global":
                codebook = shared
                edges = (centroids[1:] + centroids[:-1]) / 2
                assign = np.searchsorted(edges, w[nonzero])
            else:
                centroids, assign = kmeans_1d(w[nonzero], k, self.iterations)
                codebook = add_initializer(graph, namer, f"{name}.codebook", centroids)
            index = np.zeros(w.shape, dtype=np.uint8)
            index[nonzero] = assign
            weight = node.inputs[1]
            stem = weight.name
            idx = add_initializer(graph, namer, f"{stem}.index", index)
            cast = ir.node("Cast", [idx], {"to": ir.DataType.INT64}, name=namer(f"{stem}/cast"))
            gather = ir.node("Gather", [codebook, cast.outputs[0]], {"axis": 0},
                             name=namer(f"{stem}/gather"))
            nodes, result = [cast, gather], gather.outputs[0]
            if not nonzero.all():
                mask = add_initializer(graph, namer, f"{stem}.nonzero", nonzero.astype(np.uint8))
                to_float = ir.node("Cast", [mask], {"to": ir.DataType.FLOAT},
                                   name=namer(f"{stem}/mask"))
                mul = ir.node("Mul", [result, to_float.outputs[0]], name=namer(f"{stem}/masked"))
                nodes += [to_float, mul]
                result = mul.outputs[0]
            result.dtype, result.shape = ir.DataType.FLOAT, ir.Shape(w.shape)
            graph.insert_before(first, nodes)
            weight.replace_all_uses_with(result)
            graph.initializers.pop(stem)
            weight.name = None
            result.name = stem  # the decoded tensor keeps the weight's name
            decoded = centroids[index] * nonzero
            err = float(np.abs(decoded - w).max() / max(float(np.abs(w).max()), 1e-12))
            self.report.notes.append(f"{name}: {int(nonzero.sum()):,} weights in {k} clusters, "
                                     f"max relative error {err:.4f}")
        self.report.count("layers", len(layers))
        self.report.count("codebook_entries", k * (1 if shared is not None else len(layers)))
        return ir.passes.PassResult(model, True)
