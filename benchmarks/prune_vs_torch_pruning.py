"""Structured pruning: slimgraph `prune-channels` on the ONNX graph vs torch-pruning.

Models: the built-in `resnet-tiny` and a ResNet-18-style CIFAR net (widths 64-512, seeded random
weights, BN statistics from synthetic images). The peer is torch-pruning (DepGraph, L2 group
importance, ``pruning_ratio=0.5``, the classifier ignored) pruning the torch module, which is then
exported the same way; slimgraph prunes the export of the unpruned module with
``prune-channels:ratio=0.5,protect=fc`` (the same layer left alone). Both go through
``fold-constants``. Reported: exact MACs (slimgraph's counter on each graph), onnxruntime CPU
latency (2 intra-op threads, spinning off, medians of interleaved rounds whose order rotates),
and agreement with the unpruned model on synthetic images. slimgraph's default protection (first
conv kept too) is reported as a third variant.

Accuracy cost: the trained built-in `digits-cnn` pruned at ratios 0.25 / 0.5 / 0.75 by both tools
with the same criterion (L2 group importance, the classifier left alone), top-1 accuracy on the
held-out test split before any recovery training. torch-pruning scores the Conv and its BatchNorm
module; slimgraph scores the exported graph, where the BatchNorm is already folded into the Conv.

    .venv/bin/pip install torch-pruning   # benchmark-only dependency
    python benchmarks/prune_vs_torch_pruning.py   # -> benchmarks/results/prune_vs_torch_pruning.*
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
import torch_pruning as tp
from torch import nn

import slimgraph
from slimgraph.artifact import package_versions
from slimgraph.backends.ort import session_for
from slimgraph.frontend.builtin import get_builtin, resnet_tiny
from slimgraph.model_stats import summarize
from slimgraph.passes import Pipeline
from slimgraph.timing import interleaved

RESULTS = Path(__file__).parent / "results"
NAME = "prune_vs_torch_pruning"
THREADS = 2
BATCHES = (1, 16)
RATIO = 0.5
ACCURACY_RATIOS = (0.25, 0.5, 0.75)
EVAL_IMAGES = 256
CALL_SECONDS = 0.02  # one timed call repeats a fast model's run to last about this long


def make_resnet18() -> nn.Module:
    """The built-in `resnet18` module (ResNet-18 layout for 32x32 inputs, seeded weights)."""
    return resnet_tiny.make_resnet_tiny(resnet_tiny.RESNET18_WIDTHS)


def torch_pruning_peer(module: nn.Module, classifier: str = "fc", ratio: float = RATIO,
                       shape: tuple[int, ...] = (1, 3, 32, 32)) -> tuple[nn.Module, float]:
    """torch-pruning's DepGraph pruner, L2 group importance, the classifier ignored."""
    pruned = copy.deepcopy(module)
    start = time.perf_counter()
    pruner = tp.pruner.BasePruner(
        pruned, torch.randn(*shape), importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=[pruned.get_submodule(classifier)],
    )
    pruner.step()
    return pruned.eval(), time.perf_counter() - start


def _export(module: nn.Module, shape: tuple[int, ...] = (2, 3, 32, 32)) -> ir.Model:
    loaded = slimgraph.load(module, inputs={"image": shape})
    model, _ = Pipeline.parse("fold-constants").run(loaded.model)
    return model


def _session(model: ir.Model) -> ort.InferenceSession:
    return session_for(ir.to_proto(model).SerializeToString(),
                       {"intra_op_num_threads": THREADS, "allow_spinning": False})


