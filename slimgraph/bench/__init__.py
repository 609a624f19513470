"""`slimgraph bench`: variants x backends x batch sizes, timed fairly in one run, with accuracy.

The run is in ``run``; its rows, ratios and flags in ``results``.
"""

from slimgraph.bench.results import FP32, BenchResult, Row
from slimgraph.bench.run import DEFAULT_PEERS, bench, variant_pipeline

__all__ = ["DEFAULT_PEERS", "FP32", "BenchResult", "Row", "bench", "variant_pipeline"]
