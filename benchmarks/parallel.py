"""parallel: pipeline stages and data parallelism on this machine, against one process.

Rows:

- ``partition``: MiniLM and resnet-tiny cut into 2 and 3 stages for micro-batches of 16 on one
  thread per stage: the stage times the partitioner measured, then each stage's session re-timed
  here, interleaved (slowest / fastest, bar <= 1.15), and the pipelined outputs against the
  unpartitioned model on held-out inputs (fp32, bar max abs diff <= 1e-5).
- ``throughput``: MiniLM at batch 16 over 512 held-out documentation sentences, samples/s of
  one process on one thread (the baseline), one process on two threads (what a user has), a
  2-stage Ray pipeline of two single-thread actors (bar >= 1.6x the baseline) and two
  single-thread Ray replicas (bar >= 1.7x). The four run in rotation, three rounds; medians.
  Ray is started once; each run's setup (actors, sessions) is reported apart from its time.
- ``ship``: what moving a numpy array between two Ray actors costs here, which is what the
  partitioner's per-cut shipping estimate stands on.
- ``ceiling``: every pair of cuts of resnet-tiny (37 nodes) measured as stage sessions: the most
  even 3-stage split that exists at node granularity, to set the partitioner's result against.
- ``memory``: ``--max-stage-bytes`` at 0.6 of MiniLM's weight bytes: the stages it gives, each
  one's initializer bytes counted from its file, and the outputs.

    python benchmarks/parallel.py            # -> benchmarks/results/parallel.{json,md}
    python benchmarks/parallel.py --rows ship
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

import slimgraph
from slimgraph.artifact import package_versions
from slimgraph.backends.ort import session_for
from slimgraph.heal.data import training_data
from slimgraph.parallel import partition
from slimgraph.parallel.run import run
from slimgraph.timing import interleaved

RESULTS = Path(__file__).parent / "results"
NAME = "parallel"
ROWS = ("ship", "partition", "ceiling", "throughput", "memory")
SAMPLES = 512
BATCH = 16


def _held_out(name: str, samples: int | None = None) -> dict[str, np.ndarray]:
    loaded = slimgraph.load(name)
    # MiniLM: documentation sentences never trained on; the others: their verification inputs.
    feeds = training_data(loaded).held_out if name == "minilm" else loaded.verification_feeds
    arrays = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
    n = next(iter(arrays.values())).shape[0]
    if samples:
        arrays = {k: np.concatenate([v] * (samples // n + 1))[:samples] for k, v in arrays.items()}
    return arrays


def _whole(name: str) -> ir.Model:
    return slimgraph.load(name).model


def _chain(out: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    pipeline = json.loads((out / "pipeline.json").read_text())
    env = dict(feed)
    for s in pipeline["stages"]:
        session = session_for(str(out / s["file"]))
        got = session.run(s["outputs"], {k: env[k] for k in s["inputs"]})
        env = {k: env[k] for k in s["forward"]} | dict(zip(s["outputs"], got, strict=True))
    return env


def partition_row(rounds: int) -> dict:
    result = {}
    for name in ("minilm", "resnet-tiny"):
        model = _whole(name)
        whole = session_for(ir.to_proto(model).SerializeToString())
        data = _held_out(name, 64)
        outputs = [v.name for v in model.graph.outputs]
        for stages in (2, 3):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "p"
                start = time.perf_counter()
                made = partition(name, out, stages=stages, batch=BATCH, threads=1)
                seconds = time.perf_counter() - start
                pipeline = made.pipeline
                diff = 0.0
                for i in range(0, 64, BATCH):
                    feed = {k: v[i:i + BATCH] for k, v in data.items()}
                    env = _chain(out, feed)
                    want = whole.run(outputs, feed)
                    diff = max(diff, *(float(np.abs(env[o] - w).max())
                                       for o, w in zip(outputs, want, strict=True)))
                # Each stage's session re-timed, interleaved, on the inputs the chain gives it.
                feed = {k: v[:BATCH] for k, v in data.items()}
                env, calls = dict(feed), {}
                for i, s in enumerate(pipeline["stages"]):
                    session = session_for(str(out / s["file"]),
                                          {"intra_op_num_threads": 1, "allow_spinning": False})
                    inputs = {k: env[k] for k in s["inputs"]}
                    calls[i] = (lambda s=session, x=inputs: s.run(None, x))
                    got = session.run(s["outputs"], inputs)
                    env = {k: env[k] for k in s["forward"]} | dict(zip(s["outputs"], got,
                                                                      strict=True))
                lat = interleaved(calls, warmup=3, repeat=rounds)
                again = [round(lat[i].p50_ms, 3) for i in calls]
            result[f"{name}/{stages}"] = {
                "model": name, "stages": stages, "partition_seconds": round(seconds, 1),
                "cuts": [s["start"] for s in pipeline["stages"][1:]], "nodes": pipeline["nodes"],
                "measured_ms": [s["measured_ms"] for s in pipeline["stages"]],
                "spread": pipeline["spread"], "retimed_ms": again,
                "retimed_spread": round(max(again) / min(again), 3),
                "weight_bytes": [s["weight_bytes"] for s in pipeline["stages"]],
                "cut_bytes_per_sample": [s["out_bytes_per_sample"]
                                         for s in pipeline["stages"][:-1]],
                "search": pipeline["rounds"], "max_abs_diff": diff,
            }
            print(json.dumps(result[f"{name}/{stages}"]), flush=True)
    return result


def throughput_row(rounds: int) -> dict:
    import ray

    data = _held_out("minilm", SAMPLES)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        slimgraph.export("minilm", tmp / "art", passes="fold-constants")
        made = partition(tmp / "art", tmp / "p2", stages=2, batch=BATCH, threads=1)
        np.savez(tmp / "in.npz", **data)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        try:
            configs = {
                "one process, 1 thread": dict(artifact=tmp / "art", threads=1),
                "one process, 2 threads": dict(artifact=tmp / "art", threads=2),
                "Ray pipeline, 2 stages x 1 thread": dict(artifact=tmp / "p2", threads=1),
                "Ray data parallel, 2 actors x 1 thread": dict(artifact=tmp / "art", workers=2,
                                                               threads=1),
            }
            runs: dict[str, list] = {k: [] for k in configs}
            reference = None
            for r in range(rounds):
                keys = list(configs)
                for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                    got = run(data=tmp / "in.npz", batch=BATCH, **configs[key])
                    runs[key].append(got)
                    if reference is None:
                        reference = got.outputs
                    diff = max(float(np.abs(got.outputs[k] - reference[k]).max()) for k in reference)
                    assert diff <= 1e-4, (key, diff)
                    print(key, round(got.samples_per_s, 1), flush=True)
        finally:
            ray.shutdown()
    base = statistics.median(g.samples_per_s for g in runs["one process, 1 thread"])
    out = {"samples": SAMPLES, "batch": BATCH, "rounds": rounds,
           "pipeline_measured_ms": [s["measured_ms"] for s in made.pipeline["stages"]]}
    for key, got in runs.items():
        rate = statistics.median(g.samples_per_s for g in got)
        out[key] = {"samples_per_s": round(rate, 2), "vs_baseline": round(rate / base, 3),
                    "setup_seconds": round(statistics.median(g.setup_seconds for g in got), 2),
                    "all_samples_per_s": [round(g.samples_per_s, 2) for g in got]}
    return out


def ship_row() -> dict:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        @ray.remote(num_cpus=1)
        class Maker:
            def make(self, nbytes: int) -> np.ndarray:
                return np.ones(nbytes // 4, np.float32)

        @ray.remote(num_cpus=1)
        class Taker:
            def take(self, array: np.ndarray) -> int:
                return int(array.size)

        maker, taker = Maker.remote(), Taker.remote()
        out = {}
        for nbytes in (4_096, 1 << 20, 3 << 20, 16 << 20, 64 << 20):
            for _ in range(3):
                ray.get(taker.take.remote(maker.make.remote(nbytes)))
            times = []
            for _ in range(20):
                t0 = time.perf_counter()
                ray.get(taker.take.remote(maker.make.remote(nbytes)))
                times.append(time.perf_counter() - t0)
            local = []
            for _ in range(20):  # the array's making alone, to take out
                t0 = time.perf_counter()
                np.ones(nbytes // 4, np.float32)
                local.append(time.perf_counter() - t0)
            out[str(nbytes)] = round((statistics.median(times) - statistics.median(local)) * 1000, 3)
        return {"ms_per_hop_by_bytes": out}
    finally:
        ray.shutdown()


def ceiling_row() -> dict:
    """All 3-stage splits of resnet-tiny, each stage measured alone (one thread, micro-batch 16)."""
    from slimgraph.calibration import stack_feeds
    from slimgraph.parallel.cuts import GraphCuts, measure_stage, run_stages

    loaded = slimgraph.load("resnet-tiny")
    model = loaded.model.clone()
    ir.passes.common.ShapeInferencePass()(model)
    feeds = list(loaded.calibration)
    micro = stack_feeds([feeds[i % len(feeds)] for i in range(BATCH)])
    cuts = GraphCuts(model, feeds[0])
    n, cache = cuts.n, {}
    zero = np.zeros(n)

    def ms(a: int, b: int) -> float:
        if (a, b) not in cache:
            stage = cuts.stage(a, b, zero, BATCH)
            prefix = [cuts.stage(0, a, zero, BATCH)] if a else []
            models = [cuts.extract(s) for s in [*prefix, stage]]
            _, envs = run_stages(models, [*prefix, stage], micro)
            cache[(a, b)] = measure_stage(models[-1], envs[-1], 1, repeat=15, budget_s=0.3)
        return cache[(a, b)]

    plans = []
    for c1 in range(1, n - 1):
        for c2 in range(c1 + 1, n):
            times = [ms(0, c1), ms(c1, c2), ms(c2, n)]
            plans.append({"cuts": [c1, c2], "ms": [round(t, 3) for t in times],
                          "spread": round(max(times) / min(times), 3)})
    even = min(plans, key=lambda p: p["spread"])
    fastest = min(plans, key=lambda p: max(p["ms"]))
    return {"model": "resnet-tiny", "stages": 3, "plans": len(plans), "most_even": even,
            "fastest_slowest_stage": fastest}


def memory_row() -> dict:
    model = _whole("minilm")
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    cap = int(total * 0.6)  # below the whole, above the 46.9 MB word embedding (one tensor)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "p"
        made = partition("minilm", out, max_stage_bytes=cap, balance="memory", batch=BATCH)
        held = []
        for s in made.pipeline["stages"]:
            proto = onnx.load(out / s["file"])
            held.append(sum(numpy_helper.to_array(t).nbytes for t in proto.graph.initializer))
        check = made.manifest["verification"]
    return {"weight_bytes": total, "cap": cap, "stages": len(held), "stage_bytes": held,
            "all_fit": all(h <= cap for h in held), "max_abs_diff": check["max_abs_diff"]}


def _markdown(results: dict) -> str:
    v, m = results["versions"], results["machine"]
    rows = results["rows"]
    lines = ["# parallel: pipeline stages and data parallelism", "",
             f"Machine: {m['cpu']}, {m['cores']} cores; onnxruntime {v.get('onnxruntime')}, ray "
             f"{v.get('ray', '?')}. Reproduce: `python benchmarks/parallel.py`.", ""]
    if "partition" in rows:
        lines += ["## Stages (micro-batch 16, one thread per stage)", "",
                  "| model | stages | cuts (node index) | measured by partition (ms) | re-timed here, "
                  "interleaved (ms) | slowest / fastest | bar <= 1.15 | max abs diff to whole | "
                  "bytes/sample at cuts |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows["partition"].values():
            lines.append(f"| {r['model']} ({r['nodes']} nodes) | {r['stages']} | {r['cuts']} | "
                         f"{r['measured_ms']} | {r['retimed_ms']} | {r['retimed_spread']} | "
                         f"{'met' if r['retimed_spread'] <= 1.15 else 'missed'} | "
                         f"{r['max_abs_diff']:.2g} | {r['cut_bytes_per_sample']} |")
        lines.append("")
    if "throughput" in rows:
        r = rows["throughput"]
        lines += [f"## Throughput: MiniLM, batch {r['batch']}, {r['samples']} sentences, "
                  f"{r['rounds']} rounds in rotation (median)", "",
                  "| configuration | samples/s | vs one process, 1 thread | bar | setup s |",
                  "|---|---|---|---|---|"]
        bars = {"Ray pipeline, 2 stages x 1 thread": 1.6,
                "Ray data parallel, 2 actors x 1 thread": 1.7}
        for key, s in r.items():
            if not isinstance(s, dict):
                continue
            bar = bars.get(key)
            verdict = "" if bar is None else (f">= {bar}x: {'met' if s['vs_baseline'] >= bar else 'missed'}")
            lines.append(f"| {key} | {s['samples_per_s']} | {s['vs_baseline']}x | {verdict} | "
                         f"{s['setup_seconds']} |")
        lines += ["", f"Pipeline stages as measured by partition: {r['pipeline_measured_ms']} ms.",
                  ""]
    if "ship" in rows:
        lines += ["## Shipping a numpy array between two Ray actors", "",
                  "| bytes | ms per hop |", "|---|---|"]
        for b, ms in rows["ship"]["ms_per_hop_by_bytes"].items():
            lines.append(f"| {int(b):,} | {ms} |")
        lines.append("")
    if "ceiling" in rows:
        r = rows["ceiling"]
        e, f = r["most_even"], r["fastest_slowest_stage"]
        lines += ["## How even can resnet-tiny's 3 stages be?", "",
                  f"All {r['plans']} pairs of cuts, each stage measured alone: the most even split "
                  f"is cuts {e['cuts']} at {e['ms']} ms (slowest / fastest {e['spread']}); the "
                  f"fastest slowest stage is cuts {f['cuts']} at {f['ms']} ms ({f['spread']}).", ""]
    if "memory" in rows:
        r = rows["memory"]
        lines += ["## --max-stage-bytes", "",
                  f"MiniLM's {r['weight_bytes']:,} weight bytes with a cap of {r['cap']:,}: "
                  f"{r['stages']} stages holding {r['stage_bytes']} bytes (counted from their "
                  f"files); all fit: {r['all_fit']}; max abs diff to the whole model "
                  f"{r['max_abs_diff']:.2g}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    path = args.out / f"{NAME}.json"
    results = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    results["versions"] = package_versions()
    try:
        import ray

        results["versions"]["ray"] = ray.__version__
    except ImportError:
        pass
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    args.out.mkdir(parents=True, exist_ok=True)
    for row in args.rows.split(","):
        if row == "partition":
            results["rows"][row] = partition_row(100)
        elif row == "throughput":
            results["rows"][row] = throughput_row(args.rounds)
        elif row == "ship":
            results["rows"][row] = ship_row()
        elif row == "memory":
            results["rows"][row] = memory_row()
        elif row == "ceiling":
            results["rows"][row] = ceiling_row()
        else:
            raise SystemExit(f"unknown row {row!r}; rows: {', '.join(ROWS)}")
        path.write_text(json.dumps(results, indent=2) + "\n")
        (args.out / f"{NAME}.md").write_text(_markdown(results))
    print(_markdown(results))


if __name__ == "__main__":
    main()
