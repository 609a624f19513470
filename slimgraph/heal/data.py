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
    _computed: np.ndarray | None = dataclasses.field(default=None, repr=False)
    _held_out_outputs: list[list[np.ndarray]] | None = dataclasses.field(default=None, repr=False)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def teacher_outputs(self, indices: np.ndarray | None = None, trim: bool = False,
                        ) -> list[np.ndarray]:
        """The teacher's outputs, one row per training sample, for the samples at ``indices`` (all
        by default). Each sample is computed once and kept (heal passes share them); rows not
        asked for yet are zero. ``trim`` runs length-sorted batches cut to their longest text."""
        from slimgraph.heal.train import text_lengths, trimmed

        n = len(self)
        indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
        if self._computed is None:
            self._computed = np.zeros(n, dtype=bool)
        missing = indices[~self._computed[indices]]
        lengths = text_lengths(self.inputs) if trim else None
        if lengths is not None:
            missing = missing[np.argsort(lengths[missing], kind="stable")]
        for start in range(0, len(missing), TEACHER_BATCH):
            chunk = missing[start:start + TEACHER_BATCH]
            feeds = trimmed({k: v[chunk] for k, v in self.inputs.items()}, lengths, chunk)
            outputs = self.teacher(feeds)
            if self._teacher_outputs is None:
                self._teacher_outputs = [np.zeros((n, *o.shape[1:]), np.float32) for o in outputs]
            for full, out in zip(self._teacher_outputs, outputs, strict=True):
                full[chunk] = out
            self._computed[chunk] = True
        if self._teacher_outputs is None:  # nothing asked for: the shapes from one sample
            self._teacher_outputs = [np.zeros((n, *o.shape[1:]), np.float32)
                                     for o in self.teacher({k: v[:1] for k, v in self.inputs.items()})]
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



def sequence_trimmable(model: Any) -> bool:
    """Whether heal may cut text batches to their longest text: the graph takes an
    ``attention_mask``, every input is [batch, sequence] with a symbolic sequence axis, and no
    output carries the sequence axis (every output is [batch] or [batch, features], its features
    not the inputs' sequence dimension)."""
    if model is None:
        return False
    inputs = list(model.graph.inputs)
    if "attention_mask" not in {v.name for v in inputs}:
        return False
    sequences = set()
    for value in inputs:
        if value.shape is None or len(value.shape) != 2 or isinstance(value.shape[1], int):
            return False
        sequences.add(str(value.shape[1]))
    return all(v.shape is not None and len(v.shape) <= 2
               and not any(str(d) in sequences for d in v.shape[1:]) for v in model.graph.outputs)
