"""The `hls` backend: an int8 QDQ, binary or fixed-point graph -> a Vitis HLS C++ project.

`slimgraph export MODEL --passes ...,quantize:int8 --backend hls[:io=stream,reuse=4,...]` writes
``hls/`` into the artifact (see ``emit`` for its layout) and proves it: the C simulation, built
with g++ from the project's own Makefile, runs the verification inputs and must equal the NumPy
integer reference (``reference``) exactly; it is also compared with onnxruntime's execution of
the QDQ graph (counts of quantized values equal / within one step) and, through the runner, with
the float model like every backend. ``estimate.json`` holds resources and latency (``estimate``).

Options: ``io`` parallel|stream; ``reuse`` (>= 1, multipliers shared over that many cycles);
``agreement`` (default 0.999) the
fraction of quantized values that must lie within one step of onnxruntime's, layer by layer (each
layer recomputed from onnxruntime's own inputs; end to end, one-step differences compound with
depth and are reported, not required); ``precision``
ap_fixed<W,I> for float activations (default ap_fixed<16,6>; given explicitly it also
lets float-weight layers through as fixed point); ``part`` and ``clock_ns`` for build.tcl
(defaults: hls4ml's Vitis defaults, xcvu13p-flga2577-2-e at 5 ns); ``csim`` (default true);
``ap_types`` (default off): also build the C simulation with Vitis's own ap_int / hls::stream
headers (``make csim-ap``) and require its outputs identical to the plain build's; a directory
holding ap_int.h and hls_stream.h, or ``auto`` for $XILINX_HLS/include or else the copy hls4ml's
wheel carries (hls4ml is not imported, only its headers are read).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph import codegen
from slimgraph.backends.base import BuiltArtifact
from slimgraph.backends.hls import emit, reference
from slimgraph.backends.hls.estimate import VITIS_UNROLL_LIMIT, estimate, markdown, unroll
from slimgraph.backends.hls.lower import Format, Lowered, Tensor, lower, parse_precision
from slimgraph.calibration import Feeds
from slimgraph.errors import BackendError
from slimgraph.verify import Runner

HLS_DIR = "hls"
IO_FILE = "io.json"
ESTIMATE_FILE = "estimate.json"
CSIM_FILE = "csim.json"
INPUTS_FILE = "tb_data/inputs.txt"
OUTPUTS_FILE = "tb_data/csim_outputs.txt"
AP_OUTPUTS_FILE = "tb_data/csim_ap_outputs.txt"
DEFAULT_PART = "xcvu13p-flga2577-2-e"
DEFAULT_CLOCK_NS = 5.0
IO_MODES = ("parallel", "stream")
COMPILE_TIMEOUT_S = 600
MAX_REUSE = 1 << 20
DEFAULT_AGREEMENT = 0.999  # of quantized values within one step of onnxruntime's


def toolchain_missing() -> str | None:
    """Why the C simulation cannot be built here, or None."""
    missing = [tool for tool in (os.environ.get("CXX", "g++"), "make") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} not found on PATH" if missing else None


class HlsBackend:
    name = "hls"
    description = "Vitis HLS C++ project (int8 / binary / fixed point), proved by a g++ C simulation"
    wants_feeds = True  # build() takes the verification inputs for tb_data/ and the C simulation

    def default_options(self) -> dict[str, Any]:
        return {"io": "parallel", "reuse": 1, "precision": None, "part": DEFAULT_PART,
                "clock_ns": DEFAULT_CLOCK_NS, "csim": True, "agreement": DEFAULT_AGREEMENT,
                "ap_types": None}

    def available(self) -> bool:
        return toolchain_missing() is None

    def unavailable_reason(self) -> str | None:
        return toolchain_missing()

    def buildable(self) -> bool:
        return True  # writing the project needs no compiler

    def options(self, given: dict[str, Any]) -> dict[str, Any]:
        options = self.default_options()
        unknown = set(given) - set(options)
        if unknown:
            raise BackendError(f"hls: unknown option(s) {', '.join(sorted(unknown))}; valid: "
                               f"{', '.join(options)}")
        options |= given
        if options["io"] not in IO_MODES:
            raise BackendError(f"hls: io={options['io']!r}; valid: {', '.join(IO_MODES)}")
        reuse = options["reuse"]
        if isinstance(reuse, bool) or not isinstance(reuse, int) or not 1 <= reuse <= MAX_REUSE:
            raise BackendError(f"hls: reuse={reuse!r} must be an integer from 1 to {MAX_REUSE}")
        if options["precision"] is not None:
            parse_precision(str(options["precision"]))
        if options["ap_types"] in (False, "off"):  # ap_types=false / off: the default, none
            options["ap_types"] = None
        if options["ap_types"] is not None:
            find_ap_types(str(options["ap_types"]))
        agreement = options["agreement"]
        if isinstance(agreement, bool) or not isinstance(agreement, int | float) \
                or not 0 <= agreement <= 1:  # NaN fails the comparison too
            raise BackendError(f"hls: agreement={agreement!r} must be a fraction from 0 to 1")
        if not isinstance(options["csim"], bool):
            raise BackendError(f"hls: csim={options['csim']!r} must be true or false")
        try:  # written into build.tcl and the Makefile: checked against their patterns here
            codegen.part(options["part"])
            options["clock_ns"] = codegen.clock_ns(options["clock_ns"])
        except ValueError as exc:
            raise BackendError(f"hls: {exc}") from exc
        return options

    def build(self, model: ir.Model, root: Path, options: dict[str, Any],
              feeds: Sequence[Feeds] | None = None) -> BuiltArtifact:
        options = self.options(options)
        ap_types = find_ap_types(str(options["ap_types"])) if options["ap_types"] else None
        lowered = lower(model, options["precision"], options["io"])
        for layer in lowered.layers:
            if unroll(layer, options["reuse"]) > VITIS_UNROLL_LIMIT:
                raise BackendError(
                    f"hls: {layer.node!r} unrolls {unroll(layer, options['reuse'])} multiplies at "
                    f"reuse={options['reuse']}, over Vitis's {VITIS_UNROLL_LIMIT}; use reuse >= "
                    f"{-(-layer.macs // layer.output.size // VITIS_UNROLL_LIMIT)}")
        out = root / HLS_DIR
        project = emit.Project(f"slimgraph HLS project for {model.graph.name or 'model'}",
                               model.graph.name or "model", _version(), options["io"],
                               options["reuse"], options["part"], float(options["clock_ns"]))
        emitter = emit.Emitter(lowered, project)
        written = emitter.render(out)
        io = io_spec(model, lowered)
        written.append(_write_json(out / IO_FILE, io))
        est = estimate(lowered.layers, options["reuse"], options["io"], float(options["clock_ns"]),
                       *emitter.memory_bits())
        written.append(_write_json(out / ESTIMATE_FILE, est))
        report = [f"Project `{HLS_DIR}/` ({options['io']}, reuse={options['reuse']}, part "
                  f"{options['part']}); `make -C {HLS_DIR} csim` builds and runs the C simulation "
                  f"with g++, `vitis_hls -f build.tcl` synthesises it. Estimate "
                  f"(`{HLS_DIR}/{ESTIMATE_FILE}`, formulas there):", "", *markdown(est)]
        details: dict[str, Any] = {"estimate": est["total"]}
        if feeds:
            raw = [np.concatenate([to_device(io["input"], f[io["input"]["name"]]) for f in feeds])]
            written.append(write_samples(out / INPUTS_FILE, raw[0]))
            if options["csim"] and toolchain_missing() is None:
                csim = run_csim_check(model, lowered, out, feeds, raw, io, ap_types)
                o = csim["vs_onnxruntime"]["per_layer"]
                agreement = o["fraction_within_one_step"]
                if agreement is not None and agreement < options["agreement"]:
                    raise BackendError(
                        f"hls: layer by layer, only {o['within_one_step']:,} of {o['elements']:,} "
                        f"quantized values ({agreement:.4%}) are within one step of onnxruntime's "
                        f"execution of the same graph (required: agreement="
                        f"{options['agreement']}); at most {o['max_steps']} steps apart")
                written += [out / OUTPUTS_FILE, out / CSIM_FILE]
                if ap_types is not None:
                    written.append(out / AP_OUTPUTS_FILE)
                details["csim"] = csim
                report += ["", *csim_markdown(csim)]
            elif options["csim"]:
                report += ["", f"C simulation not run: {toolchain_missing()}."]
        files = sorted(str(p.relative_to(root)) for p in written)
        return BuiltArtifact(self.name, root, files, options, f"{HLS_DIR}/{IO_FILE}", details,
                             report)

    def load(self, built: BuiltArtifact) -> Runner:
        return CsimRunner(built.root / HLS_DIR)


# -- the runner --------------------------------------------------------------------------------
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


# -- formats and layouts -----------------------------------------------------------------------
def _format_json(tensor: Tensor, layout: str) -> dict[str, Any]:
    fmt = tensor.fmt
    return {"shape": list(tensor.shape), "layout": layout, "bits": fmt.bits, "signed": fmt.signed,
            "scale": fmt.scale.tolist(), "zero_point": fmt.zero_point}


def io_spec(model: ir.Model, lowered: Lowered) -> dict[str, Any]:
    """How the top function's raw integers map to the model's float input and output."""
    def layout(tensor: Tensor) -> str:
        if len(tensor.shape) != 3:
            return "N"
        return "HWC" if lowered.stream else "CHW"

    spec = {}
    for key, tensor, value in (("input", lowered.inputs[0], model.graph.inputs[0]),
                               ("output", lowered.outputs[0], model.graph.outputs[0])):
        spec[key] = {"name": value.name, **_format_json(tensor, layout(tensor))}
    return spec


def _fmt(spec: dict[str, Any]) -> Format:
    return Format(spec["bits"], spec["signed"], np.asarray(spec["scale"], np.float64),
                  spec["zero_point"])


def to_device(spec: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """A float feed [batch, ...] -> raw integers in the order the top function reads them."""
    raw = reference.quantize_input(np.asarray(x).reshape(len(x), *spec["shape"]), _fmt(spec))
    if spec["layout"] == "HWC":
        raw = raw.transpose(0, 2, 3, 1)
    return raw.reshape(len(raw), -1)


def from_device(spec: dict[str, Any], raw: np.ndarray) -> np.ndarray:
    shape = spec["shape"]
    if spec["layout"] == "HWC":
        raw = raw.reshape(len(raw), shape[1], shape[2], shape[0]).transpose(0, 3, 1, 2)
    return reference.dequantize_output(raw.reshape(len(raw), *shape), _fmt(spec))


# -- verification at build time ----------------------------------------------------------------
def run_csim_check(model: ir.Model, lowered: Lowered, project: Path, feeds: Sequence[Feeds],
                   raw_inputs: list[np.ndarray], io: dict[str, Any],
                   ap_types: Path | None = None) -> dict[str, Any]:
    """Build and run ``make csim``; require bit-exactness against the integer reference, and
    with ``ap_types`` the Vitis-types build's outputs identical to it."""
    with tempfile.TemporaryDirectory(prefix="slimgraph-csim-") as build:
        binary = compile_csim(project, Path(build))
        out = run_binary(binary, project / INPUTS_FILE, project / OUTPUTS_FILE)
        if ap_types is not None:
            ap_binary = compile_csim(project, Path(build), "csim_ap", ap_types)
            ap_out = run_binary(ap_binary, project / INPUTS_FILE, project / AP_OUTPUTS_FILE)
    shape = io["input"]["shape"]
    logical = [raw_inputs[0].reshape(len(raw_inputs[0]), *(
        (shape[1], shape[2], shape[0]) if io["input"]["layout"] == "HWC" else shape))]
    if io["input"]["layout"] == "HWC":
        logical = [logical[0].transpose(0, 3, 1, 2)]
    values = reference.run(lowered, logical)
    expected = values[lowered.outputs[0].name].reshape(len(out), *lowered.outputs[0].shape)
    if io["output"]["layout"] == "HWC":
        expected = expected.transpose(0, 2, 3, 1)
    expected = expected.reshape(len(out), -1)
    mismatches = int((expected != out).sum())
    report = {
        "samples": len(out),  # no timings: the same input and options give the same files
        "vs_integer_reference": {"elements": int(out.size), "mismatches": mismatches,
                                 "bit_exact": mismatches == 0},
        "vs_onnxruntime": compare_onnxruntime(model, lowered, feeds, values, io),
    }
    differ = 0  # Vitis-types build against the plain one
    if ap_types is not None:
        differ = int((ap_out != out).sum()) if ap_out.shape == out.shape else int(out.size)
        report["vitis_types"] = {"headers": str(ap_types), "elements": int(out.size),
                                 "mismatches": differ, "identical": differ == 0}
    _write_json(project / CSIM_FILE, report)
    if mismatches:
        raise BackendError(f"hls: the C simulation differs from the integer reference in "
                           f"{mismatches} of {out.size} output values")
    if differ:
        raise BackendError(f"hls: built with Vitis's ap_int / hls::stream ({ap_types}), the C "
                           f"simulation differs from the plain build in {differ} of {out.size} "
                           "output values")
    return report


