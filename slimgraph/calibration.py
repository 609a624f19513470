"""Calibration and evaluation data: an iterable of input feeds (name -> numpy array)."""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from slimgraph.errors import InputSpecError

Feeds = dict[str, np.ndarray]


def read_samples(path: str | Path, what: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz (pickling disabled), which must agree on their sample count (axis 0)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputSpecError(f"{path}: not a readable .npz {what} file ({exc})") from exc
    if not arrays:
        raise InputSpecError(f"{path}: {what} file holds no arrays")
    counts = {k: len(v) for k, v in arrays.items()}
    if len(set(counts.values())) != 1:
        raise InputSpecError(f"{path}: arrays disagree on the sample count: {counts}")
    return arrays


def split_held_out(feeds: list[Feeds]) -> tuple[list[Feeds], list[Feeds]]:
    """Feeds to use and feeds to hold out: the last quarter is held out (all of them below 4)."""
    if len(feeds) < 4:
        return feeds, feeds
    held = max(1, len(feeds) // 4)
    return feeds[:-held], feeds[-held:]


def stack_feeds(feeds: list[Feeds]) -> Feeds:
    """One feed holding every sample of ``feeds``, concatenated along axis 0."""
    return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}


class Calibration:
    """A re-iterable list of feeds. Accepts feeds, an .npz file, or an ORT CalibrationDataReader."""

    def __init__(self, feeds: Iterable[Mapping[str, Any]]) -> None:
        self.feeds: list[Feeds] = [
            {k: np.asarray(v) for k, v in feed.items()} for feed in feeds
        ]

    @classmethod
    def coerce(cls, data: Any) -> Calibration | None:
        if data is None or isinstance(data, Calibration):
            return data
        if isinstance(data, (str, Path)):
            return cls.from_npz(data)
        if hasattr(data, "get_next"):  # onnxruntime.quantization.CalibrationDataReader
            return cls(iter(data.get_next, None))
        return cls(data)

    @classmethod
    def from_npz(cls, path: str | Path) -> Calibration:
        """Read an .npz whose arrays are named after the model inputs; axis 0 is the sample axis.

        Each sample becomes one feed with a batch of 1. Arrays are loaded with pickling disabled.
        """
        arrays = read_samples(path, "calibration")
        n = len(next(iter(arrays.values())))
        return cls({k: v[i : i + 1] for k, v in arrays.items()} for i in range(n))

    def batched(self, batch: int) -> list[Feeds]:
        """Concatenate consecutive feeds into batches of ``batch`` samples (the last may be short)."""
        return [stack_feeds(self.feeds[i : i + batch]) for i in range(0, len(self.feeds), batch)]

    def __iter__(self) -> Iterator[Feeds]:
        return iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)
