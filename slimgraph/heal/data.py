"""What heal trains on: training inputs (+ labels), the teacher's outputs on them, held-out data.

The teacher is the loaded source model (the float reference every artifact is verified against).
Training data comes from ``--train FILE.npz`` (arrays named after the model inputs, optional
``labels``), else the built-in model's training split, else the calibration set (with a warning).
Held-out data is never trained on: the built-in's evaluation split, or the last quarter of the
calibration set when that is all there is.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from slimgraph.calibration import Feeds, read_samples, split_held_out, stack_feeds
from slimgraph.errors import InputSpecError
from slimgraph.verify import Runner

TEACHER_BATCH = 64


@dataclasses.dataclass
class TrainingData:
    """Inputs with the sample on axis 0, optional int64 labels, held-out batches and the teacher."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    held_out: list[Feeds]
    held_out_labels: list[np.ndarray] | None
    teacher: Runner
    task: str | None  # "classification" scores accuracy; otherwise cosine to the teacher
    source: str  # where the training inputs came from, for the report
    warning: str | None = None
    teacher_model: Any = None  # the source graph (onnx_ir.Model): layer outputs for hidden=
    _teacher_outputs: list[np.ndarray] | None = dataclasses.field(default=None, repr=False)
    _held_out_outputs: list[list[np.ndarray]] | None = dataclasses.field(default=None, repr=False)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def teacher_outputs(self) -> list[np.ndarray]:
        """The teacher's outputs on every training sample (computed once, shared by heal passes)."""
        if self._teacher_outputs is None:
            n = len(self)
            batches = [self.teacher({k: v[i : i + TEACHER_BATCH] for k, v in self.inputs.items()})
                       for i in range(0, n, TEACHER_BATCH)]
            self._teacher_outputs = [np.concatenate([b[j] for b in batches]).astype(np.float32)
                                     for j in range(len(batches[0]))]
        return self._teacher_outputs

    def held_out_teacher(self) -> list[list[np.ndarray]]:
        """The teacher's outputs on the held-out batches (computed once)."""
        if self._held_out_outputs is None:
            self._held_out_outputs = [self.teacher(feed) for feed in self.held_out]
        return self._held_out_outputs


def read_npz(path: str | Path, input_names: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Arrays named after the model inputs (sample axis 0) and optional ``labels``; no pickles."""
    arrays = read_samples(path, "training")
    labels = arrays.pop("labels", None)
    missing = [n for n in input_names if n not in arrays]
    if missing:
        raise InputSpecError(f"{path}: no array for model input(s) {', '.join(missing)}; "
                             f"arrays: {', '.join(sorted(arrays)) or 'none'}")
    inputs = {n: arrays[n] for n in input_names}
    return inputs, labels.astype(np.int64) if labels is not None else None


def training_data(loaded: Any, train: str | Path | None = None) -> TrainingData:
    """Assemble heal's data for a LoadedModel: ``train`` (.npz) > built-in split > calibration."""
    from slimgraph.frontend import check_feed

    names = loaded.input_names or [v.name for v in loaded.model.graph.inputs]
    evaluation = loaded.evaluation
    held_out = list(evaluation.feeds) if evaluation is not None else []
    held_labels = list(evaluation.labels) if evaluation is not None and evaluation.labels else None
    warning = None
    if train is not None:
        inputs, labels = read_npz(train, names)
        source = str(train)
    elif loaded.training is not None:
        split = loaded.training()
        inputs, labels, source = split.inputs, split.labels, split.source
        if split.held_out:
            held_out, held_labels = split.held_out, split.held_out_labels
    elif loaded.calibration is not None and len(loaded.calibration):
        feeds = loaded.calibration.feeds
        if not held_out:  # nothing else is held out: keep the last quarter of the set for scoring
            feeds, held = split_held_out(feeds)
            held_out = [stack_feeds(held)]
        inputs, labels = stack_feeds(feeds), None
        source = f"the calibration set ({len(feeds)} samples)"
        warning = ("heal trained on the calibration set: pass training data (--train FILE.npz) "
                   "for a model that should generalise")
    else:
        raise InputSpecError("heal needs training data: pass --train FILE.npz (arrays named after "
                             "the model inputs, optional labels) or calibration data (--calib)")
    inputs = check_feed(loaded.model, inputs, f"heal: {source}")  # cast to the inputs' types
    if not held_out:
        held_out = list(loaded.verification_feeds)
    return TrainingData(inputs, labels, held_out, held_labels, loaded.reference, loaded.task,
                        source, warning, loaded.model)

