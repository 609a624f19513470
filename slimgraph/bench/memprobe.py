"""Child process of the peak-memory probe: load one artifact, run it, print peak RSS growth."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: Linux carries that over from
    the parent across fork+exec, so a child of a big process reports the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def main(artifact: str, backend_name: str, feed_path: str, threads: str) -> None:
    from slimgraph.backends import get_backend
    from slimgraph.backends.base import BuiltArtifact
    from slimgraph.backends.ort import runner_for, session_for

    with np.load(feed_path, allow_pickle=False) as npz:
        feed = {k: npz[k] for k in npz.files}
    backend = get_backend(backend_name)
    backend.available()  # imports the backend's runtime, which is not the artifact's cost
    baseline = _status_mib("VmRSS")  # runtimes imported, nothing loaded
    if artifact.endswith(".onnx"):  # a bare model (a peer's), run on onnxruntime CPU
        run = runner_for(session_for(artifact, {"intra_op_num_threads": int(threads)}))
    else:
        entry = json.loads((Path(artifact) / "manifest.json").read_text())["backends"][
            backend_name]
        built = BuiltArtifact(backend_name, Path(artifact), list(entry["files"]),
                              entry["options"], entry["entry"])
        run = backend.load(built)
    for _ in range(3):
        run(feed)
    peak = _status_mib("VmHWM")
    print(json.dumps({"baseline_mib": baseline, "peak_mib": peak,
                      "peak_growth_mib": max(0.0, peak - baseline)}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
