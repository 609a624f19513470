"""Built-in demo models: a torch module, example inputs, calibration and held-out evaluation data.

The registry is listed by hand. Factories import their module on first use, so importing this
package needs neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from slimgraph.errors import ModelLoadError

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass
class EvalData:
    """Held-out inputs in batches, with int64 class labels per batch where the task has them."""

    feeds: list[dict[str, np.ndarray]]
    labels: list[np.ndarray] | None


@dataclasses.dataclass
class TrainSplit:
    """Training inputs (sample axis 0) with int64 labels where the task has them, for heal.

    ``held_out`` overrides the model's evaluation data as heal's held-out set (never trained on).
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str
    held_out: list[dict[str, np.ndarray]] | None = None
    held_out_labels: list[np.ndarray] | None = None


@dataclasses.dataclass
class BuiltinModel:
    """A ready-to-export float32 module in eval mode and the data that goes with it."""

    name: str
    description: str
    module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]  # batch >= 2, so a dynamic batch dim exports cleanly
    input_names: list[str]
    output_names: list[str]
    calibration: Callable[[int], list[dict[str, np.ndarray]]]  # n feeds of batch 1
    evaluation: Callable[[], EvalData]
    task: str  # "classification" (top-1 is meaningful), "embedding" or "regression"
    training: Callable[[], TrainSplit] | None = None  # what heal trains on
    max_sequence: int | None = None  # set: dim 1 of the inputs is dynamic up to this length
    folder_task: str | None = None  # a Hugging Face folder's task (hf_folder.TASKS)


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
