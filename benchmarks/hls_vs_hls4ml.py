"""slimgraph's `hls` backend beside hls4ml 1.3.0 on the trained digits models (real data).

    python benchmarks/hls_vs_hls4ml.py     # -> benchmarks/results/hls_vs_hls4ml.{json,md}

Each row emits an HLS C++ project and runs its C simulation (g++, no vendor tools) on the whole
held-out split of scikit-learn digits (360 images): test accuracy, agreement of the top-1 class
with the float model, csim build seconds, emitted size. slimgraph rows come from
`slimgraph export MODEL --passes ... --backend hls[:...]`; their C simulation is also checked
bit-exact against the NumPy integer reference at export. hls4ml rows convert the same trained
torch modules through hls4ml's PyTorch frontend (benchmarks/hls4ml_peer.py); hls4ml is a
benchmark-only peer (`pip install hls4ml==1.3.0`, which `make bench` does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).parent))

import hls4ml_peer  # noqa: E402

import slimgraph  # noqa: E402
from slimgraph.artifact import package_versions  # noqa: E402
from slimgraph.backends.hls import HLS  # noqa: E402
from slimgraph.backends.ort import session_for  # noqa: E402
from slimgraph.frontend.builtin import get_builtin  # noqa: E402

NAME = "hls_vs_hls4ml"
RESULTS = Path(__file__).parent / "results"
HEAL = "heal:steps=1500,lr=3e-3,alpha=0.5"
ROWS = {  # name -> (model, passes, backend spec)
    "digits-cnn int8": ("digits-cnn", "fold-constants,quantize:int8", "hls"),
    "digits-cnn int8 stream": ("digits-cnn", "fold-constants,quantize:int8", "hls:io=stream"),
    "digits-cnn float ap_fixed<16,6>": ("digits-cnn", "fold-constants",
                                        "hls:precision=ap_fixed<16,6>"),
    "digits-cnn binary": ("digits-cnn", "fold-constants,quantize:binary", "hls"),
    "digits-cnn binary + heal": ("digits-cnn", f"fold-constants,quantize:binary,{HEAL}", "hls"),
    "mlp int8": ("mlp", "fold-constants,quantize:int8", "hls"),
    "mlp float ap_fixed<16,6>": ("mlp", "fold-constants", "hls:precision=ap_fixed<16,6>"),
    "mlp binary": ("mlp", "fold-constants,quantize:binary", "hls"),
    "mlp binary + heal": ("mlp", f"fold-constants,quantize:binary,{HEAL}", "hls"),
    "resnet-tiny int8 stream": ("resnet-tiny", "fold-constants,quantize:int8", "hls:io=stream"),
}


def _held_out(name: str) -> tuple[str, np.ndarray, np.ndarray | None]:
    builtin = get_builtin(name)
    data = builtin.evaluation()
    key = builtin.input_names[0]
    labels = np.concatenate(data.labels) if data.labels else None
    return key, np.concatenate([f[key] for f in data.feeds]), labels


def _bytes(root: Path, skip: tuple[str, ...] = ()) -> int:
    return sum(p.stat().st_size for p in root.rglob("*")
               if p.is_file() and not any(s in p.parts for s in skip))


def slimgraph_row(label: str, model: str, passes: str, backend: str, work: Path) -> dict[str, Any]:
    out = work / label.replace(" ", "_").replace("<", "").replace(">", "").replace(",", "_")
    # the project is also built with Vitis's ap_int / hls::stream (hls4ml's wheel carries them)
    backend += ("," if ":" in backend else ":") + "ap_types=auto"
    start = time.perf_counter()
    result = slimgraph.export(model, out, passes=passes, backends=[backend], force=True,
                              allow_mismatch=True)
    export_s = time.perf_counter() - start
    built = result.built["hls"]
    csim = built.details["csim"]
    key, x, labels = _held_out(model)
    start = time.perf_counter()
    runner = HLS.load(built)
    build_s = time.perf_counter() - start  # the runner compiles the project with its Makefile
    got = runner({key: x})[0]
    onnx_out = session_for(str(out / "model.onnx")).run(None, {key: x})[0]
    reference = get_builtin(model)
    import torch

    with torch.no_grad():
        float_out = reference.module(torch.from_numpy(x)).numpy()
    row: dict[str, Any] = {
        "tool": "slimgraph", "model": model, "passes": passes, "backend": backend,
        "n_test": len(x), "export_s": round(export_s, 2), "csim_build_s": round(build_s, 2),
        "bit_exact_vs_integer_reference": csim["vs_integer_reference"]["bit_exact"],
        "vitis_types": csim.get("vitis_types"),
        "verification_samples": csim["samples"],
        "vs_onnxruntime": csim["vs_onnxruntime"],
        "estimate": built.details["estimate"],
        "firmware_bytes": _bytes(out / "hls" / "firmware"),
        "model_firmware_bytes": _bytes(out / "hls" / "firmware", skip=("sg",)),
        "max_abs_diff_vs_onnx_graph": float(np.abs(got - onnx_out).max()),
    }
    if labels is not None:
        row |= {"csim_accuracy": float((got.argmax(1) == labels).mean()),
                "onnx_accuracy": float((onnx_out.argmax(1) == labels).mean()),
                "float_accuracy": float((float_out.argmax(1) == labels).mean()),
                "agreement_with_float": float((got.argmax(1) == float_out.argmax(1)).mean())}
    return row


def efficientnet_row(work: Path, crops: int = 48) -> dict[str, Any]:
    """EfficientNet-Lite1 (ImageNet weights, 240x240 crops of photographs) in int8 as an
    io=stream design. Its C simulation takes ~1.5 s a crop, so the project is built with the
    first ``crops`` held-out crops as its verification inputs (export's default would use 256)."""
    out = work / "efficientnet"
    slimgraph.export("efficientnet-lite1", out, passes="int8", backends=["ort-cpu"], force=True)
    key, x, _ = _held_out("efficientnet-lite1")
    x = x[:crops]
    model = ir.load(out / "model.onnx")
    start = time.perf_counter()
    built = HLS.build(model, out, {"io": "stream", "reuse": 4}, feeds=[{key: x}])
    build_s = time.perf_counter() - start
    got = HLS.load(built)({key: x})[0]  # answered from the build's own simulation
    onnx_out = session_for(str(out / "model.onnx")).run(None, {key: x})[0]
    import torch

    with torch.no_grad():
        float_out = get_builtin("efficientnet-lite1").module(torch.from_numpy(x)).numpy()
    csim = built.details["csim"]
    return {
        "tool": "slimgraph", "model": "efficientnet-lite1", "passes": "int8",
        "backend": "hls:io=stream,reuse=4", "n_test": crops,
        "build_and_csim_s": round(build_s, 1), "csim_build_s": "-",
        "bit_exact_vs_integer_reference": csim["vs_integer_reference"]["bit_exact"],
        "verification_samples": csim["samples"], "vs_onnxruntime": csim["vs_onnxruntime"],
        "estimate": built.details["estimate"],
        "firmware_bytes": _bytes(out / "hls" / "firmware"),
        "model_firmware_bytes": _bytes(out / "hls" / "firmware", skip=("sg",)),
        "top1_agreement_with_onnx_graph": float((got.argmax(1) == onnx_out.argmax(1)).mean()),
        "agreement_with_float": float((got.argmax(1) == float_out.argmax(1)).mean()),
        "onnx_graph_agreement_with_float": float((onnx_out.argmax(1) == float_out.argmax(1)).mean()),
    }


def _counts(o: dict[str, Any]) -> str:
    if o["fraction_within_one_step"] is None:
        return "-"
    return f"{o['within_one_step']:,} / {o['elements']:,} ({o['fraction_within_one_step']:.4%})"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _markdown(results: dict[str, Any]) -> str:
    v, m = results["versions"], results["machine"]
    lines = [
        "# slimgraph `hls` vs hls4ml 1.3.0", "",
        f"`python benchmarks/hls_vs_hls4ml.py`; {m['cpu']}, {m['cores']} cores; slimgraph "
        f"{v.get('slimgraph', '?')}, hls4ml {results.get('hls4ml_version', '?')}, g++ C "
        "simulation only (no Vitis here). Held-out split of scikit-learn digits (360 images), "
        "trained weights.", "",
        "| tool | model / variant | csim test acc | ONNX graph acc | float acc | agreement w/ float "
        "| bit-exact vs integer ref | Vitis ap_int build identical | csim build s "
        "| firmware bytes (model only) |",
        "|---|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for label, r in results["rows"].items():
        if r.get("error"):
            lines.append(f"| {r['tool']} | {label} | error: {r['error']} | | | | | | | |")
            continue
        exact = {True: "yes", False: "NO", None: "-"}[r.get("bit_exact_vs_integer_reference")]
        vitis = r.get("vitis_types")
        vitis_cell = "-" if not vitis else (
            f"{'yes' if vitis['identical'] else 'NO'} "
            f"({vitis['elements'] - vitis['mismatches']:,} / {vitis['elements']:,})")
        lines.append(
            f"| {r['tool']} | {label} | {_pct(r.get('csim_accuracy'))} | "
            f"{_pct(r.get('onnx_accuracy'))} | {_pct(r.get('float_accuracy'))} | "
            f"{_pct(r.get('agreement_with_float'))} | {exact} | {vitis_cell} | "
            f"{r['csim_build_s']} | "
            f"{r['firmware_bytes']:,} ({r['model_firmware_bytes']:,}) |")
    lines += ["", "## slimgraph against onnxruntime on the same graph, and the estimate", "",
              "| row | layer by layer: within one step | end to end: within one step | max steps "
              "| output within one step | output max abs err | DSP | BRAM18 | latency cycles "
              "| interval cycles |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in results["rows"].items():
        if r["tool"] != "slimgraph":
            continue
        o, e = r["vs_onnxruntime"], r["estimate"]
        local = o.get("per_layer", {"fraction_within_one_step": None})
        out = o["output"]
        steps = o["max_steps"] if o["elements"] else "-"
        lines.append(f"| {label} | {_counts(local)} | {_counts(o)} | {steps} | "
                     f"{out['within_one_step']:,} / "
                     f"{out['elements']:,} | {out['max_abs_err']:.3g} | {e['dsp']} | {e['bram18']} "
                     f"| {e['latency_cycles']:,} | {e['interval_cycles']:,} |")
    eff = results["rows"].get("efficientnet-lite1 int8 stream, reuse=4")
    if eff:
        lines += ["", f"EfficientNet-Lite1 (ImageNet weights) int8 as an io=stream design, reuse=4, "
                  f"on {eff['n_test']} held-out crops: C simulation bit-exact: "
                  f"{'yes' if eff['bit_exact_vs_integer_reference'] else 'NO'}; top-1 equal to the "
                  f"int8 ONNX graph's on {eff['top1_agreement_with_onnx_graph']:.4f} of crops, to "
                  f"float's on {eff['agreement_with_float']:.4f} (the int8 ONNX graph: "
                  f"{eff['onnx_graph_agreement_with_float']:.4f}); build + simulation "
                  f"{eff['build_and_csim_s']} s. End to end, one-step differences compound over its "
                  "64 convolutions; layer by layer they stay within one step."]
    q = results["hls4ml_int8_qdq"]
    route = q.get("qonnx_route", {})
    lines += ["", "## An int8 QDQ ONNX graph (digits-cnn, `quantize:int8`)", "",
              "- slimgraph: the `digits-cnn int8` row above (bit-exact C simulation).",
              f"- hls4ml, direct: `{q.get('direct_error')}`",
              f"- hls4ml, direct after qonnx's cleanup: `{q.get('direct_error_after_cleanup')}`",
              f"- hls4ml through qonnx (QCDQToQuant, ...), step `{route.get('step')}`: "
              f"`{route.get('error') or route.get('csim_accuracy')}`", ""]
    lines += results.get("notes", [])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", action="store_true", help="rewrite the .md from the .json")
    parser.add_argument("--no-peer", action="store_true",
                        help="keep the recorded hls4ml rows instead of re-running hls4ml")
    parser.add_argument("--rows", default=";".join(ROWS), help="row names, separated by ;")
    args = parser.parse_args()
    path = args.out / f"{NAME}.json"
    if args.render:
        (args.out / f"{NAME}.md").write_text(_markdown(json.loads(path.read_text())))
        return
    results = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    results |= {"versions": package_versions(),
                "machine": {"cpu": platform.processor() or platform.machine(),
                            "cores": os.cpu_count()}}
    with tempfile.TemporaryDirectory(prefix="hls-bench-") as tmp:
        work = Path(tmp)
        for label in filter(None, args.rows.split(";")):
            model, passes, backend = ROWS[label]
            print(f"[slimgraph] {label}", file=sys.stderr)
            results["rows"][label] = slimgraph_row(label, model, passes, backend, work)
        print("[slimgraph] efficientnet-lite1 int8 stream", file=sys.stderr)
        results["rows"]["efficientnet-lite1 int8 stream, reuse=4"] = efficientnet_row(work)
        for name in ("digits-cnn", "mlp") if not args.no_peer else ():
            for precision in ("ap_fixed<16,6>", "ap_fixed<8,3>"):
                print(f"[hls4ml] {name} {precision}", file=sys.stderr)
                r = hls4ml_peer.measure(name, precision, workdir=work / "hls4ml")
                results["hls4ml_version"] = r.get("hls4ml_version")
                results["rows"][f"{name} float {precision} (hls4ml)"] = {
                    "tool": "hls4ml", **r, "onnx_accuracy": None}
        int8 = work / "digits-cnn_int8" / "model.onnx"
        if not args.no_peer:
            results["hls4ml_int8_qdq"] = hls4ml_peer.int8_qdq(int8, work / "hls4ml-qdq")
    results["notes"] = [
        "Notes:",
        "- hls4ml rows use granularity=model: one ap_fixed type for weights, biases, accumulators "
        "and results, with hls4ml's default rounding (truncate) and overflow (wrap); 8 bits then "
        "collapse. Per-layer types or AP_RND_CONV/AP_SAT recover much of it (a side run: "
        "0.975 / 0.931), which is hand tuning slimgraph's int8 path does not need.",
        "- hls4ml's firmware bytes include its vendored ap_types/nnet_utils headers and the "
        "weights written twice (.h and .txt); slimgraph's include its layer library (firmware/sg).",
        "- Fixed-point rows (float, binary) have no quantized tensors to count; their output is "
        "compared with onnxruntime's float execution of the same graph (steps of 2^-10).",
        "- csim build s: hls4ml's compile() (g++ -O3, a shared library); slimgraph's runner "
        "building the project's Makefile target (g++ -O2).",
        "- Vitis ap_int build identical: the same project compiled again with Xilinx's open-source "
        "ap_int.h / hls_stream.h (the copy hls4ml's wheel carries) in place of plain integer types "
        "(`make csim-ap`, backend option ap_types=auto), its outputs compared value for value with "
        "the plain build's on the 256 verification samples. EfficientNet-Lite1 not run that way "
        "(ap_int arithmetic is emulated, ~10x slower).",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / f"{NAME}.md").write_text(_markdown(results))
    print((args.out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
