"""Sparse weights: sparsify (magnitude pruning, unstructured or N:M) and share-weights (k-means
weight sharing) and fold-sparse (dead channels out, sparse initializers stored compactly)."""

from slimgraph.passes.sparse.fold import FoldSparsePass
from slimgraph.passes.sparse.share import ShareWeightsPass
from slimgraph.passes.sparse.sparsify import SparsifyPass

__all__ = ["FoldSparsePass", "ShareWeightsPass", "SparsifyPass"]
