"""Verification at build time: the C simulation bit-exact against the NumPy integer reference,
and every quantized tensor against onnxruntime's execution of the same graph."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.artifact import write_json
from slimgraph.backends.hls import reference
from slimgraph.backends.hls.csim import (
    AP_OUTPUTS_FILE,
    INPUTS_FILE,
    OUTPUTS_FILE,
    compile_csim,
    run_binary,
)
from slimgraph.backends.hls.layout import from_hwc, to_hwc
from slimgraph.backends.hls.lower import Lowered, lower
from slimgraph.calibration import Feeds
from slimgraph.errors import BackendError

CSIM_FILE = "csim.json"


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
    logical = [from_hwc(raw_inputs[0], shape) if io["input"]["layout"] == "HWC"
               else raw_inputs[0].reshape(len(raw_inputs[0]), *shape)]
    values = reference.run(lowered, logical)
    expected = values[lowered.outputs[0].name].reshape(len(out), *lowered.outputs[0].shape)
    if io["output"]["layout"] == "HWC":
        expected = to_hwc(expected)
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
    from slimgraph.backends.ort import probe_session

    known = {o.name for o in model.graph.outputs}
    session, names = probe_session(model, [n for n in lowered.quantized if n not in known])
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
    write_json(path, data, indent=1)
    return path
