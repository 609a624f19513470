"""int8 and int4 on all-MiniLM-L6-v2: fp32 vs slimgraph `quantize` variants vs onnxruntime's quantizers.

One run, one exported model (the built-in `minilm` after `fold-constants`), the same inputs for
everyone. Calibration: the 48 calibration sentences, one per feed (slimgraph holds the last quarter
out for its accuracy guard). Accuracy: cosine of each sentence embedding to fp32, mean and min, over
the 16 held-out sentences and over all 64 sentences. Latency: batch 16 x 64 tokens (the held-out
sentences), onnxruntime CPU, 2 intra-op threads, spinning off, medians of interleaved rounds
(`slimgraph.timing.interleaved`). Peers: `quantize_dynamic` (per-channel and per-tensor
int8 weights) and `quantize_static` (QDQ, per-channel, MinMax; every op it supports, and MatMul
only). A second table sweeps the SmoothQuant strength for dynamic int8 (accuracy only).

    python benchmarks/quantize_minilm.py     # -> benchmarks/results/quantize_minilm.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

import slimgraph
from slimgraph.artifact import package_versions
from slimgraph.backends.ort import session_for
from slimgraph.calibration import Calibration
from slimgraph.frontend.builtin import get_builtin
from slimgraph.passes import Pipeline
from slimgraph.passes.quantize import cpu_flags, int8_target
from slimgraph.timing import interleaved

RESULTS = Path(__file__).parent / "results"
SESSION = {"intra_op_num_threads": 2, "allow_spinning": False}
CALIBRATION_SENTENCES = 48
VARIANTS = {
    "slimgraph int8 dynamic": "quantize:int8,dynamic=true",
    "slimgraph int8 dynamic smooth=0.75": "quantize:int8,dynamic=true,smooth=0.75",
    "slimgraph int8 dynamic smooth=auto": "quantize:int8,dynamic=true,smooth=auto",
    "slimgraph int8 dynamic guard 0.995": "quantize:int8,dynamic=true,tolerance=0.995",
    "slimgraph int8 static": "quantize:int8",
    "slimgraph int8 static smooth=0.75": "quantize:int8,smooth=0.75",
    "slimgraph int4 block 32": "quantize:int4,block=32",
    "slimgraph int4 block 32 smooth=0.5": "quantize:int4,block=32,smooth=0.5",
    "slimgraph int4 block 32 smooth=auto": "quantize:int4,block=32,smooth=auto",
}
SWEEP = (0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0)


class _Reader(CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def _embeddings(model: bytes | str, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = session_for(model, SESSION)
    return np.concatenate([session.run(None, b)[0] for b in batches])


def _cosines(reference: np.ndarray, got: np.ndarray) -> np.ndarray:
    a, b = reference.astype(np.float64), got.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _accuracy(reference: np.ndarray, got: np.ndarray, held_out: int) -> dict[str, float]:
    c = _cosines(reference, got)
    return {"mean_cosine_held_out": round(float(c[-held_out:].mean()), 5),
            "mean_cosine_all": round(float(c.mean()), 5),
            "min_cosine_all": round(float(c.min()), 5)}


def _quantize(fp32: ir.Model, spec: str, calibration: Calibration) -> tuple[bytes, dict, float]:
    pipeline = Pipeline.parse(f"{spec},speed_check=false" if spec.startswith("quantize:int8") else spec)
    pipeline.bind_calibration(calibration)
    start = time.perf_counter()
    model, (report,) = pipeline.run(fp32.clone())
    seconds = time.perf_counter() - start
    summary = {"counts": report.counts, "notes": report.notes,
               "weight_bytes_after": report.weight_bytes_after}
    return ir.to_proto(model).SerializeToString(), summary, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(2)

    builtin = get_builtin("minilm")
    calibration_feeds = builtin.calibration(CALIBRATION_SENTENCES)
    calibration = Calibration(calibration_feeds)
    held_out = builtin.evaluation().feeds
    batches = Calibration(calibration_feeds).batched(16) + held_out
    bench_feed = {k: np.concatenate([b[k] for b in held_out]) for k in held_out[0]}
    n_held_out = sum(len(b["input_ids"]) for b in held_out)

    loaded = slimgraph.load("minilm", calibration=calibration)
    fp32, _ = Pipeline.parse("fold-constants").run(loaded.model)
    models: dict[str, bytes | str] = {}
    details: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        fp32_path.write_bytes(ir.to_proto(fp32).SerializeToString())
        models["fp32"] = str(fp32_path)
        details["fp32"] = {"spec": "fold-constants"}
        for label, spec in VARIANTS.items():
            models[label], report, seconds = _quantize(fp32, spec, calibration)
            details[label] = {"spec": f"fold-constants,{spec}", "quantize_seconds": round(seconds, 1),
                              "report": report}
        peers = {
            "ort quantize_dynamic per-channel": lambda out: quantize_dynamic(
                fp32_path, out, per_channel=True, weight_type=QuantType.QInt8),
            "ort quantize_dynamic per-tensor": lambda out: quantize_dynamic(
                fp32_path, out, per_channel=False, weight_type=QuantType.QInt8),
            "ort quantize_static QDQ per-channel": lambda out: quantize_static(
                fp32_path, out, _Reader(calibration_feeds), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax),
            "ort quantize_static QDQ per-channel, MatMul only": lambda out: quantize_static(
                fp32_path, out, _Reader(calibration_feeds), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["MatMul"]),
        }
        for label, run in peers.items():
            out = Path(tmp) / f"{label.replace(' ', '_').replace(',', '')}.onnx"
            start = time.perf_counter()
            run(out)
            models[label] = out.read_bytes()
            details[label] = {"quantize_seconds": round(time.perf_counter() - start, 1)}

        reference = _embeddings(models["fp32"], batches)
        for label, model in models.items():
            details[label]["accuracy"] = _accuracy(reference, _embeddings(model, batches), n_held_out)
            size = Path(model).stat().st_size if isinstance(model, str) else len(model)
            details[label]["file_bytes"] = size
        sessions = {k: session_for(v, SESSION) for k, v in models.items()}
        calls = {k: (lambda s=s: s.run(None, bench_feed)) for k, s in sessions.items()}
        latency = interleaved(calls, warmup=2, repeat=args.rounds)
        for label, lat in latency.items():
            details[label]["latency_ms"] = round(lat.p50_ms, 2)
            details[label]["vs_fp32"] = round(lat.p50_ms / latency["fp32"].p50_ms, 3)

        sweep = {}
        for alpha in SWEEP:
            model, _, _ = _quantize(fp32, f"quantize:int8,dynamic=true,smooth={alpha}", calibration)
            sweep[alpha] = _accuracy(reference, _embeddings(model, batches), n_held_out)

    results = {
        "model": "minilm (all-MiniLM-L6-v2), fold-constants",
        "batch": list(bench_feed["input_ids"].shape),
        "cpu": platform.processor() or platform.machine(),
        "int8_target": int8_target(cpu_flags()).describe(),
        "rounds": args.rounds,
        "versions": package_versions(),
        "variants": details,
        "smooth_sweep_dynamic": {str(k): v for k, v in sweep.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantize_minilm.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "quantize_minilm.md").write_text(_markdown(results))
    print(_markdown(results))


def _markdown(results: dict) -> str:
    lines = [
        "# all-MiniLM-L6-v2: slimgraph quantize vs onnxruntime quantize_dynamic / quantize_static",
        "",
        f"onnxruntime {results['versions']['onnxruntime']}, {results['cpu']}, 2 threads, spinning "
        f"off, batch {'x'.join(map(str, results['batch']))} tokens, {results['rounds']} interleaved "
        f"rounds, medians. int8 target: {results['int8_target']}. Cosine: sentence embedding vs "
        "fp32, 16 held-out sentences and all 64 (48 calibration + 16 held-out). Every session, the "
        "peers' too, skips onnxruntime's SkipLayerNormFusion as slimgraph's ort-cpu does "
        "(its CPU kernel is slower than the ops it replaces: ort_fusions.md).",
        "",
        "| variant | ms | vs fp32 | mean cosine held-out | mean cosine all | min cosine | file bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, d in results["variants"].items():
        a = d["accuracy"]
        lines.append(
            f"| {label} | {d['latency_ms']:.1f} | {d['vs_fp32']:.3f}x | {a['mean_cosine_held_out']:.5f} | "
            f"{a['mean_cosine_all']:.5f} | {a['min_cosine_all']:.5f} | {d['file_bytes']} |"
        )
    lines += ["", "## SmoothQuant strength, dynamic int8 (accuracy only)", "",
              "| alpha | mean cosine held-out | mean cosine all | min cosine |", "|---|---|---|---|"]
    for alpha, a in results["smooth_sweep_dynamic"].items():
        lines.append(f"| {alpha} | {a['mean_cosine_held_out']:.5f} | {a['mean_cosine_all']:.5f} | "
                     f"{a['min_cosine_all']:.5f} |")
    lines += ["", "## slimgraph reports", ""]
    for label, d in results["variants"].items():
        if "report" in d:
            lines.append(f"- **{label}** (`{d['spec']}`): {d['report']['counts']}; "
                         + "; ".join(n for n in d["report"]["notes"] if "sensitivity" not in n))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