def _latencies(sessions: dict[str, ort.InferenceSession], feed: dict[str, np.ndarray],
               rounds: int) -> dict[str, float]:
    """Median seconds per run of each session over interleaved rounds (order rotates per round).

    Each timed call repeats a run so that the fastest variant's call lasts about CALL_SECONDS.
    """
    first = next(iter(sessions.values()))
    first.run(None, feed)
    start = time.perf_counter()
    first.run(None, feed)
    reps = max(1, int(CALL_SECONDS / max(time.perf_counter() - start, 1e-6)))

    def call(session: ort.InferenceSession) -> None:
        for _ in range(reps):
            session.run(None, feed)

    calls = {k: (lambda s=s: call(s)) for k, s in sessions.items()}
    return {k: v.p50_ms / 1e3 / reps
            for k, v in interleaved(calls, warmup=2, repeat=rounds).items()}


def digits_accuracy() -> dict:
    """Top-1 on the held-out digits split after pruning at each ratio, by both tools."""
    from slimgraph.frontend.builtin import get_builtin

    builtin = get_builtin("digits-cnn")
    evaluation = builtin.evaluation()
    labels = np.concatenate(evaluation.labels)
    shape = (2, *evaluation.feeds[0]["image"].shape[1:])

    def accuracy(model: ir.Model) -> float:
        session = _session(model)
        logits = np.concatenate([session.run(None, f)[0] for f in evaluation.feeds])
        return round(float(np.mean(logits.argmax(1) == labels)), 4)

    original = _export(builtin.module, shape)
    rows = {"original": {"slimgraph": accuracy(original), "torch-pruning": accuracy(original)}}
    macs = {"original": summarize(original.clone(), batch=1).total_macs}
    for ratio in ACCURACY_RATIOS:
        peer, _ = torch_pruning_peer(builtin.module, "classifier.3", ratio, (1, *shape[1:]))
        peer_model = _export(peer, shape)
        ours, _ = Pipeline.parse(f"prune-channels:ratio={ratio},protect=classifier.3").run(
            original.clone())
        rows[ratio] = {"slimgraph": accuracy(ours), "torch-pruning": accuracy(peer_model),
                       "macs_slimgraph": summarize(ours.clone(), batch=1).total_macs,
                       "macs_torch_pruning": summarize(peer_model.clone(), batch=1).total_macs}
    return {"test_images": int(len(labels)), "macs_original": macs["original"], "rows": rows}


def bench_model(label: str, module: nn.Module, rounds: int) -> dict:
    original = _export(module)
    variants: dict[str, ir.Model] = {"original": original}
    seconds: dict[str, float] = {}
    peer, seconds["torch-pruning"] = torch_pruning_peer(module)
    variants["torch-pruning"] = _export(peer)
    reports = {}
    for name, spec in (("slimgraph", f"prune-channels:ratio={RATIO},protect=fc"),
                       ("slimgraph default protect", f"prune-channels:ratio={RATIO}")):
        start = time.perf_counter()
        model, (report,) = Pipeline.parse(spec).run(original.clone())
        seconds[name] = time.perf_counter() - start
        variants[name] = model
        reports[name] = {"spec": spec, "counts": report.counts, "notes": report.notes}
    macs = {k: summarize(v.clone(), batch=1).total_macs for k, v in variants.items()}
    params = {k: summarize(v.clone(), batch=1).params for k, v in variants.items()}
    sessions = {k: _session(v) for k, v in variants.items()}

    images = resnet_tiny.synthetic_images(EVAL_IMAGES, resnet_tiny.EVALUATION_SEED)
    logits = {k: s.run(None, {"image": images})[0] for k, s in sessions.items()}
    agreement = {}
    for k, out in logits.items():
        ref = logits["original"]
        cosine = float((out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref))
        top1 = float(np.mean(out.argmax(1) == ref.argmax(1)))
        agreement[k] = {"cosine_vs_original": round(cosine, 4), "top1_vs_original": top1}
    same = float(np.abs(logits["slimgraph"] - logits["torch-pruning"]).max())

    latency = {}
    for batch in BATCHES:
        medians = _latencies(sessions, {"image": images[:batch]}, rounds)
        latency[batch] = {
            k: {"ms": round(v * 1e3, 4), "vs_original": round(v / medians["original"], 3),
                "vs_torch_pruning": round(v / medians["torch-pruning"], 3)}
            for k, v in medians.items()
        }
    return {
        "model": label,
        "macs": macs,
        "macs_vs_original": {k: round(v / macs["original"], 4) for k, v in macs.items()},
        "macs_vs_torch_pruning": {k: round(v / macs["torch-pruning"], 4) for k, v in macs.items()},
        "params": params,
        "prune_seconds": {k: round(v, 3) for k, v in seconds.items()},
        "max_abs_diff_slimgraph_vs_torch_pruning": same,
        "agreement": agreement,
        "latency": latency,
        "reports": reports,
    }


