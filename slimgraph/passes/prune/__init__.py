"""Pruning passes: channel groups (what moves together), prune-channels (width) and
prune-layers (depth)."""

from slimgraph.passes.prune.channels import PruneChannelsPass
from slimgraph.passes.prune.layers import PruneLayersPass

__all__ = ["PruneChannelsPass", "PruneLayersPass"]
