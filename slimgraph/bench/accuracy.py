"""Held-out data for a bench run and each candidate's accuracy on it against the fp32 reference."""

from __future__ import annotations

from typing import Any

import numpy as np

from slimgraph.calibration import LABELS, Calibration, Feeds
from slimgraph.errors import DataError
from slimgraph.frontend import LoadedModel, fit_calibration
from slimgraph.verify import Runner, compare_outputs


def _evaluation(loaded: LoadedModel, eval_data: Any):
    """Held-out data: (file, arrays) read from --eval FILE.npz (inputs + optional `labels`), fitted
    to the model's inputs; else the built-in's own."""
    from slimgraph.frontend.builtin import EvalData

    if eval_data is None:
        if loaded.evaluation is not None:
            return loaded.evaluation
        return EvalData(loaded.verification_feeds, None)
    if isinstance(eval_data, EvalData):
        return eval_data
    where, arrays = eval_data
    arrays = dict(arrays)
    labels = arrays.pop(LABELS, None)
    if not arrays:
        raise DataError(f"{where}: holds only {LABELS!r}; add the model's input arrays")
    inputs = fit_calibration(loaded.model, Calibration([arrays], where)).feeds[0]
    feeds, label_batches = [], []
    n = len(next(iter(inputs.values())))
    for i in range(0, n, 64):
        feeds.append({k: v[i:i + 64] for k, v in inputs.items()})
        if labels is not None:
            label_batches.append(labels[i:i + 64])
    return EvalData(feeds, label_batches if labels is not None else None)


def _accuracy(runner: Runner, loaded: LoadedModel, evaluation):
    """(cosine, max abs err, top-1 agreement) vs the fp32 reference, and task accuracy."""
    feeds = evaluation.feeds
    try:
        got = [runner(f) for f in feeds]
    except Exception:  # a runner that cannot run the data is reported by its timing failure
        return None, None, None, None
    ref = [loaded.reference(f) for f in feeds]
    names = [f"out{i}" for i in range(len(ref[0]))]
    first = compare_outputs(names, ref, got)[0]
    task = None
    if evaluation.labels is not None:
        correct = sum(int((g[0].argmax(-1) == lab).sum())
                      for g, lab in zip(got, evaluation.labels, strict=True))
        task = correct / sum(len(lab) for lab in evaluation.labels)
    return first.cosine, first.max_abs_err, first.top1_agreement, task


def _feed_of_batch(evaluation, batch: int) -> Feeds:
    """``batch`` samples drawn (cyclically) from the held-out data: the same feed for every row."""
    pool = evaluation.feeds
    names = list(pool[0])
    stacked = {k: np.concatenate([f[k] for f in pool]) for k in names}
    n = len(stacked[names[0]])
    idx = np.arange(batch) % n
    return {k: np.ascontiguousarray(v[idx]) for k, v in stacked.items()}
