"""Model and data parallelism: ``partition`` cuts a graph into pipeline stages, ``run`` serves a
dataset in one process or over Ray actors (replicas, or one actor per stage)."""

from slimgraph.parallel.partitioning import (
    BALANCES,
    PIPELINE,
    STAGES_DIR,
    PartitionResult,
    load_for_partition,
    partition,
)

__all__ = ["BALANCES", "PIPELINE", "STAGES_DIR", "PartitionResult", "load_for_partition", "partition"]
