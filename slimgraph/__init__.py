"""slimgraph: trace, slim and lower trained models into verified deployable artifacts."""

from slimgraph.errors import SlimgraphError
from slimgraph.export import ExportResult, export
from slimgraph.frontend import LoadedModel, load
from slimgraph.passes import PASSES, RECIPES, Pipeline

__version__ = "0.1.0"

__all__ = [
    "PASSES",
    "RECIPES",
    "ExportResult",
    "LoadedModel",
    "Pipeline",
    "SlimgraphError",
    "__version__",
    "export",
    "load",
]
