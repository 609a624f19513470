"""prune_layers: depth pruning of residual blocks and transformer layers, before and after heal.

Rows:

- ``minilm``: all-MiniLM-L6-v2 ``prune-layers:keep=3`` (3 of 6 layers, chosen by output
  importance on the calibration sentences) + heal by distillation: mean cosine to the float
  embeddings on held-out sentences before and after heal, onnxruntime latency against fp32 at
  batch 1 and 16 (interleaved, in one run).
- ``minilm-compound``: the healed 3-layer model, then ``prune-channels:ratio=0.25`` (heads and FFN),
  heal again, then ``quantize:int8,dynamic=true,smooth=0.75``: the latency and cosine reached,
  against the goal of <= 0.25x fp32 at cosine >= 0.97.
- ``resnet-tiny``, ``resnet18``, ``efficientnet-lite1``: the removable blocks found, half of them
  (a quarter for EfficientNet) removed by output importance, the outputs checked against the torch
  module with the same blocks replaced by ``nn.Identity`` (max abs difference), MACs and latency.
  ResNets have seeded random weights, so only the check and the speed mean anything there;
  EfficientNet-Lite1 has its ImageNet weights and reports top-1 agreement with the float model on
  held-out crops (no heal: the built-in has no training split).
- ``digits-cnn``, ``mlp``: no residual blocks; listed to say so.

MiniLM is the Hugging Face folder (dynamic sequence axis); it heals on general English and is
scored on held-out general English from other sources (the same data as benchmarks/heal.py).

    python benchmarks/prune_layers.py                 # -> benchmarks/results/prune_layers.{json,md}
    python benchmarks/prune_layers.py --rows resnet-tiny,digits-cnn --steps 20
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import heal as heal_bench  # benchmarks/heal.py: the MiniLM scorer and the interleaved latency
import numpy as np
import onnx_ir as ir
import torch

import slimgraph
from slimgraph.artifact import package_versions
from slimgraph.frontend.builtin import get_builtin
from slimgraph.model_stats import layer_macs
from slimgraph.passes import Pipeline
from slimgraph.passes.prune.layers import find_units, run_outputs

RESULTS = Path(__file__).parent / "results"
NAME = "prune_layers"
ROWS = ("minilm", "minilm-compound", "resnet-tiny", "resnet18", "efficientnet-lite1", "digits-cnn",
        "mlp")
LAYERS = "prune-layers:keep=3"
COMPOUND = "prune-channels:ratio=0.25"
INT8 = "quantize:int8,dynamic=true,smooth=0.75"


def _macs(model: ir.Model) -> int:
    return sum(layer.macs for layer in layer_macs(model))


def _run_pipeline(scorer: heal_bench.Scorer, spec: str, model: ir.Model):
    pipeline = Pipeline.parse(spec)
    pipeline.bind_calibration(scorer.loaded.calibration)
    pipeline.bind_training(scorer.data)
    start = time.perf_counter()
    model, reports = pipeline.run(model)
    return model, reports, round(time.perf_counter() - start, 1)


def _speed(scorer: heal_bench.Scorer, model: ir.Model, rounds: int) -> dict:
    held_out = scorer.data.held_out
    stacked = {k: np.concatenate([f[k] for f in held_out])[:16] for k in held_out[0]}
    out = {}
    for batch in (1, 16):
        feed = {k: v[:batch] for k, v in stacked.items()}
        lat = heal_bench._latency(scorer.float_model, model, feed, rounds)
        out[f"batch{batch}"] = {"fp32_ms": lat["before_ms"], "ms": lat["after_ms"],
                                "ratio": lat["ratio"]}
    return out


def minilm_rows(steps: int, rounds: int) -> dict[str, dict]:
    scorer = heal_bench.Scorer("minilm")
    heal = f"heal:steps={steps},lr=5e-4,hidden=1,eval_every={max(1, steps // 12)}"
    pruned, reports, prune_s = _run_pipeline(scorer, f"fold-constants,{LAYERS}",
                                             scorer.loaded.model.clone())
    healed, (heal_report,), heal_s = _run_pipeline(scorer, heal, pruned.clone())
    rows = {"minilm": {
        "passes": f"fold-constants,{LAYERS}", "heal": heal, "float": scorer.score(scorer.float_model),
        "before": scorer.score(pruned), "after": scorer.score(healed), "units": reports[-1].notes,
        "prune_seconds": prune_s, "heal_seconds": heal_s,
        "macs": {"fp32": _macs(scorer.float_model), "pruned": _macs(healed)},
        "latency": _speed(scorer, healed, rounds), "training": scorer.data.source,
        "curve": heal_report.curve,  # held-out cosine of the torch module by step and seconds
    }}
    print(json.dumps(rows["minilm"], indent=1), flush=True)
    heal2 = f"heal:steps={max(1, steps // 2)},lr=5e-4,hidden=1"
    channels, _, _ = _run_pipeline(scorer, COMPOUND, healed.clone())
    rehealed, _, heal2_s = _run_pipeline(scorer, heal2, channels.clone())
    final, _, _ = _run_pipeline(scorer, INT8, rehealed.clone())
    rows["minilm-compound"] = {
        "passes": f"fold-constants,{LAYERS},{heal},{COMPOUND},{heal2},{INT8}",
        "float": scorer.score(scorer.float_model),
        "stages": {"layers + heal": scorer.score(healed), "+ channels": scorer.score(channels),
                   "+ heal": scorer.score(rehealed), "+ int8": scorer.score(final)},
        # MACs of the float graph before int8: the int8 ops are the same products at int8.
        "heal_seconds": heal_s + heal2_s, "macs": {"fp32": _macs(scorer.float_model),
                                                  "final": _macs(rehealed)},
        "latency": _speed(scorer, final, rounds),
        "goal": "<= 0.25x fp32 latency at cosine >= 0.97",
    }
    print(json.dumps(rows["minilm-compound"], indent=1), flush=True)
    return rows


class _Skip(torch.nn.Module):
    """The identity in place of a block, whatever its block's forward took besides the input
    (EfficientNet's blocks take ``drop_connect_rate=``)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x


def _top1(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


def cnn_row(name: str, rounds: int) -> dict:
    loaded = slimgraph.load(name)
    float_model, _ = Pipeline.parse("fold-constants").run(loaded.model.clone())
    units = [u.to_json() for u in find_units(float_model)]
    if not any(u["removable"] for u in units):
        return {"units": units, "note": "no removable residual blocks"}
    ratio = 0.25 if name.startswith("efficientnet") else 0.5
    spec = f"prune-layers:ratio={ratio}"
    pipeline = Pipeline.parse(spec)
    pipeline.bind_calibration(loaded.calibration)
    pruned, (report,) = pipeline.run(float_model.clone())
    removed = [line.split(" (", 1)[0] for line in report.notes if line.endswith(": removed")]
    builtin = get_builtin(name)
    module = copy.deepcopy(builtin.module)
    for dotted in removed:
        parent, _, child = dotted.rpartition(".")
        container = module.get_submodule(parent)
        container[int(child)] = _Skip()
    evaluation = builtin.evaluation()
    feeds = evaluation.feeds
    name_in = builtin.input_names[0]
    with torch.no_grad():
        want = np.concatenate([module(torch.from_numpy(f[name_in])).numpy() for f in feeds])
    got = run_outputs(pruned, feeds)[0]
    reference = run_outputs(float_model, feeds)[0]
    feed = {name_in: feeds[0][name_in][:1]}
    row = {
        "units": units, "passes": spec, "removed": removed, "scores": report.notes,
        "max_abs_diff_vs_torch_without_blocks": float(np.max(np.abs(got - want))),
        "max_abs_output": float(np.max(np.abs(want))),
        "macs": {"fp32": _macs(float_model), "pruned": _macs(pruned)},
        "latency_batch1": heal_bench._latency(float_model, pruned, feed, rounds),
        "samples": len(got),
    }
    if builtin.task == "classification":
        row["top1_agreement_with_float"] = _top1(got, reference)
    return row


def _fmt(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items())


def _curve_lines(curve: list[dict] | None) -> list[str]:
    """The heal's held-out cosine (torch module, general held-out set) against minutes of training."""
    if not curve:
        return []
    return ["Held-out cosine during heal, by step (minutes of training): "
            + ", ".join(f"{p['step']} ({p['training_seconds'] / 60:.1f} min) {p['score']:.4f}"
                        for p in curve) + ".", ""]


def _markdown(results: dict) -> str:
    m, rows = results["machine"], results["rows"]
    lines = [
        "# prune-layers: residual blocks and transformer layers removed, then healed", "",
        f"Machine: {m['cpu']}, {m['cores']} cores{m.get('load', '')}; torch "
        f"{results['versions'].get('torch')}, onnxruntime {results['versions'].get('onnxruntime')}. "
        "Latency: onnxruntime CPU, p50, interleaved with fp32 in one run. Reproduce: "
        "`python benchmarks/prune_layers.py`.", "",
    ]
    if "minilm" in rows:
        r = rows["minilm"]
        lines += [
            "## MiniLM, 3 of 6 layers", "",
            f"`{r['passes']}` then `{r['heal']}` ({r['heal_seconds']} s; trained on "
            f"{r['training']}).", "",
            "| | cosine to float | MACs | latency batch 1 | latency batch 16 |", "|---|---|---|---|---|",
            f"| fp32 | {_fmt(r['float'])} | {r['macs']['fp32']:,} | "
            f"{r['latency']['batch1']['fp32_ms']} ms | {r['latency']['batch16']['fp32_ms']} ms |",
            f"| 3 layers, before heal | {_fmt(r['before'])} | {r['macs']['pruned']:,} | | |",
            f"| 3 layers, healed | {_fmt(r['after'])} | {r['macs']['pruned']:,} | "
            f"{r['latency']['batch1']['ms']} ms ({r['latency']['batch1']['ratio']}x) | "
            f"{r['latency']['batch16']['ms']} ms ({r['latency']['batch16']['ratio']}x) |", "",
            *_curve_lines(r.get("curve")),
            "Units and their output-importance scores (1 - mean cosine with that unit alone removed):",
            "", *[f"- {line}" for line in r["units"]], "",
        ]
    if "minilm-compound" in rows:
        r = rows["minilm-compound"]
        lines += ["## MiniLM, compound path", "", f"`{r['passes']}`; goal: {r['goal']}.", "",
                  "| stage | cosine to float |", "|---|---|",
                  *[f"| {k} | {_fmt(v)} |" for k, v in r["stages"].items()], "",
                  f"Latency: batch 1 {r['latency']['batch1']['ms']} ms "
                  f"({r['latency']['batch1']['ratio']}x fp32), batch 16 "
                  f"{r['latency']['batch16']['ms']} ms ({r['latency']['batch16']['ratio']}x); MACs "
                  f"{r['macs']['final']:,} of {r['macs']['fp32']:,}.", ""]
    cnns = [k for k in rows if not k.startswith("minilm")]
    if cnns:
        lines += ["## CNNs: blocks found, removed, checked against torch without them", "",
                  "| model | units (removable) | removed | max abs diff vs torch (max abs output) | "
                  "top-1 vs float | MACs | latency batch 1 |", "|---|---|---|---|---|---|---|"]
        for k in cnns:
            r = rows[k]
            n, ok = len(r["units"]), sum(u["removable"] for u in r["units"])
            if "removed" not in r:
                lines.append(f"| {k} | {n} ({ok}) | {r['note']} | | | | |")
                continue
            top1 = f"{r['top1_agreement_with_float']:.4f}" if "top1_agreement_with_float" in r \
                else "n/a"
            if k.startswith("resnet"):
                top1 += " (random weights)"
            lat = r["latency_batch1"]
            lines.append(
                f"| {k} | {n} ({ok}) | {', '.join(r['removed'])} | "
                f"{r['max_abs_diff_vs_torch_without_blocks']:.2e} ({r['max_abs_output']:.2f}) | "
                f"{top1} | {r['macs']['pruned'] / r['macs']['fp32']:.3f}x | "
                f"{lat['after_ms']} ms ({lat['ratio']}x) |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--steps", type=int, default=3000, help="MiniLM heal steps")
    parser.add_argument("--rounds", type=int, default=200, help="timed rounds for latency")
    parser.add_argument("--load", default="", help="say how loaded the machine was")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    path = args.out / f"{NAME}.json"
    results = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    results["versions"] = package_versions()
    results["machine"] = {"cpu": platform.processor() or platform.machine(),
                          "cores": os.cpu_count(), "load": args.load}
    wanted = args.rows.split(",")
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every row: an hour of healing is not lost to a later row's error
        path.write_text(json.dumps(results, indent=2) + "\n")
        (args.out / f"{NAME}.md").write_text(_markdown(results))

    if "minilm" in wanted or "minilm-compound" in wanted:
        results["rows"].update(minilm_rows(args.steps, args.rounds))
        save()
    for name in wanted:
        if not name.startswith("minilm"):
            results["rows"][name] = cnn_row(name, args.rounds)
            print(name, json.dumps(results["rows"][name], indent=1), flush=True)
            save()
    print(_markdown(results))


if __name__ == "__main__":
    main()
