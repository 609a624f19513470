"""`slimgraph bench`: variants x backends x batch sizes, timed fairly in one run, with accuracy.

Every row is measured on the same inputs: latency percentiles from interleaved rounds, throughput,
artifact bytes, peak memory (a separate probe process), agreement with the fp32 reference and task
accuracy where labels exist. Ratios to fp32 are taken on the same backend and batch in the same
run, and the rows users get burned by are flagged.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from slimgraph.artifact import check_output_path, staged_dir, write_json
from slimgraph.backends import get_backend
from slimgraph.bench.accuracy import _accuracy, _evaluation, _feed_of_batch
from slimgraph.bench.candidates import _build_variant, _Candidate, _ort_quantizer_peers, _torch_peer
from slimgraph.bench.machine import machine_facts
from slimgraph.bench.results import FP32, BenchResult, Row, _ratios_and_flags, _sorted
from slimgraph.calibration import Feeds, read_samples
from slimgraph.errors import PipelineSpecError
from slimgraph.frontend import LoadedModel, load
from slimgraph.passes import RECIPES, Pipeline
from slimgraph.timing import interleaved, parallel_throughput

DEFAULT_PEERS = ("torch-eager", "torch-compile", "ort-quantizers")
ProgressCallback = Callable[[str, int, int], None]  # (what, done, total)


def variant_pipeline(variant: str) -> Pipeline:
    """``fp32`` is the lossless pipeline; a recipe name, a .toml path or a pass spec otherwise."""
    if variant == FP32:
        return Pipeline.parse(RECIPES["lossless"])
    if variant in RECIPES:
        return Pipeline.parse(RECIPES[variant])
    return Pipeline.coerce(variant)


def bench(
    model: str | Path | Any | LoadedModel,
    out: str | Path,
    *,
    backends: Sequence[str] = ("ort-cpu",),
    variants: Sequence[str] = (FP32,),
    batches: Sequence[int] = (1,),
    threads: int = 2,
    warmup: int = 5,
    repeat: int = 30,
    workers: int = 1,
    eval_data: Any = None,
    peers: Sequence[str] = DEFAULT_PEERS,
    memory: bool = True,
    force: bool = False,
    on_progress: ProgressCallback | None = None,
) -> BenchResult:
    """Benchmark MODEL and write results.json, results.md and plots into ``out``."""
    progress = on_progress or (lambda *_: None)
    pipelines = {v: variant_pipeline(v) for v in variants}  # bad specs fail before any work
    for peer in peers:
        if peer not in DEFAULT_PEERS:
            raise PipelineSpecError(f"unknown peer {peer!r}; valid: {', '.join(DEFAULT_PEERS)}")
    wanted = [get_backend(b.partition(":")[0]) for b in backends]
    if isinstance(eval_data, (str, Path)):  # a bad file or output path fails before any work
        eval_data = (str(eval_data), read_samples(eval_data, "evaluation"))
    check_output_path(Path(out), force=force, kind="output directory")
    machine = machine_facts(threads)  # before any runtime pins this process to fewer cores
    loaded = model if isinstance(model, LoadedModel) else load(model)
    evaluation = _evaluation(loaded, eval_data)
    rows: list[Row] = []
    candidates: list[_Candidate] = []
    settings = {"backends": list(backends), "variants": list(variants), "batches": list(batches),
                "threads": threads, "warmup": warmup, "repeat": repeat, "workers": workers,
                "peers": list(peers)}

    with staged_dir(Path(out), force=force) as root, tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for backend in wanted:
            if not backend.available():
                for batch in batches:
                    for variant in variants:
                        rows.append(Row(variant, backend.name, batch, "skipped",
                                        backend.unavailable_reason()))
        usable = [b for b in wanted if b.available()]
        for i, variant in enumerate(variants):
            progress(f"build {variant}", i, len(variants))
            candidates += _build_variant(loaded, variant, pipelines[variant], usable, threads,
                                         work / f"v{i}", rows, batches)
        fp32_onnx = next((c.artifact_dir / "model.onnx" for c in candidates
                          if c.variant == FP32 and not c.peer and c.artifact_dir), None)
        int8_wanted = any(_is_int8(pipelines[v]) for v in variants)
        if "ort-quantizers" in peers and int8_wanted and fp32_onnx is not None:
            candidates += _ort_quantizer_peers(fp32_onnx, loaded, threads, work, rows, batches)
        if loaded.module is not None:
            for peer in ("torch-eager", "torch-compile"):
                if peer in peers:
                    candidates += _torch_peer(peer, loaded, threads, rows, batches)

        progress("accuracy", 0, len(candidates))
        accuracy = {(c.variant, c.backend): _accuracy(c.runner, loaded, evaluation)
                    for c in candidates}
        for batch in batches:
            feed = _feed_of_batch(evaluation, batch)
            rows += _time_batch(candidates, feed, batch, accuracy, warmup=warmup, repeat=repeat,
                                workers=workers, threads=threads, progress=progress)
            if memory:
                for row, c in zip(rows[-len(candidates):], candidates, strict=True):
                    if c.artifact_dir is not None:
                        row.peak_memory_mb = _peak_memory(c, feed, work, threads)
        _ratios_and_flags(rows, pipelines)
        result = BenchResult(str(loaded.source["name"]), _sorted(rows, variants),
                             machine, settings, Path(out))
        progress("write", 0, 1)
        from slimgraph.bench.render import render_markdown, render_plots

        write_json(root / "results.json", result.to_json())
        (root / "results.md").write_text(render_markdown(result))
        render_plots(result, root)
    return result


def _time_batch(candidates: list[_Candidate], feed: Feeds, batch: int, accuracy: dict, *,
                warmup: int, repeat: int, workers: int, threads: int,
                progress: ProgressCallback) -> list[Row]:
    """Latency of every candidate on one feed (interleaved), and K-worker throughput if asked."""
    calls = {(c.variant, c.backend): functools.partial(c.runner, feed) for c in candidates}
    rounds = itertools.count(1)
    latencies = interleaved(calls, warmup=warmup, repeat=repeat,
                            on_round=lambda: progress(f"time batch {batch}", next(rounds), repeat))
    rows = []
    for c in candidates:
        row = Row(c.variant, c.backend, batch, peer=c.peer, build_s=c.build_s,
                  artifact_bytes=c.artifact_bytes, latency=latencies[(c.variant, c.backend)])
        row.throughput = batch / (row.latency.p50_ms / 1e3)
        row.cosine, row.max_abs_err, row.top1_agreement, row.task_accuracy = accuracy[
            (c.variant, c.backend)]
        if workers > 1 and c.make_worker is not None:
            iters = max(3, repeat // 2)
            runs = [functools.partial(c.make_worker(max(1, threads // workers)), feed)
                    for _ in range(workers)]
            row.workers = workers
            row.workers_throughput = parallel_throughput(runs, batch, iters)
            single = parallel_throughput([functools.partial(c.runner, feed)], batch, iters)
            row.workers_scaling = row.workers_throughput / single
        rows.append(row)
    return rows


def _is_int8(pipeline: Pipeline) -> bool:
    return any(p.name == "quantize" and getattr(p, "mode", None) == "int8" for p in pipeline.passes)


def _peak_memory(c: _Candidate, feed: Feeds, work: Path, threads: int) -> float | None:
    from slimgraph.bench.peers import probe_peak_memory

    # The probe is a child process: its failure (exit code, no or bad JSON line) leaves the
    # column empty for that row, the timings stand.
    with contextlib.suppress(subprocess.CalledProcessError, OSError, ValueError, IndexError, KeyError):
        return probe_peak_memory(c.artifact_dir, c.backend, feed, work, threads)
    return None

