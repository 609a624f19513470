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

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph import codegen
from slimgraph.backends.base import BuiltArtifact
from slimgraph.backends.hls import emit
from slimgraph.backends.hls.csim import (
    AP_OUTPUTS_FILE,
    INPUTS_FILE,
    IO_FILE,
    OUTPUTS_FILE,
    CsimRunner,
    find_ap_types,
    toolchain_missing,
    write_samples,
)
from slimgraph.backends.hls.csim_check import CSIM_FILE, _write_json, csim_markdown, run_csim_check
from slimgraph.backends.hls.estimate import VITIS_UNROLL_LIMIT, estimate, markdown, unroll
from slimgraph.backends.hls.io_spec import io_spec, to_device
from slimgraph.backends.hls.lower import lower, parse_precision
from slimgraph.calibration import Feeds
from slimgraph.errors import BackendError
from slimgraph.verify import Runner

HLS_DIR = "hls"
ESTIMATE_FILE = "estimate.json"
DEFAULT_PART = "xcvu13p-flga2577-2-e"
DEFAULT_CLOCK_NS = 5.0
IO_MODES = ("parallel", "stream")
MAX_REUSE = 1 << 20
DEFAULT_AGREEMENT = 0.999  # of quantized values within one step of onnxruntime's


class HlsBackend:
    name = "hls"
    description = "Vitis HLS C++ project (int8 / binary / fixed point), proved by a g++ C simulation"

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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slimgraph")
    except PackageNotFoundError:
        return "dev"


HLS = HlsBackend()
