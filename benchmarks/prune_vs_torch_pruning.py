"""Structured pruning at ratio 0.5: slimgraph `prune-channels` on the ONNX graph vs torch-pruning.

Models: the built-in `resnet-tiny` and a ResNet-18-style CIFAR net (widths 64-512, seeded random
weights, BN statistics from synthetic images). The peer is torch-pruning (DepGraph, L2 group
importance, ``pruning_ratio=0.5``, the classifier ignored) pruning the torch module, which is then
exported the same way; slimgraph prunes the export of the unpruned module with
``prune-channels:ratio=0.5,protect=fc`` (the same layer left alone). Both go through
``fold-constants``. Reported: exact MACs (slimgraph's counter on each graph), onnxruntime CPU
latency (2 intra-op threads, spinning off, medians of interleaved rounds whose order rotates),
and agreement with the unpruned model on synthetic images. slimgraph's default protection (first
conv kept too) is reported as a third variant.

    .venv/bin/pip install torch-pruning   # benchmark-only dependency
    python benchmarks/prune_vs_torch_pruning.py   # -> benchmarks/results/prune_vs_torch_pruning.*
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
import torch_pruning as tp
from torch import nn

import slimgraph
from slimgraph.export import package_versions
from slimgraph.frontend.builtin import get_builtin, resnet_tiny
from slimgraph.model_stats import summarize
from slimgraph.passes import Pipeline

RESULTS = Path(__file__).parent / "results"
NAME = "prune_vs_torch_pruning"
THREADS = 2
BATCHES = (1, 16)
RATIO = 0.5
EVAL_IMAGES = 256


class ResNet18Cifar(nn.Module):
    """ResNet-18 for 3x32x32: 3x3 stem, four stages of two basic blocks (64-512), pool, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU())
        blocks, in_ch = [], 64
        for i, width in enumerate((64, 128, 256, 512)):
            for j in range(2):
                blocks.append(resnet_tiny.BasicBlock(in_ch, width, 2 if i > 0 and j == 0 else 1))
                in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(image))).flatten(1))


def make_resnet18() -> nn.Module:
    """Seeded weights; BN affine random and running statistics from 256 synthetic images."""
    torch.manual_seed(0)
    module = ResNet18Cifar()
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.1)
            bn.momentum = None
        module.train()
        for batch in torch.from_numpy(resnet_tiny.synthetic_images(256, 0)).split(64):
            module(batch)
    return module.eval()


def torch_pruning_peer(module: nn.Module) -> tuple[nn.Module, float]:
    """torch-pruning's DepGraph pruner, L2 group importance, classifier ignored."""
    pruned = copy.deepcopy(module)
    example = torch.randn(1, 3, 32, 32)
    start = time.perf_counter()
    pruner = tp.pruner.BasePruner(
        pruned, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=RATIO, ignored_layers=[pruned.fc],
    )
    pruner.step()
    return pruned.eval(), time.perf_counter() - start


def _export(module: nn.Module) -> ir.Model:
    loaded = slimgraph.load(module, inputs={"image": (2, 3, 32, 32)})
    model, _ = Pipeline.parse("fold-constants").run(loaded.model)
    return model


def _session(model: ir.Model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def _latencies(sessions: dict[str, ort.InferenceSession], feed: dict[str, np.ndarray],
               rounds: int, budget_s: float) -> dict[str, float]:
    """Median seconds per run of each session over interleaved rounds (order rotates per round)."""
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feed)
    first = next(iter(sessions.values()))
    start = time.perf_counter()
    first.run(None, feed)
    per_round = max(1, int(budget_s / max(time.perf_counter() - start, 1e-6)))
    names = list(sessions)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            runs = []
            for _ in range(per_round):
                t = time.perf_counter()
                sessions[name].run(None, feed)
                runs.append(time.perf_counter() - t)
            times[name].append(statistics.median(runs))
    return {k: statistics.median(v) for k, v in times.items()}


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
        medians = _latencies(sessions, {"image": images[:batch]}, rounds, 0.15)
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
        "# Structured pruning at ratio 0.5: slimgraph prune-channels vs torch-pruning",
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
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
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
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{NAME}.md").write_text(_markdown(results))
    print(_markdown(results))


if __name__ == "__main__":
    main()
