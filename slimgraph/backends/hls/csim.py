"""The C simulation: building it with the project's Makefile (g++, optionally Vitis's ap_int /
hls::stream headers), running it on raw integer samples, and a runner that answers feeds with it."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from slimgraph import codegen
from slimgraph.backends.hls.io_spec import from_device, to_device
from slimgraph.calibration import Feeds
from slimgraph.errors import BackendError

IO_FILE = "io.json"
INPUTS_FILE = "tb_data/inputs.txt"
OUTPUTS_FILE = "tb_data/csim_outputs.txt"
AP_OUTPUTS_FILE = "tb_data/csim_ap_outputs.txt"
COMPILE_TIMEOUT_S = 600


def toolchain_missing() -> str | None:
    """Why the C simulation cannot be built here, or None."""
    missing = [tool for tool in (os.environ.get("CXX", "g++"), "make") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} not found on PATH" if missing else None


class CsimRunner:
    """Feeds -> outputs through the project's C simulation (compiled once, outside the project).

    Batches that are, in order, the project's own ``tb_data`` inputs (export's verification after
    the build ran them) are answered from ``tb_data/csim_outputs.txt``, not simulated twice.
    """

    def __init__(self, project: Path) -> None:
        self.project = project
        self.io = json.loads((project / IO_FILE).read_text())
        self.workdir = Path(tempfile.mkdtemp(prefix="slimgraph-csim-"))
        self.binary = compile_csim(project, self.workdir)
        self.recorded: tuple[np.ndarray, np.ndarray] | None = None
        if (project / INPUTS_FILE).is_file() and (project / OUTPUTS_FILE).is_file():
            self.recorded = (np.loadtxt(project / INPUTS_FILE, dtype=np.int64, ndmin=2),
                             np.loadtxt(project / OUTPUTS_FILE, dtype=np.int64, ndmin=2))
        self.offset = 0

    def __call__(self, feeds: Feeds) -> list[np.ndarray]:
        raw = to_device(self.io["input"], feeds[self.io["input"]["name"]])
        if self.recorded is not None:
            inputs, outputs = self.recorded
            end = self.offset + len(raw)
            if np.array_equal(inputs[self.offset:end], raw):
                self.offset = end
                return [from_device(self.io["output"], outputs[end - len(raw):end])]
        inputs = write_samples(self.workdir / "inputs.txt", raw)
        out = run_binary(self.binary, inputs, self.workdir / "outputs.txt")
        return [from_device(self.io["output"], out)]

    def __del__(self) -> None:
        shutil.rmtree(getattr(self, "workdir", ""), ignore_errors=True)


def find_ap_types(given: str) -> Path:
    """The directory holding Vitis's ap_int.h and hls_stream.h: ``given``, or for ``auto``
    $XILINX_HLS/include, then the copy in hls4ml's wheel (found, not imported)."""
    if given != "auto":
        candidates = [Path(given)]
    else:
        candidates = []
        if os.environ.get("XILINX_HLS"):
            candidates.append(Path(os.environ["XILINX_HLS"]) / "include")
        spec = importlib.util.find_spec("hls4ml")
        if spec is not None and spec.origin:
            candidates.append(Path(spec.origin).parent / "templates" / "vivado" / "ap_types")
    for directory in candidates:
        if (directory / "ap_int.h").is_file() and (directory / "hls_stream.h").is_file():
            try:  # handed to make, which expands '$' in it, and to its recipes' shell
                return Path(codegen.make_path(directory))
            except ValueError as exc:
                raise BackendError(f"hls: ap_types={codegen.text(given)}: {exc}") from exc
    looked = ", ".join(str(c) for c in candidates) or "$XILINX_HLS unset, hls4ml not installed"
    raise BackendError(f"hls: ap_types={given}: no ap_int.h and hls_stream.h found ({looked}); "
                       "give the directory: $XILINX_HLS/include under Vitis, or pip install "
                       "hls4ml==1.3.0, whose wheel carries them")


def compile_csim(project: Path, build_dir: Path, target: str = "csim",
                 ap_types: Path | None = None) -> Path:
    """``make`` the C simulation (``target`` csim, or csim_ap with Vitis's types from
    ``ap_types``) into ``build_dir`` with the project's Makefile; exit code checked."""
    missing = toolchain_missing()
    if missing:
        raise BackendError(f"hls: cannot build the C simulation: {missing}")
    try:  # make expands '$' in a command-line variable, and its recipes run in a shell
        build = codegen.make_path(build_dir)
        variables = [f"AP_TYPES={codegen.make_path(ap_types)}"] if ap_types is not None else []
    except ValueError as exc:
        raise BackendError(f"hls: cannot build the C simulation: {exc}") from exc
    binary = Path(build) / target
    result = subprocess.run(["make", "-s", "-C", str(project), f"BUILD={build}", *variables,
                             str(binary)],
                            capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False)
    if result.returncode != 0:
        raise BackendError(f"hls: the C simulation ({target}) did not compile (make exit "
                           f"{result.returncode}):\n{result.stderr[-4000:]}")
    return binary


def run_binary(binary: Path, inputs: Path, outputs: Path) -> np.ndarray:
    result = subprocess.run([str(binary), str(inputs), str(outputs)], capture_output=True,
                            text=True, timeout=COMPILE_TIMEOUT_S, check=False)
    if result.returncode != 0:
        raise BackendError(f"hls: the C simulation failed (exit {result.returncode}): "
                           f"{result.stderr[-2000:]}")
    return np.loadtxt(outputs, dtype=np.int64, ndmin=2)


def write_samples(path: Path, raw: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(path, raw.reshape(len(raw), -1), fmt="%d")
    return path