def csim_markdown(csim: dict[str, Any]) -> list[str]:
    ref, ort = csim["vs_integer_reference"], csim["vs_onnxruntime"]
    out = ort["output"]
    lines = [f"C simulation (`make csim`, g++): {csim['samples']} samples, "
             f"{ref['mismatches']} of {ref['elements']:,} output values "
             f"differ from the NumPy integer reference "
             f"({'bit-exact' if ref['bit_exact'] else 'NOT bit-exact'})."]
    if "vitis_types" in csim:
        ap = csim["vitis_types"]
        lines.append(f"Built again with Vitis's ap_int and hls::stream (`make csim-ap`, headers "
                     f"from `{ap['headers']}`): {ap['elements'] - ap['mismatches']:,} of "
                     f"{ap['elements']:,} output values identical to the plain build.")
    local = ort["per_layer"]
    if local["elements"]:
        lines.append(f"Against onnxruntime on the same graph, layer by layer ({local['layers']} "
                     f"layers recomputed from onnxruntime's inputs): {local['equal']:,} of "
                     f"{local['elements']:,} quantized values equal, {local['within_one_step']:,} "
                     f"within one step ({local['fraction_within_one_step']:.4%}).")
    if ort["elements"]:
        lines.append(f"End to end: {ort['equal']:,} of {ort['elements']:,} quantized values equal "
                     f"onnxruntime's, {ort['within_one_step']:,} within one step "
                     f"({ort['fraction_within_one_step']:.4%}), at most {ort['max_steps']} steps "
                     "apart.")
    lines.append(f"Output: {out['within_one_step']:,} of {out['elements']:,} values within one "
                 f"output step of onnxruntime's, max abs error {out['max_abs_err']:.3g}.")
    return lines


