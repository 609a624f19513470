"""The peers bench compares against, and the peak-memory probe.

Peers: torch eager and torch.compile on the source module, onnxruntime's own quantize_dynamic and
quantize_static on the same fp32 graph — the tools users reach for today.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from slimgraph.calibration import Feeds
from slimgraph.frontend import LoadedModel
from slimgraph.verify import Runner


def torch_runner(loaded: LoadedModel, threads: int, *, compiled: bool) -> Runner:
    """Run the source module (eager, or through torch.compile) on numpy feeds."""
    import torch

    torch.set_num_threads(threads)
    module = torch.compile(loaded.module) if compiled else loaded.module
    names = loaded.input_names

    def run(feeds: Feeds) -> list[np.ndarray]:
        with torch.inference_mode():
            out = module(*[torch.from_numpy(np.asarray(feeds[n])) for n in names])
        flat = out if isinstance(out, (tuple, list)) else (out,)
        return [t.numpy() for t in flat]

    if compiled:  # compile now, so build time holds the compilation and timing does not
        run(loaded.verification_feeds[0])
    return run


class _FeedsReader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[Feeds]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> Feeds | None:
        return next(self._it, None)

    def rewind(self) -> None:  # some calibrators call it
        pass


def ort_quantize(kind: str, fp32: Path, dest: Path, loaded: LoadedModel) -> Path:
    """onnxruntime's quantizer in its recommended CPU configuration: per-channel int8 weights;
    static: QDQ, U8 activations (U8S8, the fast path on x86), MinMax calibration."""
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    # Its advice to pre-process goes to the root logger at WARNING; keep bench output readable.
    with _root_log_level(logging.ERROR):
        if kind == "quantize_dynamic":
            quantize_dynamic(fp32, dest, per_channel=True, weight_type=QuantType.QInt8)
        elif kind == "quantize_static":
            feeds = list(loaded.calibration or loaded.verification_feeds)
            quantize_static(fp32, dest, _FeedsReader(feeds), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
        else:
            raise ValueError(kind)
    return dest


@contextlib.contextmanager
def _root_log_level(level: int) -> Iterator[None]:
    root = logging.getLogger()
    before = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(before)


def probe_peak_memory(artifact: Path, backend: str, feed: Feeds, work: Path,
                      threads: int) -> float:
    """Peak RSS growth (MiB) of a fresh process that loads the artifact and runs ``feed``.

    A fresh process per row, so one candidate's allocations never count against another's.
    """
    feed_path = work / "probe_feed.npz"
    np.savez(feed_path, **feed)
    proc = subprocess.run(
        [sys.executable, "-m", "slimgraph.bench.memprobe", str(artifact), backend,
         str(feed_path), str(threads)],
        capture_output=True, text=True, check=True,
    )
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_growth_mib"])
