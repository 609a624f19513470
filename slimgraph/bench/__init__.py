"""`slimgraph bench`: variants x backends x batch sizes, timed fairly in one run, with accuracy.

Every row is measured on the same inputs: latency percentiles from interleaved rounds, throughput,
artifact bytes, peak memory (a separate probe process), agreement with the fp32 reference and task
accuracy where labels exist. Ratios to fp32 are taken on the same backend and batch in the same
run, and the rows users get burned by are flagged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slimgraph.artifact import check_output_path, staged_dir, write_json
from slimgraph.backends import BACKENDS, get_backend
from slimgraph.backends.ort import OrtBackend, runner_for, session_for
from slimgraph.bench.machine import machine_facts
from slimgraph.bench.timing import Latency, interleaved, parallel_throughput
from slimgraph.calibration import LABELS, Calibration, Feeds, read_samples
from slimgraph.errors import DataError, PipelineSpecError
from slimgraph.export import export
from slimgraph.frontend import LoadedModel, fit_calibration, load
from slimgraph.passes import RECIPES, Pipeline
from slimgraph.verify import Runner, compare_outputs

FP32 = "fp32"
DEFAULT_PEERS = ("torch-eager", "torch-compile", "ort-quantizers")
ProgressCallback = Callable[[str, int, int], None]  # (what, done, total)


@dataclasses.dataclass
class Row:
    """One (variant, backend, batch) measurement. ``status`` is ok, skipped or failed."""

    variant: str
    backend: str
    batch: int
    status: str = "ok"
    reason: str | None = None
    peer: bool = False  # a baseline we compare against (torch, onnxruntime's quantizers)
    build_s: float | None = None
    latency: Latency | None = None
    throughput: float | None = None  # samples/s at p50
    ratio_to_fp32: float | None = None  # p50 / fp32 p50, same backend and batch
    artifact_bytes: int | None = None
    peak_memory_mb: float | None = None
    cosine: float | None = None
    max_abs_err: float | None = None
    top1_agreement: float | None = None
    task_accuracy: float | None = None
    workers: int = 1
    workers_throughput: float | None = None
    workers_scaling: float | None = None
    flags: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class BenchResult:
    model: str
    rows: list[Row]
    machine: dict[str, Any]
    settings: dict[str, Any]
    out: Path

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "machine": self.machine, "settings": self.settings,
                "rows": [dataclasses.asdict(r) for r in self.rows]}


@dataclasses.dataclass
class _Candidate:
    """Something to time: a runner for one (variant, backend), plus what it cost to build."""

    variant: str
    backend: str
    runner: Runner
    build_s: float
    artifact_bytes: int | None
    peer: bool = False
    # An export dir, a bare .onnx file (onnxruntime's quantizers), or for torch peers the
    # "builtin:NAME" / "torch:package.module:callable" the probe process rebuilds the module from.
    artifact_dir: Path | str | None = None
    make_worker: Callable[[int], Runner] | None = None  # a fresh runner with N threads


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


def _backend_options(backend_name: str, threads: int) -> dict[str, Any]:
    """Options that make a backend share the machine fairly with the other candidates."""
    if isinstance(BACKENDS.get(backend_name), OrtBackend):
        # Interleaved sessions must not spin: idle spinning threads steal the cores.
        return {"intra_op_num_threads": threads, "allow_spinning": False}
    if backend_name.startswith("tvm"):
        return {"threads": threads}
    return {}


def _build_variant(loaded, variant, pipeline, usable, threads, dest, rows, batches):
    specs = []
    for backend in usable:
        opts = ",".join(f"{k}={v}" for k, v in _backend_options(backend.name, threads).items())
        specs.append(f"{backend.name}:{opts}" if opts else backend.name)
    try:
        result = export(loaded, dest, passes=pipeline, backends=specs, allow_mismatch=True)
    except Exception as exc:  # a variant that cannot be built is a row, not a crash
        for backend in usable:
            for batch in batches:
                rows.append(Row(variant, backend.name, batch, "failed",
                                f"{type(exc).__name__}: {exc}"))
        return []
    pass_s = result.timings.get("passes", 0.0)
    candidates = []
    for backend in usable:
        built = result.built[backend.name]
        size = sum((dest / f).stat().st_size for f in result.manifest["backends"][backend.name]
                   ["files"])
        make_worker = None
        if isinstance(backend, OrtBackend) and backend.provider == "CPUExecutionProvider":
            model_path = dest / "model.onnx"

            def make_worker(n: int, model_path: Path = model_path) -> Runner:
                return runner_for(session_for(model_path, {"intra_op_num_threads": n,
                                                           "allow_spinning": False}))
        candidates.append(_Candidate(
            variant, backend.name, backend.load(built),
            pass_s + result.timings.get(f"build {backend.name}", 0.0), size,
            artifact_dir=dest, make_worker=make_worker,
        ))
    return candidates


def _ort_quantizer_peers(fp32_onnx: Path, loaded: LoadedModel, threads: int, work: Path,
                         rows: list[Row], batches) -> list[_Candidate]:
    """onnxruntime's own quantize_dynamic and quantize_static, the peers int8 rows must beat."""
    from slimgraph.bench.peers import ort_quantize

    candidates = []
    for kind in ("quantize_dynamic", "quantize_static"):
        name = f"ort-{kind}"
        try:
            t0 = time.perf_counter()
            path = ort_quantize(kind, fp32_onnx, work / f"{name}.onnx", loaded)
            build_s = time.perf_counter() - t0
            session = session_for(path, {"intra_op_num_threads": threads, "allow_spinning": False})
        except Exception as exc:  # the peer's own failure is a finding, recorded as a row
            for batch in batches:
                rows.append(Row(name, "ort-cpu", batch, "failed", f"{type(exc).__name__}: {exc}",
                                peer=True))
            continue

        def make_worker(n: int, path: Path = path) -> Runner:
            return runner_for(session_for(path, {"intra_op_num_threads": n,
                                                 "allow_spinning": False}))

        candidates.append(_Candidate(name, "ort-cpu", runner_for(session), build_s,
                                     path.stat().st_size, peer=True, artifact_dir=path,
                                     make_worker=make_worker))
    return candidates


