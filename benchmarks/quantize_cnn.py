"""Static int8 on CNNs: fp32 vs slimgraph `quantize:int8` vs onnxruntime's own `quantize_static`.

Models: the built-in `resnet-tiny` and a ResNet-18-style CIFAR net (widths 64-512, seeded random
weights, BN statistics from synthetic images). Peers, in one run on the same exported model and the
same 64 calibration images: onnxruntime `quantize_static` (QDQ, per-channel, MinMax) with U8S8 and
with S8S8 activations. Latency: onnxruntime CPU, 2 intra-op threads, spinning off, interleaved
rounds, medians, batch 1 and 16. Agreement with fp32 (cosine of logits, top-1) on 256 held-out
images.

    python benchmarks/quantize_cnn.py     # -> benchmarks/results/quantize_cnn.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from torch import nn

import slimgraph
from slimgraph.artifact import package_versions
from slimgraph.backends.ort import kernel_time_by_op
from slimgraph.calibration import Calibration
from slimgraph.frontend.builtin import resnet_tiny
from slimgraph.passes import Pipeline
from slimgraph.passes.quantize import cpu_flags, int8_target
from slimgraph.verify import compare_outputs

RESULTS = Path(__file__).parent / "results"
THREADS = 2
BATCHES = (1, 16)
CALIBRATION_SAMPLES = 64


def make_resnet18() -> nn.Module:
    """The built-in `resnet18` module (ResNet-18 layout for 32x32 inputs, seeded weights)."""
    return resnet_tiny.make_resnet_tiny(resnet_tiny.RESNET18_WIDTHS)


class _Reader(CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def _session(model: bytes | str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _latencies(sessions: dict[str, ort.InferenceSession], feed: dict[str, np.ndarray],
               rounds: int, budget_s: float) -> dict[str, float]:
    """Median seconds per run of each session, over interleaved rounds of equal run counts."""
    for s in sessions.values():
        s.run(None, feed)
    start = time.perf_counter()
    first = next(iter(sessions.values()))
    first.run(None, feed)
    per_round = max(1, int(budget_s / max(time.perf_counter() - start, 1e-6)))
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            t = time.perf_counter()
            for _ in range(per_round):
                s.run(None, feed)
            times[name].append((time.perf_counter() - t) / per_round)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_model(label: str, model, calibration: Calibration, evaluation: list[dict[str, np.ndarray]],
                inputs: dict | None, rounds: int, tmp: Path) -> dict:
    loaded = slimgraph.load(model, inputs=inputs, calibration=calibration)
    base = Pipeline.parse("fold-constants")
    fp32_model, _ = base.run(loaded.model)
    fp32_path = tmp / f"{label}_fp32.onnx"
    fp32_path.write_bytes(ir.to_proto(fp32_model).SerializeToString())

    ours = Pipeline.parse("quantize:int8,speed_check=false")
    ours.bind_calibration(calibration)
    t = time.perf_counter()
    int8_model, reports = ours.run(fp32_model.clone())
    quantize_s = time.perf_counter() - t
    models: dict[str, bytes | str] = {
        "fp32": str(fp32_path),
        "slimgraph int8": ir.to_proto(int8_model).SerializeToString(),
    }
    for act, tag in ((QuantType.QUInt8, "U8S8"), (QuantType.QInt8, "S8S8")):
        path = tmp / f"{label}_ort_{tag}.onnx"
        quantize_static(str(fp32_path), str(path), _Reader(list(calibration)),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=act,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        models[f"ort quantize_static {tag}"] = str(path)
    sessions = {k: _session(v) for k, v in models.items()}

    outputs = {k: [s.run(None, f) for f in evaluation] for k, s in sessions.items()}
    accuracy = {}
    for k, got in outputs.items():
        (m,) = compare_outputs(["logits"], outputs["fp32"], got)
        accuracy[k] = {"cosine": round(m.cosine, 6), "top1": m.top1_agreement}
    latency, profile = {}, {}
    name = next(iter(loaded.verification_feeds[0]))
    images = np.concatenate([f[name] for f in evaluation])
    for batch in BATCHES:
        medians = _latencies(sessions, {name: images[:batch]}, rounds, 0.2)
        latency[batch] = {k: {"ms": round(v * 1e3, 4), "vs_fp32": round(v / medians["fp32"], 3)}
                          for k, v in medians.items()}
        profile[batch] = {
            k: {op: round(us, 1) for op, us in kernel_time_by_op(
                models[k], {name: images[:batch]}, 200 if batch == 1 else 100,
                {"intra_op_num_threads": THREADS, "allow_spinning": False}).items()}
            for k in ("fp32", "slimgraph int8")}
    size = {k: (Path(v).stat().st_size if isinstance(v, str) else len(v)) for k, v in models.items()}
    return {
        "model": label,
        "quantize_seconds": round(quantize_s, 2),
        "report": {"counts": reports[0].counts, "notes": reports[0].notes,
                   "weight_bytes_before": reports[0].weight_bytes_before,
                   "weight_bytes_after": reports[0].weight_bytes_after},
        "file_bytes": size,
        "accuracy": accuracy,
        "latency": latency,
        "kernel_us_per_run": profile,  # {batch: {variant: {op type: us}}}
    }


def run_facts(rounds: int) -> dict:
    """What every int8 CNN result records about its run: machine, int8 target, rounds, versions."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "int8_target": int8_target(cpu_flags()).describe(),
        "rounds": rounds,
        "versions": package_versions(),
    }


