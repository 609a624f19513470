"""slimgraph: trace, slim and lower trained models into verified deployable artifacts."""

from slimgraph.passes import PASSES, RECIPES, Pipeline

__version__ = "0.1.0"

__all__ = ["PASSES", "RECIPES", "Pipeline", "__version__"]
