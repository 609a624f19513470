"""advise: roofline bounds against onnxruntime on this CPU for every built-in, and the ranking for
MiniLM at batch 16 under a 20 ms SLO.

For each built-in at batch 1 and 16: the fp32 bound on this CPU (detected family, boost clock,
measured memory bandwidth), the measured p50 latency (default graph optimisations, all cores), the
efficiency (bound / measured), and per node the profiler's time (graph optimisations off) against
the node's bound: how many nodes ran faster than their bound (each would say the bound is wrong).
GPU rows: measured on a lent GPU only; the results say when none was lent.

    python benchmarks/advise.py     # -> benchmarks/results/advise.{json,md}, advise_minilm_b16.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from slimgraph.advise import advise, plot_roofline
from slimgraph.artifact import package_versions
from slimgraph.frontend.builtin import builtin_names

RESULTS = Path(__file__).parent / "results"
NAME = "advise"


def _gpu() -> str | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() \
        else None


def model_row(name: str, batch: int, repeat: int) -> dict:
    result = advise(name, batch=batch, precisions=["fp32"], repeat=repeat)
    here = next(c for c in result.ranked if c.device.here)
    worst = sorted((r for r in result.host_layers if r["efficiency"] is not None),
                   key=lambda r: -r["efficiency"])[:3]
    return {"model": name, "batch": batch, "bound_ms": here.bound_ms,
            "measured_ms": here.measured_ms, "efficiency": here.efficiency,
            "nodes": len(result.host_layers),
            "nodes_below_bound": len(result.below_bound),
            "closest_nodes": worst, "device": here.device.source,
            "memory_gbps": here.device.memory_gbps, "peak_tops": here.device.tops}


def _markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# advise: roofline bounds against onnxruntime, and a ranking", "",
        f"Machine: {m['cpu']}, {m['cores']} cores; onnxruntime "
        f"{results['versions'].get('onnxruntime')}. Host as detected: {results['host']}. "
        f"GPU: {results['gpu'] or 'none lent to this run (no ort-cuda rows measured)'}. "
        "Reproduce: `python benchmarks/advise.py`.", "",
        "## Every built-in on this CPU, fp32", "",
        "| model | batch | bound ms | measured ms | efficiency | nodes | nodes faster than "
        "their bound |", "|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['bound_ms']:.4f} | "
                     f"{r['measured_ms']:.4f} | {r['efficiency']:.3f} | {r['nodes']} | "
                     f"{r['nodes_below_bound']} |")
    below = sum(r["nodes_below_bound"] for r in results["models"])
    under = [r for r in results["models"] if r["measured_ms"] < r["bound_ms"]]
    lines += ["", f"Models measured below their bound: {len(under)}; nodes below theirs: {below}.",
              "", "## MiniLM, batch 16, SLO 20 ms", "",
              "| # | device | precision | backend | predicted ms | per s | $ / M inferences | "
              "SLO | basis |", "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(results["ranking"]["ranking"], 1):
        cost = "-" if r["cost_per_million"] is None else f"{r['cost_per_million']:.4f}"
        lines.append(f"| {i} | {r['device']} | {r['precision']} | {r['backend']} | "
                     f"{r['predicted_ms']:.3f} | {r['throughput_per_s']:.0f} | {cost} | "
                     f"{'yes' if r['meets_slo'] else 'no'} | {r['basis']} |")
    lines += ["", "![roofline](advise_minilm_b16.png)", "", "Sources of every figure in the ranking "
              "(`checked`: re-read from a retrieved copy when the catalogue was written):", ""]
    seen = set()
    for r in results["ranking"]["ranking"]:
        if r["device"] in seen:
            continue
        seen.add(r["device"])
        lines.append(f"- {r['device']} (checked: {r['checked']}): {r['source']}"
                     + (f"; price: {r['price_source']}" if r["price_source"] else ""))
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(builtin_names()))
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = {"versions": package_versions(),
               "machine": {"cpu": platform.processor() or platform.machine(),
                           "cores": os.cpu_count()},
               "gpu": _gpu(), "models": []}
    for name in args.models.split(","):
        for batch in (1, 16):
            row = model_row(name, batch, args.repeat)
            results["models"].append(row)
            results["host"] = row["device"]
            print(json.dumps({k: v for k, v in row.items() if k != "device"}), flush=True)
    ranking = advise("minilm", batch=16, slo_ms=20.0, repeat=args.repeat)
    results["ranking"] = ranking.to_json()
    results["ranking"].pop("layers")
    results["ranking"].pop("host_layers")
    args.out.mkdir(parents=True, exist_ok=True)
    plot_roofline(ranking, args.out / "advise_minilm_b16.png")
    (args.out / f"{NAME}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{NAME}.md").write_text(_markdown(results))
    print(_markdown(results))


if __name__ == "__main__":
    main()
