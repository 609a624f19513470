"""tvm-llvm vs ort-cpu latency on built-in models, untuned and MetaSchedule-tuned.

Both run with 2 threads in the same process, interleaved round by round (onnxruntime with
spinning off so neither steals the other's cores); each figure is the median over rounds of
the mean time per call within a round. Ratios > 1 mean TVM is slower.

    .venv/bin/python benchmarks/tvm_vs_ort.py [--models digits-cnn,mlp] [--tune 64] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from slimgraph.backends.ort import runner_for, session_for
from slimgraph.backends.tvm import TVM_LLVM, load_runner
from slimgraph.frontend import load

RESULTS = Path(__file__).parent / "results"
THREADS = 2


def _feeds(loaded, batch: int) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(np.resize(v, (batch, *v.shape[1:])))
            for k, v in loaded.verification_feeds[0].items()}


def _interleaved(runners: dict, feeds: dict, rounds: int, min_seconds: float) -> dict[str, float]:
    """Median over rounds of the mean ms per call; each round runs every runner in turn."""
    calls = {}
    for name, run in runners.items():
        run(feeds)
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < min_seconds:
            run(feeds)
            n += 1
        calls[name] = max(n, 1)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                run(feeds)
            samples[name].append((time.perf_counter() - start) / calls[name] * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def bench_model(name: str, batch: int, tune: int, cache_dir: str, rounds: int) -> dict:
    loaded = load(name)
    model = loaded.model
    feeds = _feeds(loaded, batch)
    session = session_for(ir.to_proto(model).SerializeToString(),
                          {"intra_op_num_threads": THREADS, "allow_spinning": False})
    runners = {"ort-cpu": runner_for(session)}
    builds = {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"tvm-untuned": {"threads": THREADS}}
        if tune:
            variants["tvm-tuned"] = {"threads": THREADS, "tune": tune, "batch": batch,
                                     "cache_dir": cache_dir}
        for label, options in variants.items():
            start = time.perf_counter()
            built = TVM_LLVM.build(model, Path(tmp) / label, options)
            builds[label] = {"seconds": round(time.perf_counter() - start, 1),
                             "tuning": built.options.get("tuning")}
            runners[label] = load_runner(built.entry_path)
            want = runners["ort-cpu"](feeds)[0]
            got = runners[label](feeds)[0]
            builds[label]["max_rel_err"] = float(np.abs(got - want).max() / np.abs(want).max())
        ms = _interleaved(runners, feeds, rounds, min_seconds=0.05)
    return {
        "model": name, "batch": batch, "ms": {k: round(v, 4) for k, v in ms.items()},
        "ratio_vs_ort": {k: round(v / ms["ort-cpu"], 2) for k, v in ms.items() if k != "ort-cpu"},
        "builds": builds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits-cnn,resnet-tiny,mlp")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--tune", type=int, default=0, help="MetaSchedule trials (0: untuned only)")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache/slimgraph/tvm"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default="tvm_vs_ort")
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            row = bench_model(name, batch, args.tune, args.cache_dir, args.rounds)
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {"threads": THREADS, "tune_trials": args.tune, "rounds": args.rounds,
            "machine": platform.processor() or platform.machine(), "python": platform.python_version()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# tvm-llvm vs ort-cpu ({THREADS} threads, interleaved medians; ratio > 1: TVM slower)",
             "", f"MetaSchedule trials for the tuned column: {args.tune or 'not run'}.", "",
             "| model | batch | ort-cpu ms | TVM untuned ms (ratio) | TVM tuned ms (ratio) | tuning s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        tuned = (f"{r['ms']['tvm-tuned']} ({r['ratio_vs_ort']['tvm-tuned']}x)"
                 if "tvm-tuned" in r["ms"] else "-")
        tuning = (r["builds"].get("tvm-tuned") or {}).get("tuning") or {}
        lines.append(f"| {r['model']} | {r['batch']} | {r['ms']['ort-cpu']} | "
                     f"{r['ms']['tvm-untuned']} ({r['ratio_vs_ort']['tvm-untuned']}x) | {tuned} | "
                     f"{tuning.get('seconds', '-')} |")
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