def compare_onnxruntime(model: ir.Model, lowered: Lowered, feeds: Sequence[Feeds],
                        values: dict[str, np.ndarray], io: dict[str, Any]) -> dict[str, Any]:
    """Every quantized tensor and the output against onnxruntime running the same graph."""
    import onnx
    import onnxruntime as ort

    proto = ir.to_proto(model)
    known = {o.name for o in proto.graph.output}
    names = [n for n in lowered.quantized if n not in known]
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    results = [session.run([*names, io["output"]["name"]], dict(f)) for f in feeds]
    ort_raw = {name: np.concatenate([r[i] for r in results]).astype(np.int64)
               for i, name in enumerate(names)}
    counts = _agreement((values[lowered.quantized[n].name].reshape(a.shape), a)
                        for n, a in ort_raw.items())
    # Layer by layer: each layer recomputed from onnxruntime's own inputs, so a one-step
    # difference early in a deep net is not counted again in every layer after it.
    parallel = lower(model, lowered.precision, "parallel") if lowered.stream else lowered
    theirs = {parallel.quantized[n].name: a for n, a in ort_raw.items()}
    pairs = []
    for layer in parallel.layers:
        if layer.output.name in theirs and all(t.name in theirs for t in layer.inputs):
            args = [theirs[t.name].reshape(len(theirs[t.name]), *t.shape) for t in layer.inputs]
            mine = reference.run_layer(layer, args, False)
            pairs.append((mine, theirs[layer.output.name].reshape(mine.shape)))
    per_layer = _agreement(pairs)
    ort_out = np.concatenate([r[-1] for r in results]).astype(np.float64)
    ours = values[lowered.outputs[0].name].reshape(len(ort_out), *lowered.outputs[0].shape)
    ours = reference.dequantize_output(ours, lowered.outputs[0].fmt).astype(np.float64)
    scale = lowered.outputs[0].fmt.scale
    step = scale.reshape((-1,) + (1,) * (ort_out.ndim - 2)) if scale.ndim else scale
    steps = np.abs(ours - ort_out.reshape(ours.shape)) / step
    return {
        "quantized_tensors": len(names), **counts,
        "per_layer": {"layers": len(pairs), **per_layer},
        "output": {"elements": int(steps.size), "within_one_step": int((steps <= 1.0001).sum()),
                   "max_steps": round(float(steps.max()), 3),
                   "max_abs_err": float(np.abs(ours - ort_out.reshape(ours.shape)).max())},
    }


def _agreement(pairs) -> dict[str, Any]:
    """Counts of (ours, onnxruntime's) raw values: equal, within one step, the largest gap."""
    total = equal = within = worst = 0
    for ours, theirs in pairs:
        diff = np.abs(ours - theirs)
        total += diff.size
        equal += int((diff == 0).sum())
        within += int((diff <= 1).sum())
        worst = max(worst, int(diff.max()) if diff.size else 0)
    return {"elements": total, "equal": equal, "within_one_step": within, "max_steps": worst,
            "fraction_within_one_step": round(within / total, 6) if total else None}


def _write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slimgraph")
    except PackageNotFoundError:
        return "dev"


HLS = HlsBackend()

__all__ = ["HLS", "CsimRunner", "HlsBackend", "compile_csim", "find_ap_types"]
