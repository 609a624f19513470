"""The pass registry (CLI name -> class, listed by hand) and the named recipes."""

from __future__ import annotations

from slimgraph.errors import PipelineSpecError
from slimgraph.passes.base import SlimgraphPass
from slimgraph.passes.fold_constants import FoldConstantsPass
from slimgraph.passes.heal import HealWeightsPass
from slimgraph.passes.pipeline import Pipeline, make_pass
from slimgraph.passes.prune import PruneChannelsPass, PruneLayersPass
from slimgraph.passes.quantize import InsertQDQPass
from slimgraph.passes.report import PassReport
from slimgraph.passes.sparse import FoldSparsePass, ShareWeightsPass, SparsifyPass
from slimgraph.tolerance import EXACT, Tolerance

PASSES: dict[str, type[SlimgraphPass]] = {
    FoldConstantsPass.name: FoldConstantsPass,
    PruneChannelsPass.name: PruneChannelsPass,
    PruneLayersPass.name: PruneLayersPass,
    InsertQDQPass.name: InsertQDQPass,
    HealWeightsPass.name: HealWeightsPass,
    SparsifyPass.name: SparsifyPass,
    ShareWeightsPass.name: ShareWeightsPass,
    FoldSparsePass.name: FoldSparsePass,
}

RECIPES: dict[str, str] = {
    "lossless": "fold-constants",
    "int8": "fold-constants,quantize:int8",
    # Transformers: weights offline, activations at run time, outliers smoothed into the weights
    # first (benchmarks/results/quantize_minilm.md: alpha 0.7-0.8 is best on MiniLM).
    "int8-dynamic": "fold-constants,quantize:int8,dynamic=true,smooth=0.75",
}


def recipe(name: str) -> Pipeline:
    """A named pipeline built from the same pass objects a user composes."""
    spec = RECIPES.get(name)
    if spec is None:
        raise PipelineSpecError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    return Pipeline.parse(spec)


__all__ = [
    "EXACT",
    "PASSES",
    "RECIPES",
    "FoldConstantsPass",
    "FoldSparsePass",
    "HealWeightsPass",
    "InsertQDQPass",
    "PassReport",
    "Pipeline",
    "PruneChannelsPass",
    "PruneLayersPass",
    "ShareWeightsPass",
    "SlimgraphPass",
    "SparsifyPass",
    "Tolerance",
    "make_pass",
    "recipe",
]
