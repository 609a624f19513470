"""The `slimgraph bench` suite: one run per built-in model, results under benchmarks/results/bench/.

Run: .venv/bin/python benchmarks/bench_models.py [MODEL ...]
Each model gets its own directory with results.json, results.md, pareto.png and size.png, and
benchmarks/results/bench/README.md collects the headline rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from slimgraph.bench import bench

RESULTS = Path(__file__).parent / "results" / "bench"

# Per model: what is worth comparing. Variants are bench variant specs (recipes or pass specs).
SUITE: dict[str, dict] = {
    "digits-cnn": {"backends": ["ort-cpu", "tvm-llvm"], "batches": [1, 16],
                   "variants": ["fp32", "int8", "fold-constants,prune-channels:ratio=0.25"]},
    "resnet-tiny": {"backends": ["ort-cpu", "tvm-llvm"], "batches": [1, 16],
                    "variants": ["fp32", "int8", "fold-constants,prune-channels:ratio=0.5"]},
    "resnet18": {"backends": ["ort-cpu"], "batches": [1, 16], "repeat": 20,
                 "peers": ["torch-eager", "ort-quantizers"],
                 "variants": ["fp32", "int8", "fold-constants,prune-channels:ratio=0.5"]},
    "mlp": {"backends": ["ort-cpu", "tvm-llvm"], "batches": [1, 16],
            "variants": ["fp32", "int8", "int8-dynamic",
                         "fold-constants,quantize:int4", "fold-constants,quantize:binary"]},
    "lstm": {"backends": ["ort-cpu"], "batches": [1, 16],
             "variants": ["fp32", "int8-dynamic"]},
    "minilm": {"backends": ["ort-cpu"], "batches": [1, 16], "repeat": 20,
               "peers": ["torch-eager", "ort-quantizers"],
               "variants": ["fp32", "int8-dynamic", "int8",
                            "fold-constants,prune-channels:ratio=0.5"]},
}


def run(name: str) -> dict:
    cfg = dict(SUITE[name])
    result = bench(name, RESULTS / name, backends=cfg.pop("backends"), variants=cfg.pop("variants"),
                   batches=cfg.pop("batches"), repeat=cfg.pop("repeat", 40), warmup=5, threads=2,
                   peers=cfg.pop("peers", ["torch-eager", "torch-compile", "ort-quantizers"]),
                   force=True)
    return result.to_json()


def headline(all_results: dict[str, dict]) -> str:
    lines = ["# slimgraph bench suite: headline rows", "",
             "Produced by `python benchmarks/bench_models.py`; each model's full table, plots and "
             "machine facts are in its folder. Latency ratios are to fp32 on the same backend, "
             "same batch, same run (interleaved rounds, medians).", "",
             "| model | batch | variant | backend | p50 ms | vs fp32 | cosine | task acc. | flags |",
             "|---|---:|---|---|---:|---:|---:|---:|---|"]
    for name, data in all_results.items():
        for r in data["rows"]:
            if r["status"] != "ok":
                continue
            lat = r["latency"]["p50_ms"]
            ratio = "-" if r["ratio_to_fp32"] is None else f"{r['ratio_to_fp32']:.2f}x"
            acc = "-" if r["task_accuracy"] is None else f"{r['task_accuracy']:.4f}"
            cos = "-" if r["cosine"] is None else f"{r['cosine']:.5f}"
            variant = r["variant"] + (" (peer)" if r["peer"] else "")
            lines.append(f"| {name} | {r['batch']} | {variant} | {r['backend']} | {lat:.3f} | "
                         f"{ratio} | {cos} | {acc} | {'; '.join(r['flags'])} |")
    return "\n".join(lines) + "\n"


def main(names: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in names or list(SUITE):
        print(f"== {name}", flush=True)
        run(name)
    collected = {n: json.loads((RESULTS / n / "results.json").read_text())
                 for n in SUITE if (RESULTS / n / "results.json").exists()}
    (RESULTS / "README.md").write_text(headline(collected))


if __name__ == "__main__":
    main(sys.argv[1:])
