"""tvm-llvm vs ort-cpu latency on built-in models, untuned and MetaSchedule-tuned.

Both run with 2 threads in the same process, timed by ``slimgraph.timing.interleaved``
(rotating round-robin, onnxruntime with ``session.intra_op.allow_spinning`` = 0 so neither steals
the other's cores); each figure is the median over calls. Ratios > 1 mean TVM is slower. The
tuned build fixes the batch, runs MetaSchedule for ``--tune`` trials and (``prepack``, the
default) lets it pick packed weight layouts, baked into the library.

    .venv/bin/python benchmarks/tvm_vs_ort.py [--models digits-cnn,mlp] [--batches 1,64]
        [--tune 200 | --tune digits-cnn=384,resnet-tiny@1=1280,mlp=200] [--layout NHWC]
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
from slimgraph.frontend import load
from slimgraph.timing import interleaved

RESULTS = Path(__file__).parent / "results"
THREADS = 2
SHARED_NOTE = ("2-core machine shared with other engineers' benchmarks and tuning runs while this "
               "ran: absolute times are noisy, ratios (interleaved) less so")


def _feeds(loaded, batch: int) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(np.resize(v, (batch, *v.shape[1:])))
            for k, v in loaded.verification_feeds[0].items()}


def bench_model(name: str, batch: int, tune: int, layout: str, cache_dir: str,
                repeat: int) -> dict:
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
                                     "layout": layout, "cache_dir": cache_dir}
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
    parser.add_argument("--tune", default="0", help="MetaSchedule trials in all (0: untuned only), "
                        "one number or model=N,... per model")
    parser.add_argument("--layout", default="NHWC", choices=["NCHW", "NHWC"],
                        help="convolution layout of the tuned builds")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache/slimgraph/tvm"))
    parser.add_argument("--repeat", type=int, default=200, help="timed calls per candidate")
    parser.add_argument("--out", default="tvm_vs_ort")
    args = parser.parse_args()
    models = args.models.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    budgets = _budgets(args.tune, models, batches)
    rows = []
    for name in models:
        for batch in batches:
            row = bench_model(name, batch, budgets[name, batch], args.layout, args.cache_dir,
                              args.repeat)
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {"threads": THREADS, "tune_trials": {f"{m}@{b}": n for (m, b), n in budgets.items()},
            "tune_spec": args.tune, "layout": args.layout, "repeat": args.repeat,
            "shared_machine": SHARED_NOTE,
            "machine": platform.processor() or platform.machine(), "python": platform.python_version()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# tvm-llvm vs ort-cpu ({THREADS} threads, interleaved medians; ratio > 1: TVM slower)",
             "", f"Tuned column: MetaSchedule (static batch, weight prepack on, {args.layout} "
             "convolutions); trials per row below.", "", f"Note: {SHARED_NOTE}.", "",
             "| model | batch | ort-cpu ms | TVM untuned ms (ratio) | TVM tuned ms (ratio) | trials "
             "(tasks, per round) | tuning s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        tuned = (f"{r['ms']['tvm-tuned']} ({r['ratio_vs_ort']['tvm-tuned']}x)"
                 if "tvm-tuned" in r["ms"] else "-")
        tuning = (r["builds"].get("tvm-tuned") or {}).get("tuning") or {}
        lines.append(f"| {r['model']} | {r['batch']} | {r['ms']['ort-cpu']} | "
                     f"{r['ms']['tvm-untuned']} ({r['ratio_vs_ort']['tvm-untuned']}x) | {tuned} | "
                     f"{_trials(tuning)} | {tuning.get('seconds', '-')} |")
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")


def _budgets(spec: str, models: list[str], batches: list[int]) -> dict[tuple[str, int], int]:
    """``200`` (every row), or ``digits-cnn=384,resnet-tiny@1=1280`` per model or model@batch,
    the most specific winning (0 for a row not named)."""
    if "=" not in spec:
        return {(m, b): int(spec) for m in models for b in batches}
    named = {k: int(v) for k, v in (item.split("=") for item in spec.split(","))}
    return {(m, b): named.get(f"{m}@{b}", named.get(m, 0)) for m in models for b in batches}


def _trials(tuning: dict) -> str:
    if not tuning:
        return "-"
    return f"{tuning['trials']} ({tuning['tasks']}, {tuning.get('trials_per_round', '16 max')})"


if __name__ == "__main__":
    main()
