"""int4 weight-only on CPU: blocked DequantizeLinear (`quantize:int4`) vs MatMulNBits (`format=nbits`).

onnxruntime's contrib op ``com.microsoft.MatMulNBits`` takes 4-bit weights packed two per byte,
column-major in blocks along K, with one float scale per block. Both forms hold the same int4
values and scales; this script times them against fp32 on `minilm` (batch 1 and 16 x 64
tokens) and `mlp` (batch 1 and 256): onnxruntime CPU, 2 threads, spinning off, medians of
interleaved rounds. ``accuracy_level`` 0 computes in fp32, 4 quantizes activations to int8 per
block. The optimised blocked-DQ graph is inspected for the ops onnxruntime turned it into.

    python benchmarks/quantize_int4_nbits.py     # -> benchmarks/results/quantize_int4_nbits.{json,md}
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

import slimgraph
from slimgraph.artifact import package_versions
from slimgraph.backends.ort import session_for
from slimgraph.calibration import Calibration
from slimgraph.frontend.builtin import get_builtin
from slimgraph.passes import Pipeline
from slimgraph.timing import interleaved

RESULTS = Path(__file__).parent / "results"
SESSION = {"intra_op_num_threads": 2, "allow_spinning": False}
BLOCK = 32
CASES = {"minilm": (1, 16), "mlp": (1, 256)}


def with_accuracy_level(model: ir.Model, level: int) -> ir.Model:
    """A copy whose MatMulNBits nodes compute at ``accuracy_level`` (4: int8 activations)."""
    model = model.clone()
    for node in model.graph:
        if node.op_type == "MatMulNBits":
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", level)
    return model


def _optimised_ops(model: bytes, tmp: Path) -> dict[str, int]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp / "optimised.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp / "optimised.onnx")).graph.node)
    return {k: ops[k] for k in ("MatMulNBits", "DequantizeLinear", "MatMul") if ops[k]}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def bench(name: str, batches: tuple[int, ...], rounds: int, tmp: Path) -> dict:
    builtin = get_builtin(name)
    loaded = slimgraph.load(name, calibration=Calibration(builtin.calibration(16)))
    fp32, _ = Pipeline.parse("fold-constants").run(loaded.model)
    int4, _ = Pipeline.parse(f"quantize:int4,block={BLOCK}").run(fp32.clone())
    nbits, _ = Pipeline.parse(f"quantize:int4,block={BLOCK},format=nbits").run(fp32.clone())
    models = {
        "fp32": fp32,
        "int4 blocked DequantizeLinear": int4,
        "MatMulNBits accuracy_level=0 (format=nbits)": nbits,
        "MatMulNBits accuracy_level=4": with_accuracy_level(nbits, 4),
    }
    protos = {k: ir.to_proto(m).SerializeToString() for k, m in models.items()}
    sessions = {k: session_for(p, SESSION) for k, p in protos.items()}
    evaluation = builtin.evaluation().feeds
    inputs = {k: np.concatenate([f[k] for f in evaluation]) for k in evaluation[0]}
    while len(next(iter(inputs.values()))) < max(batches):
        inputs = {k: np.concatenate([v, v]) for k, v in inputs.items()}
    reference = sessions["fp32"].run(None, inputs)[0]
    rows: dict[str, dict] = {k: {"file_bytes": len(p),
                                 "cosine": round(_cosine(reference, sessions[k].run(None, inputs)[0]), 5)}
                             for k, p in protos.items()}
    rows["int4 blocked DequantizeLinear"]["optimised_ops"] = _optimised_ops(
        protos["int4 blocked DequantizeLinear"], tmp)
    for batch in batches:
        feed = {k: v[:batch] for k, v in inputs.items()}
        calls = {k: (lambda s=s, f=feed: s.run(None, f)) for k, s in sessions.items()}
        latency = interleaved(calls, warmup=3, repeat=rounds)
        for k, lat in latency.items():
            rows[k][f"batch {batch} ms"] = round(lat.p50_ms, 3)
            rows[k][f"batch {batch} vs fp32"] = round(lat.p50_ms / latency["fp32"].p50_ms, 3)
    return {"model": name, "batches": list(batches), "variants": rows}


def _markdown(results: dict) -> str:
    lines = ["# int4 weight-only: blocked DequantizeLinear vs MatMulNBits (onnxruntime CPU)", "",
             f"onnxruntime {results['versions']['onnxruntime']}, 2 threads, spinning off, block "
             f"{BLOCK}, {results['rounds']} interleaved rounds, medians. Cosine of the outputs to fp32 "
             "on the held-out inputs.", ""]
    for r in results["models"]:
        b = r["batches"]
        lines += [f"## {r['model']}", "",
                  f"| variant | batch {b[0]} ms | vs fp32 | batch {b[1]} ms | vs fp32 | cosine "
                  "| file bytes |",
                  "|---|---|---|---|---|---|---|"]
        for k, row in r["variants"].items():
            lines.append(f"| {k} | {row[f'batch {b[0]} ms']:.3f} | {row[f'batch {b[0]} vs fp32']:.2f}x | "
                         f"{row[f'batch {b[1]} ms']:.3f} | {row[f'batch {b[1]} vs fp32']:.2f}x | "
                         f"{row['cosine']:.5f} | {row['file_bytes']} |")
        ops = r["variants"]["int4 blocked DequantizeLinear"]["optimised_ops"]
        lines += ["", f"onnxruntime's optimised blocked-DQ graph: {ops}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = {"versions": package_versions(), "rounds": args.rounds, "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, batches in CASES.items():
            results["models"].append(bench(name, batches, args.rounds, Path(tmp)))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantize_int4_nbits.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "quantize_int4_nbits.md").write_text(_markdown(results))
    print(_markdown(results))


if __name__ == "__main__":
    main()
