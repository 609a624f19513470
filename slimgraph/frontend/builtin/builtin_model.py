"""What a built-in model is: a torch module with its example inputs, calibration, held-out
evaluation data (EvalData) and, for heal, training data (TrainSplit)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

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
