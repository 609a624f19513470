"""partitioning: ``slimgraph partition``: cut a model into pipeline stages with ``cuts.plan``,
verify them against the whole, and write the stages, pipeline.json, manifest.json and report.md."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.artifact import MANIFEST, check_output_path, file_hashes, staged_dir, write_json
from slimgraph.errors import InputSpecError, ModelLoadError, VerificationError
from slimgraph.parallel.run import (
    PIPELINE,
    PIPELINE_FORMAT,
    check_threads,
    read_manifest,
    verified_file,
)

STAGES_DIR = "stages"
BALANCES = ("time", "memory")


@dataclasses.dataclass
class PartitionResult:
    out: Path
    pipeline: dict[str, Any]
    manifest: dict[str, Any]


def load_for_partition(model: Any, calibration: Any = None):
    """``slimgraph.load`` of MODEL, or of an artifact directory's model.onnx (read only after its
    sha256 matches the manifest) with its built-in source's data where it came from one."""
    import slimgraph
    from slimgraph.backends.ort import MODEL_FILE

    path = Path(str(model)) if isinstance(model, (str, Path)) else None
    if path is not None and path.is_dir() and (path / MANIFEST).exists():
        manifest = read_manifest(path, ModelLoadError)
        file, _ = verified_file(path, MODEL_FILE, manifest["files"], ModelLoadError)
        source = manifest.get("source")
        if calibration is None and isinstance(source, dict) and source.get("kind") == "builtin":
            from slimgraph.frontend.builtin import get_builtin

            if not isinstance(source.get("name"), str):
                raise ModelLoadError(f"{path / MANIFEST}: source.name must be a string")
            calibration = get_builtin(source["name"]).calibration(64)
        return slimgraph.load(file, calibration=calibration)
    return slimgraph.load(model, calibration=calibration)


def partition(model: Any, out: str | Path, *, stages: int | None = None, balance: str = "time",
              max_stage_bytes: int | None = None, batch: int = 16, threads: int = 1,
              calibration: Any = None, force: bool = False) -> PartitionResult:
    """Cut MODEL (anything ``slimgraph.load`` takes, or an artifact directory) into pipeline
    stages balanced for micro-batches of ``batch`` on sessions of ``threads`` intra-op threads,
    and write them with ``pipeline.json``, ``manifest.json`` and ``report.md`` to ``out``."""
    from slimgraph.artifact import package_versions
    from slimgraph.calibration import stack_feeds
    from slimgraph.parallel.cuts import plan
    from slimgraph.passes.base import one_of

    one_of("partition", "--balance", balance, BALANCES)
    if stages is None and max_stage_bytes is None:
        raise InputSpecError("partition: give --stages, or --max-stage-bytes to pick the count")
    if stages is not None and stages < 1:
        raise InputSpecError(f"partition: --stages must be >= 1, got {stages}")
    for flag, value in (("--max-stage-bytes", max_stage_bytes), ("--batch", batch),
                        ("--threads", threads)):
        if value is not None and value < 1:
            raise InputSpecError(f"partition: {flag} must be >= 1, got {value}")
    check_threads("partition", threads)
    out = Path(out)
    if out.parent.is_dir():  # fail before the minutes of profiling; a missing folder is made later
        check_output_path(out, force=force, kind="output directory")
    loaded = load_for_partition(model, calibration)
    feeds = list(loaded.calibration) if loaded.calibration else loaded.verification_feeds
    singles = [{k: v[i:i + 1] for k, v in f.items()} for f in feeds
               for i in range(next(iter(f.values())).shape[0])]
    micro = stack_feeds([singles[i % len(singles)] for i in range(batch)])
    best, facts = plan(loaded.model, micro, singles[0], stages=stages, balance=balance,
                       max_stage_bytes=max_stage_bytes, threads=threads)
    check = _verify(loaded.model, best, loaded.verification_feeds)
    if not check["passed"]:  # before anything is written
        raise VerificationError(f"{out}: the pipelined outputs differ from the unpartitioned "
                                f"model's by {check['max_abs_diff']:.3g} (limit {check['limit']:.3g})")
    graph = loaded.model.graph
    pipeline = {
        "format": PIPELINE_FORMAT,
        "inputs": [v.name for v in graph.inputs],
        "outputs": [v.name for v in graph.outputs],
        "balance": balance, "max_stage_bytes": max_stage_bytes, **facts,
        "stages": [{"file": f"{STAGES_DIR}/stage{i}.onnx", **s.to_json()}
                   for i, s in enumerate(best.stages)],
        "spread": round(best.spread, 3),
    }
    with staged_dir(out, force=force) as root:
        (root / STAGES_DIR).mkdir()
        for entry, stage_model in zip(pipeline["stages"], best.models, strict=True):
            ir.save(stage_model, root / entry["file"])
        write_json(root / PIPELINE, pipeline)
        _plot(pipeline, root / "stage_times.png")
        manifest = {
            "slimgraph_manifest": 1, "kind": "pipeline", "source": loaded.source,
            "stages": len(best.stages), "balance": balance, "batch": batch, "threads": threads,
            "stage_measured_ms": [s.measured_ms for s in best.stages],
            "stage_weight_bytes": [s.weight_bytes for s in best.stages],
            "cut_bytes_per_sample": [s.out_bytes_per_sample for s in best.stages[:-1]],
            "spread": pipeline["spread"], "verification": check, "versions": package_versions(),
        }
        (root / "report.md").write_text(_report(pipeline, manifest))
        manifest["files"] = file_hashes(root)
        write_json(root / MANIFEST, manifest)
    return PartitionResult(out, pipeline, manifest)


