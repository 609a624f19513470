"""Calibration and evaluation data: an iterable of input feeds (name -> numpy array).

Every .npz a user names (--calib, --train, --eval) is read here, without pickle, and each array is
checked once by ``check_feed_array`` before any pass sees it.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from slimgraph.errors import DataError

Feeds = dict[str, np.ndarray]
LABELS = "labels"  # the optional class-id array of a training or evaluation .npz
_NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats


def read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, loaded with pickling disabled; DataError naming the file (and the
    member) for anything that is not a readable zip of plain .npy arrays."""
    path = Path(path)
    if not path.is_file():
        why = "it is a directory" if path.is_dir() else "it does not exist"
        raise DataError(f"{path}: not a readable .npz file ({why})")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an .npz file (not a zip archive; save it with numpy.savez)")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file ({_one_line(exc)})") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: not an .npz file (save the arrays with numpy.savez)")
    with npz:
        return {name: _member(path, npz, name) for name in npz.files}


def _member(path: Path, npz: np.lib.npyio.NpzFile, name: str) -> np.ndarray:
    try:
        array = npz[name]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{path}: member {name!r} is not a plain .npy array ({_one_line(exc)})"
                        ) from exc
    except MemoryError as exc:
        raise DataError(f"{path}: array {name!r} is larger than the memory here") from exc
    if not isinstance(array, np.ndarray):  # NpzFile hands back a member without .npy magic as bytes
        raise DataError(f"{path}: member {name!r} is not a .npy array")
    return array


def check_feed_array(where: str, name: str, array: np.ndarray) -> np.ndarray:
    """``array`` if it can feed a model: numeric (bool, int, float), with a sample axis holding at
    least one sample, and every float finite in float32 (models take float32 or narrower)."""
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise DataError(f"{where}: array {name!r} has dtype {array.dtype}; model inputs take "
                        "bool, integer or float arrays")
    if array.ndim == 0:
        raise DataError(f"{where}: array {name!r} is a scalar; samples go on axis 0")
    if len(array) == 0:
        raise DataError(f"{where}: array {name!r} holds no samples (axis 0 has length 0)")
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            bad = array[~finite].flat[0]
            raise DataError(f"{where}: array {name!r} holds {int((~finite).sum())} non-finite "
                            f"value(s) ({bad}); every value must be a finite number")
        if array.dtype.itemsize > 4 and array.size:
            peak = float(np.abs(array).max())
            if peak > float(np.finfo(np.float32).max):
                raise DataError(f"{where}: array {name!r} holds {peak:.3g}, beyond the float32 "
                                "range (non-finite as a model input)")
    return array


def check_labels(where: str, labels: np.ndarray) -> np.ndarray:
    """Class ids: one integer per sample."""
    if labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise DataError(f"{where}: array {LABELS!r} must hold one integer class id per sample, "
                        f"got dtype {labels.dtype} and shape {labels.shape}")
    return labels.astype(np.int64)


def read_samples(path: str | Path, what: str, *, labels: bool = True) -> dict[str, np.ndarray]:
    """The checked arrays of an .npz (pickling disabled), which must agree on their sample count
    (axis 0). With ``labels``, an array named ``labels`` is checked as int64 class ids."""
    where = f"{path}"
    arrays = read_arrays(path)
    if not arrays:
        raise DataError(f"{where}: the {what} file holds no arrays")
    for name, array in arrays.items():
        arrays[name] = (check_labels(where, array) if labels and name == LABELS
                        else check_feed_array(where, name, array))
    counts = {k: len(v) for k, v in arrays.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"{where}: arrays disagree on the sample count (axis 0): {counts}")
    return arrays


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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

    def __init__(self, feeds: Iterable[Mapping[str, Any]], source: str = "calibration data") -> None:
        self.feeds: list[Feeds] = [
            {k: np.asarray(v) for k, v in feed.items()} for feed in feeds
        ]
        self.source = source  # names the data in messages: its file, where it came from one

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
        arrays = read_samples(path, "calibration", labels=False)
        n = len(next(iter(arrays.values())))
        return cls(({k: v[i : i + 1] for k, v in arrays.items()} for i in range(n)), str(path))

    def batched(self, batch: int) -> list[Feeds]:
        """Concatenate consecutive feeds into batches of ``batch`` samples (the last may be short)."""
        return [stack_feeds(self.feeds[i : i + batch]) for i in range(0, len(self.feeds), batch)]

    def __iter__(self) -> Iterator[Feeds]:
        return iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)
