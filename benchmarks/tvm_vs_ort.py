"""tvm-llvm vs ort-cpu latency on built-in models, untuned and MetaSchedule-tuned.

Both run with 2 threads in the same process, timed by ``slimgraph.bench.timing.interleaved``
(rotating round-robin, onnxruntime with ``session.intra_op.allow_spinning`` = 0 so neither steals
the other's cores); each figure is the median over calls. Ratios > 1 mean TVM is slower. The
tuned build fixes the batch, runs MetaSchedule for ``--tune`` trials and (``prepack``, the
default) lets it pick packed weight layouts, baked into the library.

    .venv/bin/python benchmarks/tvm_vs_ort.py [--models digits-cnn,mlp] [--tune 200] [--batches 1,64]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from slimgraph.backends.ort import runner_for, session_for
from slimgraph.backends.tvm import TVM_LLVM, load_runner
from slimgraph.bench.timing import interleaved
from slimgraph.frontend import load

RESULTS = Path(__file__).parent / "results"
THREADS = 2
SHARED_NOTE = ("2-core machine shared with other engineers' benchmarks and tuning runs while this "
               "ran: absolute times are noisy, ratios (interleaved) less so")


def _feeds(loaded, batch: int) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(np.resize(v, (batch, *v.shape[1:])))
            for k, v in loaded.verification_feeds[0].items()}


def bench_model(name: str, batch: int, tune: int, cache_dir: str, repeat: int) -> dict:
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
        calls = {k: (lambda run=run: run(feeds)) for k, run in runners.items()}
        start = time.perf_counter()
        for call in calls.values():
            call()
        # at most ~30 s of timed calls per row (untuned resnet-tiny at batch 64 takes seconds)
        repeat = max(15, min(repeat, int(30 / (time.perf_counter() - start))))
        latency = interleaved(calls, warmup=3, repeat=repeat)
        ms = {k: v.p50_ms for k, v in latency.items()}
    return {
        "model": name, "batch": batch, "repeat": repeat,
        "ms": {k: round(v, 4) for k, v in ms.items()},
        "ratio_vs_ort": {k: round(v / ms["ort-cpu"], 2) for k, v in ms.items() if k != "ort-cpu"},
        "builds": builds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits-cnn,resnet-tiny,mlp")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--tune", type=int, default=0, help="MetaSchedule trials (0: untuned only)")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache/slimgraph/tvm"))
    parser.add_argument("--repeat", type=int, default=200, help="timed calls per candidate")
    parser.add_argument("--out", default="tvm_vs_ort")
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            row = bench_model(name, batch, args.tune, args.cache_dir, args.repeat)
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {"threads": THREADS, "tune_trials": args.tune, "repeat": args.repeat,
            "shared_machine": SHARED_NOTE,
            "machine": platform.processor() or platform.machine(), "python": platform.python_version()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# tvm-llvm vs ort-cpu ({THREADS} threads, interleaved medians; ratio > 1: TVM slower)",
             "", f"MetaSchedule trials for the tuned column: {args.tune or 'not run'} (static batch, "
             "weight prepack on).", "", f"Note: {SHARED_NOTE}.", "",
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
