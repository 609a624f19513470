"""Sparse weights: sparsify (magnitude pruning, unstructured or N:M) and share-weights (k-means
weight sharing)."""

from slimgraph.passes.sparse.share import ShareWeightsPass
from slimgraph.passes.sparse.sparsify import SparsifyPass

__all__ = ["ShareWeightsPass", "SparsifyPass"]
