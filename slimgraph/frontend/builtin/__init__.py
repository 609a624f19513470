"""Built-in demo models: a torch module, example inputs, calibration and held-out evaluation data.

The registry is listed by hand. Factories import their module on first use, so importing this
package needs neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from slimgraph.errors import ModelLoadError
from slimgraph.frontend.builtin.builtin_model import BuiltinModel, EvalData, TrainSplit


def _factory(module_name: str, function: str = "build") -> Callable[[], BuiltinModel]:
    """A factory that imports ``slimgraph.frontend.builtin.<module_name>`` and calls ``function``."""

    def build() -> BuiltinModel:
        return getattr(importlib.import_module(f"{__name__}.{module_name}"), function)()

    return build


BUILTINS: dict[str, tuple[str, Callable[[], BuiltinModel]]] = {
    "digits-cnn": (
        "LeNet-style CNN with BatchNorm trained on scikit-learn digits (8x8, 10 classes)",
        _factory("digits_cnn"),
    ),
    "mlp": ("64-256-256-10 MLP trained on scikit-learn digits features", _factory("mlp")),
    "lstm": ("LSTM classifier over digits image rows (8 steps x 8 features)", _factory("lstm")),
    "resnet-tiny": (
        "ResNet-style CNN on 3x32x32 images, seeded random weights, synthetic data",
        _factory("resnet_tiny"),
    ),
    "resnet18": (
        "ResNet-18 layout for 3x32x32 (CIFAR-style), seeded random weights, synthetic data",
        _factory("resnet_tiny", "build_resnet18"),
    ),
    "efficientnet-lite1": (
        "EfficientNet-Lite1, published ImageNet weights, on crops of real photographs (240x240)",
        _factory("efficientnet"),
    ),
    "minilm": (
        "all-MiniLM-L6-v2 sentence embeddings (mean-pooled, L2-normalised, 384-d)",
        _factory("minilm"),
    ),
}


def builtin_names() -> list[str]:
    """The names of the built-in models, in registry order."""
    return list(BUILTINS)


def get_builtin(name: str) -> BuiltinModel:
    """Build the named built-in model; an unknown name raises ModelLoadError listing valid ones."""
    if name not in BUILTINS:
        raise ModelLoadError(
            f"unknown built-in model {name!r}; valid names: {', '.join(builtin_names())}"
        )
    return BUILTINS[name][1]()


__all__ = ["BUILTINS", "BuiltinModel", "EvalData", "TrainSplit", "builtin_names", "get_builtin"]