def _verify(model: ir.Model, best, feeds: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Pipelined outputs against the unpartitioned model's, both on onnxruntime."""
    from slimgraph.backends.ort import session_for
    from slimgraph.parallel.cuts import run_stages

    whole = session_for(ir.to_proto(model).SerializeToString())
    names = [v.name for v in model.graph.outputs]
    worst = scale = 0.0
    for feed in feeds:
        want = whole.run(names, feed)
        got, _ = run_stages(best.models, best.stages, feed)
        for name, w in zip(names, want, strict=True):
            if np.issubdtype(w.dtype, np.floating):
                worst = max(worst, float(np.abs(got[name].astype(np.float64) - w).max()))
                scale = max(scale, float(np.abs(w).max()))
            else:
                worst = max(worst, float(np.any(got[name] != w)))
    limit = 1e-5 * max(1.0, scale)
    return {"feeds": len(feeds), "max_abs_diff": worst, "limit": limit, "passed": worst <= limit}


def _plot(pipeline: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    stages = pipeline["stages"]
    fig, ax = plt.subplots(figsize=(5, 3))
    x = np.arange(len(stages))
    ax.bar(x - 0.2, [s["measured_ms"] for s in stages], 0.4, label="measured (session alone)")
    ax.bar(x + 0.2, [s["ship_ms"] for s in stages], 0.4, label="ship to next (estimate)")
    ax.set_xticks(x, [f"stage {i}" for i in x])
    ax.set_ylabel(f"ms per micro-batch of {pipeline['batch']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def _report(pipeline: dict[str, Any], manifest: dict[str, Any]) -> str:
    check = manifest["verification"]
    lines = [f"# {manifest['source']['name']}: {len(pipeline['stages'])} pipeline stages", "",
             f"Balanced by {pipeline['balance']} for micro-batches of {pipeline['batch']}, "
             f"{pipeline['threads']} intra-op thread(s) per stage; slowest / fastest stage "
             f"{pipeline['spread']}x. Verification: pipelined outputs against the unpartitioned "
             f"model on {check['feeds']} feeds, max abs diff {check['max_abs_diff']:.3g} "
             f"({'passed' if check['passed'] else 'FAILED'}).", "",
             "| stage | nodes | inputs | outputs | forwarded | weight bytes | profiled ms | "
             "measured ms | bytes/sample to next | ship ms (est.) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, s in enumerate(pipeline["stages"]):
        lines.append(f"| {i} | {s['start']}-{s['end'] - 1} | {', '.join(s['inputs'])} | "
                     f"{', '.join(s['outputs'])} | {', '.join(s['forward']) or '-'} | "
                     f"{s['weight_bytes']:,} | {s['predicted_ms']} | {s['measured_ms']} | "
                     f"{s['out_bytes_per_sample']:,} | {s['ship_ms']} |")
    lines += ["", "![stage times](stage_times.png)", "",
              "Run it: `slimgraph run THIS_DIR --data IN.npz -o OUT.npz` (one actor per stage "
              "with Ray installed; in order in one process without).", ""]
    return "\n".join(lines)
