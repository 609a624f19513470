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


def _torch_runner(source: str, compiled: bool, threads: int):
    """Rebuild the source module (``builtin:NAME`` or ``torch:package.module:callable``)."""
    import torch

    torch.set_num_threads(threads)
    kind, _, name = source.partition(":")
    if kind == "builtin":
        from slimgraph.frontend.builtin import get_builtin

        builtin = get_builtin(name)
        module, names = builtin.module, builtin.input_names
    else:
        import importlib

        module_name, _, attr = name.partition(":")
        sys.path.insert(0, str(Path.cwd()))
        made = getattr(importlib.import_module(module_name), attr)()
        module, names = (made[0] if isinstance(made, tuple) else made), None
    module = torch.compile(module) if compiled else module

    def run(feed: dict) -> None:
        with torch.inference_mode():
            module(*[torch.from_numpy(feed[n]) for n in (names or list(feed))])

    return run


def _reset_peak() -> None:
    """Make VmHWM start again from the current RSS (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def main(artifact: str, backend_name: str, feed_path: str, threads: str) -> None:
    with np.load(feed_path, allow_pickle=False) as npz:
        feed = {k: npz[k] for k in npz.files}
    if backend_name.startswith("torch-"):  # a torch peer: the module's weights are its cost
        import torch  # noqa: F401  (the runtime, not the model's cost)

        baseline = _status_mib("VmRSS")
        run = _torch_runner(artifact, backend_name == "torch-compile", int(threads))
        _reset_peak()  # building the module (e.g. BN statistics) is not running it
        _report(run, feed, baseline)
        return
    from slimgraph.backends import get_backend
    from slimgraph.backends.base import BuiltArtifact
    from slimgraph.backends.ort import runner_for, session_for

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
    _report(run, feed, baseline)


def _report(run, feed: dict, baseline: float) -> None:
    for _ in range(3):
        run(feed)
    peak = _status_mib("VmHWM")
    print(json.dumps({"baseline_mib": baseline, "peak_mib": peak,
                      "peak_growth_mib": max(0.0, peak - baseline)}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
