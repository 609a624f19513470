"""Sparse weights: sparsify (magnitude pruning, unstructured or N:M)."""

from slimgraph.passes.sparse.sparsify import SparsifyPass

__all__ = ["SparsifyPass"]