def _markdown(results: dict) -> str:
    lines = [
        "# Structured pruning: slimgraph prune-channels vs torch-pruning",
        "",
        f"onnxruntime {results['versions']['onnxruntime']}, torch-pruning "
        f"{results['torch_pruning']}, {results['cpu']} ({results['cpus']} CPUs, shared machine), "
        f"{THREADS} intra-op threads, spinning off, {results['rounds']} interleaved rounds, "
        "medians. MACs are exact counts at batch 1. Agreement: logits of each variant vs the "
        f"unpruned model on {EVAL_IMAGES} synthetic images (random weights, so no accuracy).",
        "",
    ]
    for r in results["models"]:
        lines += [f"## {r['model']}", "",
                  "| variant | MACs | vs original | vs torch-pruning | params | batch 1 ms "
                  "| vs torch-pruning | batch 16 ms | vs torch-pruning | top-1 vs original |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for k in r["macs"]:
            l1, l16 = r["latency"][1][k], r["latency"][16][k]
            lines.append(
                f"| {k} | {r['macs'][k]:,} | {r['macs_vs_original'][k]:.3f}x | "
                f"{r['macs_vs_torch_pruning'][k]:.3f}x | {r['params'][k]:,} | {l1['ms']:.3f} | "
                f"{l1['vs_torch_pruning']:.2f}x | {l16['ms']:.3f} | {l16['vs_torch_pruning']:.2f}x | "
                f"{r['agreement'][k]['top1_vs_original']:.3f} |")
        lines += ["", f"max |logits(slimgraph) - logits(torch-pruning)| = "
                      f"{r['max_abs_diff_slimgraph_vs_torch_pruning']:.3g}; prune seconds: "
                      f"{r['prune_seconds']}", ""]
    acc = results["digits_accuracy"]
    lines += [
        "## Accuracy cost on digits-cnn (before recovery training)",
        "",
        f"Trained `digits-cnn`, top-1 on the {acc['test_images']} held-out test images; both "
        "tools prune with L2 group importance and leave the classifier alone. torch-pruning "
        "scores Conv + BatchNorm modules, slimgraph the exported graph (BatchNorm folded).",
        "",
        "| ratio | slimgraph top-1 | torch-pruning top-1 | slimgraph MACs | torch-pruning MACs |",
        "|---|---|---|---|---|",
    ]
    for ratio, row in acc["rows"].items():
        ours = row.get("macs_slimgraph", acc["macs_original"])
        peer = row.get("macs_torch_pruning", acc["macs_original"])
        lines.append(f"| {ratio} | {row['slimgraph']:.3f} | {row['torch-pruning']:.3f} | "
                     f"{ours:,} | {peer:,} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    models = [("resnet-tiny", get_builtin("resnet-tiny").module),
              ("resnet18-cifar", make_resnet18())]
    results = {
        "benchmark": NAME,
        "ratio": RATIO,
        "rounds": args.rounds,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_pruning": tp.__version__,
        "versions": package_versions(),
        "models": [bench_model(label, module, args.rounds) for label, module in models],
        "digits_accuracy": digits_accuracy(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{NAME}.md").write_text(_markdown(results))
    print(_markdown(results))


if __name__ == "__main__":
    main()