def _torch_peer(peer: str, loaded: LoadedModel, threads: int, rows: list[Row],
                batches) -> list[_Candidate]:
    from slimgraph.bench.peers import torch_runner

    try:
        t0 = time.perf_counter()
        runner = torch_runner(loaded, threads, compiled=peer == "torch-compile")
        build_s = time.perf_counter() - t0
    except Exception as exc:  # torch.compile does not work everywhere; say why, keep going
        for batch in batches:
            rows.append(Row(FP32, peer, batch, "skipped", f"{type(exc).__name__}: {exc}",
                            peer=True))
        return []
    weight_bytes = sum(t.numel() * t.element_size() for t in loaded.module.state_dict().values())
    source = loaded.source
    rebuild = f"{source['kind']}:{source['name']}" if source["kind"] in ("builtin", "torch") else None
    return [_Candidate(FP32, peer, runner, build_s, weight_bytes, peer=True,
                       artifact_dir=rebuild)]


def _evaluation(loaded: LoadedModel, eval_data: Any):
    """Held-out data: (file, arrays) read from --eval FILE.npz (inputs + optional `labels`), fitted
    to the model's inputs; else the built-in's own."""
    from slimgraph.frontend.builtin import EvalData

    if eval_data is None:
        if loaded.evaluation is not None:
            return loaded.evaluation
        return EvalData(loaded.verification_feeds, None)
    if isinstance(eval_data, EvalData):
        return eval_data
    where, arrays = eval_data
    arrays = dict(arrays)
    labels = arrays.pop(LABELS, None)
    if not arrays:
        raise DataError(f"{where}: holds only {LABELS!r}; add the model's input arrays")
    inputs = fit_calibration(loaded.model, Calibration([arrays], where)).feeds[0]
    feeds, label_batches = [], []
    n = len(next(iter(inputs.values())))
    for i in range(0, n, 64):
        feeds.append({k: v[i:i + 64] for k, v in inputs.items()})
        if labels is not None:
            label_batches.append(labels[i:i + 64])
    return EvalData(feeds, label_batches if labels is not None else None)


