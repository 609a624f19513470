"""int8 on a real pretrained mobile CNN: slimgraph's `int8` recipe vs onnxruntime's `quantize_static`.

Model: the built-in `efficientnet-lite1` (EfficientNet-Lite1, its published ImageNet weights,
depthwise-separable MBConv blocks, ReLU6, BatchNorm folded). Data: crops of real photographs.
Calibration: the built-in's 64 calibration crops, for both. slimgraph's accuracy guard judges on
the built-in's 256 verification crops (the data `export` verifies on). Everything below is
measured on 256 further crops drawn with another seed, used by neither.

Peer, in the same run on the same fold-constants graph: onnxruntime `quantize_static` (QDQ,
per-channel weights, MinMax, U8S8). Latency: onnxruntime CPU, 2 intra-op threads, spinning off,
interleaved rounds, medians, batch 1 and 16; onnxruntime's profiler by op type for both, and the op
types left in each int8 graph after onnxruntime's optimizer.

    python benchmarks/quantize_real_cnn.py   # -> benchmarks/results/quantize_real_cnn.{json,md}
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from quantize_cnn import THREADS, _latencies, _Reader, _session, profile_rows, run_facts, write_results

import slimgraph
from slimgraph.backends.ort import kernel_time_by_op
from slimgraph.frontend.builtin import efficientnet
from slimgraph.verify import compare_outputs

RESULTS = Path(__file__).parent / "results"
BATCHES = (1, 16)
TEST_SEED = 3  # calibration crops use seed 1, verification (the guard's data) seed 2
TEST_CROPS = 256
OURS, PEER = "slimgraph int8", "ort quantize_static U8S8"


def _optimized_ops(model: bytes | str, tmp: Path, label: str) -> dict[str, int]:
    """Op types of the graph onnxruntime actually runs (its optimizer's output)."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp / f"{label}_optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    graph = onnx.load(so.optimized_model_filepath).graph
    return dict(collections.Counter(n.op_type for n in graph.node).most_common())


def _margins(logits: np.ndarray) -> dict:
    """How confident the float model is: top-1 probability and the top-1 / top-2 logit gap."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    top = np.sort(logits, axis=1)
    return {"median_top1_probability": round(float(np.median(p.max(axis=1))), 3),
            "share_with_logit_gap_below_0.05": round(float(np.mean(top[:, -1] - top[:, -2] < 0.05)), 4),
            "classes_predicted": len(set(logits.argmax(axis=1).tolist()))}


def run(rounds: int, tmp: Path) -> dict:
    t = time.perf_counter()
    result = slimgraph.export("efficientnet-lite1", tmp / "int8", passes="int8", force=True)
    export_s = time.perf_counter() - t
    (report,) = [r for r in json.loads((tmp / "int8" / "manifest.json").read_text())["passes"]
                 if r["name"] == "quantize"]
    fp32 = slimgraph.export("efficientnet-lite1", tmp / "fp32", passes="fold-constants", force=True)
    fp32_path = fp32.out / "model.onnx"
    builtin = efficientnet.build()
    calibration = builtin.calibration(64)
    t = time.perf_counter()
    peer_path = tmp / "ort_u8s8.onnx"
    quantize_static(str(fp32_path), str(peer_path), _Reader(calibration),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    peer_s = time.perf_counter() - t
    models = {"fp32": str(fp32_path), OURS: str(result.out / "model.onnx"), PEER: str(peer_path)}
    sessions = {k: _session(v) for k, v in models.items()}

    images = efficientnet.crops(TEST_CROPS, TEST_SEED)
    evaluation = [{"image": images[i:i + 16]} for i in range(0, TEST_CROPS, 16)]
    outputs = {k: [s.run(None, f) for f in evaluation] for k, s in sessions.items()}
    accuracy = {}
    for k, got in outputs.items():
        (m,) = compare_outputs(["logits"], outputs["fp32"], got)
        accuracy[k] = {"cosine": round(m.cosine, 6), "top1": m.top1_agreement,
                       "max_rel_err": round(m.max_rel_err, 4)}
    latency, profile = {}, {}
    for batch in BATCHES:
        feed = {"image": images[:batch]}
        medians = _latencies(sessions, feed, rounds, 0.3)
        latency[batch] = {k: {"ms": round(v * 1e3, 3), "vs_fp32": round(v / medians["fp32"], 3)}
                          for k, v in medians.items()}
        profile[batch] = {
            k: {op: round(us, 1) for op, us in kernel_time_by_op(
                models[k], feed, 50 if batch == 1 else 10,
                {"intra_op_num_threads": THREADS, "allow_spinning": False}).items()}
            for k in models}
    return {
        "model": "efficientnet-lite1",
        "data": {"photos": len(efficientnet.photographs()), "test_crops": TEST_CROPS,
                 "test_seed": TEST_SEED, **_margins(np.concatenate([o[0] for o in outputs["fp32"]]))},
        "seconds": {"slimgraph export (load, passes, verify)": round(export_s, 1),
                    "ort quantize_static": round(peer_s, 1)},
        "verification": [v.to_json() for v in result.verifications],
        "report": {"counts": report["counts"], "notes": report["notes"]},
        "file_bytes": {k: Path(v).stat().st_size for k, v in models.items()},
        "accuracy": accuracy,
        "latency": latency,
        "kernel_us_per_run": profile,
        "optimized_ops": {k: _optimized_ops(models[k], tmp, k.replace(" ", "_")) for k in (OURS, PEER)},
    }


def _markdown(results: dict) -> str:
    r = results["model"]
    lines = [
        "# int8 on a real pretrained mobile CNN: slimgraph vs onnxruntime quantize_static",
        "",
        f"EfficientNet-Lite1 (published ImageNet weights) on {r['data']['test_crops']} crops of "
        f"{r['data']['photos']} real photographs held out from calibration and from the accuracy "
        f"guard. onnxruntime {results['versions']['onnxruntime']}, {results['cpu']}, {THREADS} "
        f"threads, spinning off, {results['rounds']} interleaved rounds, medians. int8 target chosen "
        f"by slimgraph: {results['int8_target']}.",
        "",
        "| variant | top-1 agreement | cosine | batch 1 ms | vs fp32 | batch 16 ms | vs fp32 | file bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, acc in r["accuracy"].items():
        l1, l16 = r["latency"][1][k], r["latency"][16][k]
        lines.append(f"| {k} | {acc['top1']:.4f} | {acc['cosine']:.5f} | {l1['ms']:.2f} | "
                     f"{l1['vs_fp32']:.2f}x | {l16['ms']:.1f} | {l16['vs_fp32']:.2f}x | "
                     f"{r['file_bytes'][k]:,} |")
    d = r["data"]
    lines += [
        "",
        f"The float model on these crops: median top-1 probability {d['median_top1_probability']}, "
        f"{d['share_with_logit_gap_below_0.05']:.1%} of crops with a top-1 / top-2 logit gap "
        f"below 0.05, {d['classes_predicted']} classes predicted.",
        "",
        "`slimgraph export efficientnet-lite1 --passes int8` (no options) on its own "
        "verification crops: " + "; ".join(
            f"{m['name']} cosine {m['cosine']:.5f}, top-1 {m['top1_agreement']:.4f} "
            f"({'passed' if v['passed'] else 'FAILED'})"
            for v in r["verification"] for m in v["outputs"]),
        "",
        "What the quantize pass reported:", "",
        *[f"- {note}" for note in r["report"]["notes"]],
        f"- counts: {r['report']['counts']}",
        "",
        "Op types left after onnxruntime's optimizer (what runs):", "",
        *[f"- {k}: {ops}" for k, ops in r["optimized_ops"].items()],
        "",
        "Where the time goes: onnxruntime's profiler, microseconds per run in each op type's "
        "kernels.", "",
        "| batch | variant | total | by op type |", "|---|---|---|---|",
        *profile_rows(r["kernel_us_per_run"]),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    results = run_facts(args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        results["model"] = run(args.rounds, Path(tmp))
    write_results(args.out, "quantize_real_cnn", results, _markdown(results))


if __name__ == "__main__":
    main()
