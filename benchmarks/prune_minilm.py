"""MiniLM with half the FFN neurons and half the attention heads pruned: onnxruntime CPU latency.

The built-in `minilm` (all-MiniLM-L6-v2, 6 layers, 12 heads of 32, FFN 1536, 64 tokens) is
exported, folded, and pruned on its ONNX graph by ``prune-channels:ratio=0.5`` (ratio covers FFN
neurons and heads alike); two one-sided variants show where the time goes: ``ratio=0.5,heads=0``
(FFN only) and ``heads=0.5`` (heads only). Reported: exact MACs, parameters, onnxruntime CPU
latency (2 intra-op threads, spinning off, medians of interleaved rounds whose order rotates) at
batch 1 and 8, and the cosine of each variant's sentence embeddings to the unpruned model's on the
held-out sentences, before any recovery training.

    python benchmarks/prune_minilm.py   # -> benchmarks/results/prune_minilm.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

import slimgraph
from slimgraph.artifact import package_versions
from slimgraph.backends.ort import session_for
from slimgraph.model_stats import summarize
from slimgraph.passes import Pipeline
from slimgraph.timing import interleaved

RESULTS = Path(__file__).parent / "results"
NAME = "prune_minilm"
THREADS = 2
BATCHES = (1, 8)
SESSION = {"intra_op_num_threads": THREADS, "allow_spinning": False}
VARIANTS = {
    "half FFN + half heads": "prune-channels:ratio=0.5",
    "half FFN only": "prune-channels:ratio=0.5,heads=0",
    "half heads only": "prune-channels:heads=0.5",
}


def _cosines(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)


def run(rounds: int) -> dict:
    loaded = slimgraph.load("minilm")
    original, _ = Pipeline.parse("fold-constants").run(loaded.model)
    variants: dict[str, ir.Model] = {"original": original}
    reports, prune_seconds = {}, {}
    for name, spec in VARIANTS.items():
        start = time.perf_counter()
        model, (report,) = Pipeline.parse(spec).run(original.clone())
        prune_seconds[name] = round(time.perf_counter() - start, 3)
        onnx.checker.check_model(ir.to_proto(model), full_check=True)
        variants[name] = model
        reports[name] = {"spec": spec, "counts": report.counts}
    stats = {k: summarize(v.clone(), batch=1) for k, v in variants.items()}
    sessions = {k: session_for(ir.to_proto(v).SerializeToString(), SESSION)
                for k, v in variants.items()}

    feeds = loaded.evaluation.feeds
    embeddings = {k: np.concatenate([s.run(None, f)[0] for f in feeds]) for k, s in sessions.items()}
    quality = {}
    for k, emb in embeddings.items():
        cos = _cosines(emb, embeddings["original"])
        quality[k] = {"mean_cosine": round(float(cos.mean()), 4),
                      "min_cosine": round(float(cos.min()), 4)}

    latency = {}
    for batch in BATCHES:
        feed = {k: v[:batch] for k, v in feeds[0].items()}
        calls = {k: (lambda s=s, feed=feed: s.run(None, feed)) for k, s in sessions.items()}
        medians = {k: v.p50_ms for k, v in interleaved(calls, warmup=3, repeat=rounds).items()}
        latency[batch] = {k: {"ms": round(v, 3), "vs_original": round(v / medians["original"], 3)}
                          for k, v in medians.items()}
    macs = {k: s.total_macs for k, s in stats.items()}
    return {
        "benchmark": NAME,
        "rounds": rounds,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "versions": package_versions(),
        "sentences": sum(len(next(iter(f.values()))) for f in feeds),
        "macs": macs,
        "macs_vs_original": {k: round(v / macs["original"], 4) for k, v in macs.items()},
        "params": {k: s.params for k, s in stats.items()},
        "latency": latency,
        "embedding_vs_original": quality,
        "prune_seconds": prune_seconds,
        "reports": reports,
    }


def _markdown(r: dict) -> str:
    lines = [
        "# MiniLM: half the FFN neurons and half the attention heads pruned",
        "",
        f"`minilm` (all-MiniLM-L6-v2, 64 tokens), onnxruntime {r['versions']['onnxruntime']} CPU, "
        f"{r['cpu']} ({r['cpus']} CPUs, shared machine), {THREADS} intra-op threads, spinning off, "
        f"{r['rounds']} interleaved rounds, medians from one run. MACs are exact counts at batch "
        f"1. Cosine: sentence embeddings of each variant vs the unpruned model on the "
        f"{r['sentences']} held-out sentences, before any recovery training.",
        "",
        "| variant | spec | MACs vs original | params | batch 1 ms | vs original "
        "| batch 8 ms | vs original | mean cosine | min cosine |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in r["macs"]:
        spec = r["reports"][k]["spec"] if k in r["reports"] else "-"
        l1, l8 = r["latency"][1][k], r["latency"][8][k]
        q = r["embedding_vs_original"][k]
        lines.append(
            f"| {k} | `{spec}` | {r['macs_vs_original'][k]:.3f}x | {r['params'][k]:,} | "
            f"{l1['ms']:.2f} | {l1['vs_original']:.2f}x | {l8['ms']:.2f} | "
            f"{l8['vs_original']:.2f}x | {q['mean_cosine']:.3f} | {q['min_cosine']:.3f} |")
    lines += ["", "Parameters include the 30,522 x 384 word embedding table, which pruning "
              "does not touch. Heads: each layer keeps 6 of 12 (Q/K/V 384 -> 192 columns, output "
              f"projection 384 -> 192 rows); prune seconds: {r['prune_seconds']}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = run(args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{NAME}.md").write_text(_markdown(results))
    print(_markdown(results))


if __name__ == "__main__":
    main()