def write_results(out: Path, name: str, results: dict, markdown: str) -> None:
    """``out/NAME.json`` and ``out/NAME.md``, and the Markdown on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)
    print(markdown)


def profile_rows(kernel_us_per_run: dict) -> list[str]:
    """Markdown rows ``| batch | variant | total | by op type |`` of profiler microseconds."""
    return [f"| {batch} | {k} | {sum(ops.values()):.0f} | "
            + ", ".join(f"{op} {us:.0f}" for op, us in ops.items()) + " |"
            for batch, variants in kernel_us_per_run.items() for k, ops in variants.items()]


def _markdown(results: dict) -> str:
    lines = [
        "# Static int8 on CNNs: slimgraph vs onnxruntime quantize_static",
        "",
        f"onnxruntime {results['versions']['onnxruntime']}, {results['cpu']}, {THREADS} threads, "
        f"spinning off, {results['rounds']} interleaved rounds, medians. int8 target chosen by "
        f"slimgraph: {results['int8_target']}.",
        "",
    ]
    for r in results["models"]:
        lines += [f"## {r['model']}", "",
                  "| variant | batch 1 ms | vs fp32 | batch 16 ms | vs fp32 | cosine | top-1 | file bytes |",
                  "|---|---|---|---|---|---|---|---|"]
        for k in r["accuracy"]:
            l1, l16 = r["latency"][1][k], r["latency"][16][k]
            acc = r["accuracy"][k]
            lines.append(
                f"| {k} | {l1['ms']:.3f} | {l1['vs_fp32']:.2f}x | {l16['ms']:.3f} | "
                f"{l16['vs_fp32']:.2f}x | {acc['cosine']:.5f} | {acc['top1']:.4f} | {r['file_bytes'][k]} |"
            )
        lines += ["", f"slimgraph report: {r['report']['counts']}", ""]
        lines += ["Where the time goes: onnxruntime's profiler, microseconds per run in each op "
                  "type's kernels (summed; the rest of a run is dispatch between them).", "",
                  "| batch | variant | total | by op type |", "|---|---|---|---|"]
        lines += profile_rows(r["kernel_us_per_run"])
        conv = {b: v["slimgraph int8"].get("QLinearConv", 0.0) / v["fp32"]["Conv"]
                for b, v in r["kernel_us_per_run"].items()}
        lines += ["", "The int8 convolution kernels alone take "
                  + ", ".join(f"{x:.2f}x of the fp32 ones at batch {b}" for b, x in conv.items())
                  + ": a floor under the whole model's ratio that no graph rewrite removes.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)

    calib = Calibration(
        {"image": x[None]} for x in resnet_tiny.synthetic_images(CALIBRATION_SAMPLES, 1)
    )
    evaluation = [{"image": b} for b in np.split(resnet_tiny.synthetic_images(256, 2), 4)]
    results: dict = {**run_facts(args.rounds), "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        results["models"].append(
            bench_model("resnet-tiny", "resnet-tiny", calib, evaluation, None, args.rounds, Path(tmp))
        )
        results["models"].append(
            bench_model("resnet18-cifar", make_resnet18(), calib, evaluation,
                        {"image": (2, 3, 32, 32)}, args.rounds, Path(tmp))
        )
    write_results(args.out, "quantize_cnn", results, _markdown(results))


if __name__ == "__main__":
    main()
