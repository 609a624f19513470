"""Accuracy and weight bytes of `quantize` on the digits models (labelled test split).

`digits-cnn` and `mlp` after `fold-constants`: fp32, static int8 with each calibrator, dynamic
int8, int4 and binary weights. Calibration: the first 256 training images, one per feed (the pass
holds the last quarter out for its guards). Accuracy: top-1 on the held-out test split against the
true labels, and agreement with fp32. Weight bytes as the pass reports them (initializers).

    python benchmarks/quantize_digits.py     # -> benchmarks/results/quantize_digits.{json,md}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir

import slimgraph
from slimgraph.artifact import package_versions
from slimgraph.backends.ort import session_for
from slimgraph.calibration import Calibration
from slimgraph.frontend.builtin import get_builtin
from slimgraph.passes import Pipeline
from slimgraph.passes.quantize import quantizable_layers, weight_axis
from slimgraph.passes.quantize.insert_qdq import _dtypes
from slimgraph.passes.quantize.layers import layer_ids

RESULTS = Path(__file__).parent / "results"
CALIBRATION_SAMPLES = 256
VARIANTS = {
    "int8 static (mse, the default)": "quantize:int8,speed_check=false",
    "int8 static (percentile)": "quantize:int8,calib=percentile,speed_check=false",
    "int8 static (minmax)": "quantize:int8,calib=minmax,speed_check=false",
    "int8 static (entropy)": "quantize:int8,calib=entropy,speed_check=false",
    "int8 dynamic": "quantize:int8,dynamic=true,speed_check=false",
    "int4 block 32": "quantize:int4,block=32",
    "binary": "quantize:binary",
}


def _logits(model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = session_for(ir.to_proto(model).SerializeToString(), {"allow_spinning": False})
    return np.concatenate([session.run(None, f)[0] for f in feeds])


def bench(name: str) -> dict:
    builtin = get_builtin(name)
    calibration = Calibration(builtin.calibration(CALIBRATION_SAMPLES))
    evaluation = builtin.evaluation()
    labels = np.concatenate(evaluation.labels)
    loaded = slimgraph.load(name, calibration=calibration)
    fp32, _ = Pipeline.parse("fold-constants").run(loaded.model)
    reference = _logits(fp32, evaluation.feeds)
    rows = {"fp32": {"accuracy": float((reference.argmax(1) == labels).mean()), "agreement": 1.0}}
    for label, spec in VARIANTS.items():
        pipeline = Pipeline.parse(spec)
        pipeline.bind_calibration(calibration)
        model, (report,) = pipeline.run(fp32.clone())
        logits = _logits(model, evaluation.feeds)
        rows[label] = {
            "accuracy": float((logits.argmax(1) == labels).mean()),
            "agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
            "weight_bytes_before": report.weight_bytes_before,
            "weight_bytes_after": report.weight_bytes_after,
            "counts": report.counts,
        }
    for row in rows.values():
        row["delta_points"] = round(100 * (row["accuracy"] - rows["fp32"]["accuracy"]), 2)
    return {"model": name, "test_images": int(labels.size), "variants": rows,
            "binary_bounds": binary_bounds(fp32)}


def binary_bounds(fp32: ir.Model) -> dict:
    """How small binary weights can get at best, by arithmetic on the layer shapes.

    Every weight tensor becomes sign bits (1 bit per weight); each output channel keeps its alpha and
    its bias. Ratios are fp32 weight bytes (every float initializer) over the binary bytes.
    """
    float_bytes = sum(v.const_value.nbytes for v in fp32.graph.initializers.values()
                      if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT)
    layers = set(quantizable_layers(fp32, _dtypes(fp32)))
    ids = layer_ids(fp32.graph)
    nodes = [n for n in fp32.graph if ids[n] in layers]
    sign_bytes = sum(-(-n.inputs[1].const_value.size // 8) for n in nodes)
    channels = sum(n.inputs[1].const_value.shape[weight_axis(n)] for n in nodes)

    def ratio(extra_bytes_per_channel: float) -> float:
        return round(float_bytes / (sign_bytes + channels * extra_bytes_per_channel), 1)

    return {"fp32_weight_bytes": float_bytes, "sign_bytes": sign_bytes, "output_channels": channels,
            "sign_bits_alone": ratio(0), "alpha_and_bias_8_bit": ratio(2),
            "alpha_and_bias_16_bit": ratio(4)}


def _markdown(results: dict) -> str:
    lines = ["# quantize on the digits models: test accuracy and weight bytes", "",
             f"Test split with true labels; calibration on {CALIBRATION_SAMPLES} training images; "
             f"onnxruntime {results['versions']['onnxruntime']} CPU.", ""]
    for r in results["models"]:
        lines += [f"## {r['model']} ({r['test_images']} test images)", "",
                  "| variant | top-1 | vs fp32 (points) | agreement with fp32 | weight bytes | smaller |",
                  "|---|---|---|---|---|---|"]
        for label, row in r["variants"].items():
            before, after = row.get("weight_bytes_before"), row.get("weight_bytes_after")
            size = f"{after} | {before / after:.1f}x" if after else " | "
            lines.append(f"| {label} | {row['accuracy']:.4f} | {row['delta_points']:+.2f} | "
                         f"{row['agreement']:.4f} | {size} |")
        b = r["binary_bounds"]
        lines += ["", f"Binary, by arithmetic: {b['fp32_weight_bytes']} fp32 weight bytes; "
                  f"{b['sign_bytes']} bytes of sign bits alone ({b['sign_bits_alone']}x, the ceiling "
                  f"if alphas and biases were free); with {b['output_channels']} output channels each "
                  f"keeping an alpha and a bias: {b['alpha_and_bias_16_bit']}x at 16 bits each "
                  f"(what slimgraph stores), {b['alpha_and_bias_8_bit']}x even at 8 bits each. "
                  "Decode constants come on top.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = {"versions": package_versions(), "models": [bench("digits-cnn"), bench("mlp")]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantize_digits.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "quantize_digits.md").write_text(_markdown(results))
    print(_markdown(results))


if __name__ == "__main__":
    main()