def _accuracy(runner: Runner, loaded: LoadedModel, evaluation):
    """(cosine, max abs err, top-1 agreement) vs the fp32 reference, and task accuracy."""
    feeds = evaluation.feeds
    try:
        got = [runner(f) for f in feeds]
    except Exception:  # a runner that cannot run the data is reported by its timing failure
        return None, None, None, None
    ref = [loaded.reference(f) for f in feeds]
    names = [f"out{i}" for i in range(len(ref[0]))]
    first = compare_outputs(names, ref, got)[0]
    task = None
    if evaluation.labels is not None:
        correct = sum(int((g[0].argmax(-1) == lab).sum())
                      for g, lab in zip(got, evaluation.labels, strict=True))
        task = correct / sum(len(lab) for lab in evaluation.labels)
    return first.cosine, first.max_abs_err, first.top1_agreement, task


def _feed_of_batch(evaluation, batch: int) -> Feeds:
    """``batch`` samples drawn (cyclically) from the held-out data: the same feed for every row."""
    pool = evaluation.feeds
    names = list(pool[0])
    stacked = {k: np.concatenate([f[k] for f in pool]) for k in names}
    n = len(stacked[names[0]])
    idx = np.arange(batch) % n
    return {k: np.ascontiguousarray(v[idx]) for k, v in stacked.items()}


def _peak_memory(c: _Candidate, feed: Feeds, work: Path, threads: int) -> float | None:
    from slimgraph.bench.peers import probe_peak_memory

    with contextlib.suppress(Exception):
        return probe_peak_memory(c.artifact_dir, c.backend, feed, work, threads)
    return None


ACCURACY_SLACK = 0.01  # task accuracy this far below fp32 still counts as "the same accuracy"


def _ratios_and_flags(rows: list[Row], pipelines: dict[str, Pipeline]) -> None:
    """Ratio to fp32 on the same backend and batch (peers: to slimgraph's ort-cpu fp32), flags."""
    fp32 = {(r.backend, r.batch): r for r in rows if r.variant == FP32 and r.latency and not r.peer}
    for r in rows:
        if r.latency is None:
            continue
        base = fp32.get(("ort-cpu" if r.peer else r.backend, r.batch))
        if base is not None and base is not r:
            r.ratio_to_fp32 = r.latency.p50_ms / base.latency.p50_ms
        pipeline = pipelines.get(r.variant)
        modes = ["int8"] if r.variant.startswith("ort-quantize") else [
            str(getattr(p, "mode", "")) for p in (pipeline.passes if pipeline else ())
            if p.name == "quantize"]
        if r.ratio_to_fp32 is not None and r.ratio_to_fp32 >= 1.0 and modes:
            r.flags.append(f"{'+'.join(modes)} not faster than fp32 ({r.ratio_to_fp32:.2f}x)")
        pruned = pipeline is not None and any(p.name.startswith("prune") for p in pipeline.passes)
        if r.ratio_to_fp32 is not None and r.ratio_to_fp32 >= 0.95 and pruned:
            r.flags.append(f"pruned but not faster ({r.ratio_to_fp32:.2f}x)")
        # Where labels score the task, a model that was trained (heal) is judged by its accuracy:
        # its logits may move while it classifies as well. Elsewhere, by agreement with fp32.
        base_acc = base.task_accuracy if base is not None else None
        if r.task_accuracy is not None and base_acc is not None:
            if r.task_accuracy < base_acc - ACCURACY_SLACK:
                r.flags.append(f"task accuracy {100 * (base_acc - r.task_accuracy):.1f} pt below "
                               f"fp32 ({r.task_accuracy:.4f})")
        elif r.cosine is not None and r.cosine < 0.99:
            r.flags.append(f"outputs diverge from fp32 (cosine {r.cosine:.4f})")


def _sorted(rows: list[Row], variants: Sequence[str]) -> list[Row]:
    order = {v: i for i, v in enumerate(variants)}
    return sorted(rows, key=lambda r: (r.batch, r.peer, order.get(r.variant, len(order)),
                                       r.variant, r.backend))


__all__ = ["BenchResult", "Row", "bench", "variant_pipeline"]
