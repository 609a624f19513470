"""onnxruntime CPU fusions that slow models down: each on its own and on all-MiniLM-L6-v2.

onnxruntime 1.32's CPU SkipLayerNormalization kernel is several times slower than the Add + Add +
LayerNormalization it replaces, so slimgraph's CPU sessions skip ``SkipLayerNormFusion``
(``slimgraph.backends.ort.CPU_DISABLED_OPTIMIZERS``). This measures, in one process with 2
intra-op threads, spinning off, interleaved rounds (medians):

- the fused op alone against the unfused ops on a 16x64x384 tensor (MiniLM's batch 16 x 64 tokens);
- all-MiniLM-L6-v2 fp32 and `quantize:int8,dynamic=true,smooth=0.75` with onnxruntime's default
  transformers and with the fusion skipped, and onnxruntime's own `quantize_dynamic` (per-channel)
  both ways.

    python benchmarks/ort_fusions.py     # -> benchmarks/results/ort_fusions.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

import slimgraph
from slimgraph.backends.ort import CPU_DISABLED_OPTIMIZERS, session_for
from slimgraph.calibration import Calibration
from slimgraph.frontend.builtin import get_builtin
from slimgraph.passes import Pipeline
from slimgraph.timing import interleaved

RESULTS = Path(__file__).parent / "results"
SESSION = {"intra_op_num_threads": 2, "allow_spinning": False}
HIDDEN = 384


def _residual_layernorm(fused: bool) -> bytes:
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32), n)
               for n in ("bias", "gamma", "beta")]
    if fused:
        nodes = [helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"], ["y"],
                                  domain="com.microsoft", epsilon=1e-12)]
    else:
        nodes = [helper.make_node("Add", ["x", "bias"], ["s"]), helper.make_node("Add", ["s", "skip"], ["t"]),
                 helper.make_node("LayerNormalization", ["t", "gamma", "beta"], ["y"], axis=-1,
                                  epsilon=1e-12)]
    shape = [16, 64, HIDDEN]
    graph = helper.make_graph(
        nodes, "residual_ln",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "skip")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], weights)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def op_alone(rounds: int) -> dict:
    rng = np.random.default_rng(1)
    feed = {n: rng.standard_normal((16, 64, HIDDEN)).astype(np.float32) for n in ("x", "skip")}
    sessions = {
        "SkipLayerNormalization": session_for(_residual_layernorm(True),
                                              {**SESSION, "disabled_optimizers": []}),
        "Add + Add + LayerNormalization": session_for(_residual_layernorm(False), SESSION),
    }
    outs = [s.run(None, feed)[0] for s in sessions.values()]
    latency = interleaved({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()},
                          warmup=5, repeat=rounds)
    return {"shape": [16, 64, HIDDEN], "max_abs_diff": float(np.abs(outs[0] - outs[1]).max()),
            "ms": {k: round(v.p50_ms, 3) for k, v in latency.items()}}


def minilm(rounds: int) -> dict:
    builtin = get_builtin("minilm")
    calibration = Calibration(builtin.calibration(48))
    held_out = builtin.evaluation().feeds
    feed = {k: np.concatenate([b[k] for b in held_out]) for k in held_out[0]}
    loaded = slimgraph.load("minilm", calibration=calibration)
    fp32, _ = Pipeline.parse("fold-constants").run(loaded.model)
    pipeline = Pipeline.parse("quantize:int8,dynamic=true,smooth=0.75,speed_check=false")
    pipeline.bind_calibration(calibration)
    int8, _ = pipeline.run(fp32.clone())
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        onnx.save(ir.to_proto(fp32), fp32_path)
        ort_path = Path(tmp) / "ort_dynamic.onnx"
        quantize_dynamic(fp32_path, ort_path, per_channel=True, weight_type=QuantType.QInt8)
        models = {"fp32": fp32_path.read_bytes(), "slimgraph int8 dynamic smooth=0.75":
                  ir.to_proto(int8).SerializeToString(),
                  "ort quantize_dynamic per-channel": ort_path.read_bytes()}
    calls = {}
    for label, model in models.items():
        for fusion, disabled in (("ort default", []), ("fusion skipped", list(CPU_DISABLED_OPTIMIZERS))):
            session = session_for(model, {**SESSION, "disabled_optimizers": disabled})
            calls[f"{label} | {fusion}"] = (lambda s=session: s.run(None, feed))
    latency = interleaved(calls, warmup=2, repeat=rounds)
    base = latency["fp32 | ort default"].p50_ms
    return {"batch": list(feed["input_ids"].shape),
            "ms": {k: round(v.p50_ms, 2) for k, v in latency.items()},
            "vs_fp32_default": {k: round(v.p50_ms / base, 3) for k, v in latency.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = {"onnxruntime": ort.__version__, "cpu": platform.processor() or platform.machine(),
               "session": SESSION, "rounds": args.rounds,
               "op_alone": op_alone(max(args.rounds, 100)), "minilm": minilm(args.rounds)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ort_fusions.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "ort_fusions.md").write_text(_markdown(results))
    print(_markdown(results))


def _markdown(results: dict) -> str:
    alone, model = results["op_alone"], results["minilm"]
    lines = [
        "# onnxruntime CPU: SkipLayerNormFusion on and off",
        "",
        f"onnxruntime {results['onnxruntime']}, {results['cpu']}, 2 intra-op threads, spinning off, "
        f"interleaved rounds ({results['rounds']} for MiniLM), medians.",
        "",
        f"## The op alone ({'x'.join(map(str, alone['shape']))}, max abs diff {alone['max_abs_diff']:.1e})",
        "",
        "| graph | ms |", "|---|---|",
        *[f"| {k} | {v:.3f} |" for k, v in alone["ms"].items()],
        "",
        f"## all-MiniLM-L6-v2, batch {'x'.join(map(str, model['batch']))} tokens",
        "",
        "| model | transformers | ms | vs fp32 (ort default) |", "|---|---|---|---|",
    ]
    for key, ms in model["ms"].items():
        label, fusion = key.split(" | ")
        lines.append(f"| {label} | {fusion} | {ms:.1f} | {model['vs_fp32_default'][key]:.3f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
