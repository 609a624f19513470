"""bench: every column filled, the same inputs for all rows, skips and flags."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slimgraph.bench import FP32, Row, bench, variant_pipeline
from slimgraph.bench.results import _ratios_and_flags
from slimgraph.cli import main
from slimgraph.errors import PipelineSpecError
from slimgraph.timing import Latency, interleaved


def test_bench_onnx_file_writes_all_outputs(tiny_cnn_path, tmp_path):
    out = tmp_path / "bench"
    result = bench(tiny_cnn_path, out, backends=["ort-cpu", "ort-cuda"],
                   variants=["fp32", "fold-constants"], batches=[1, 4], warmup=1, repeat=3,
                   workers=2, peers=[])
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.md", "pareto.png",
                                               "size.png"}
    ok = [r for r in result.rows if r.status == "ok"]
    assert {(r.variant, r.batch) for r in ok} == {(v, b) for v in ("fp32", "fold-constants")
                                                  for b in (1, 4)}
    for r in ok:
        assert r.latency.runs == 3 and r.latency.p50_ms > 0 and r.throughput > 0
        assert r.artifact_bytes > 0 and r.build_s is not None and r.peak_memory_mb is not None
        assert r.cosine > 0.9999 and r.max_abs_err < 1e-4
        assert r.workers == 2 and r.workers_throughput > 0 and r.workers_scaling > 0
    second = next(r for r in ok if r.variant == "fold-constants" and r.batch == 4)
    assert second.ratio_to_fp32 is not None
    skipped = [r for r in result.rows if r.backend == "ort-cuda"]
    if skipped and skipped[0].status == "skipped":
        assert skipped[0].reason
    data = json.loads((out / "results.json").read_text())
    assert data["machine"]["cores"] >= 1 and "onnxruntime" in data["machine"]["versions"]
    assert "| batch | variant | backend | p50 ms" in (out / "results.md").read_text()


@pytest.mark.slow
def test_bench_builtin_with_torch_peer_and_labels(tmp_path, capsys):
    code = main(["bench", "digits-cnn", "-o", str(tmp_path / "b"), "--repeat", "3", "--warmup",
                 "1", "--peers", "torch-eager", "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    backends = {r["backend"] for r in rows}
    assert backends == {"ort-cpu", "torch-eager"}
    for r in rows:  # every column filled, the torch peer's included
        assert r["task_accuracy"] is not None and r["task_accuracy"] > 0.9
        assert r["peak_memory_mb"] is not None and r["artifact_bytes"] > 0
    peer = next(r for r in rows if r["backend"] == "torch-eager")
    assert peer["peer"] and peer["ratio_to_fp32"] is not None


def _row(variant: str, p50: float, cosine: float = 1.0, backend: str = "ort-cpu",
         accuracy: float | None = None) -> Row:
    return Row(variant, backend, 1, latency=Latency(p50, p50, p50, 3), cosine=cosine,
               task_accuracy=accuracy)


def test_flags_int8_slower_pruned_not_faster_and_divergence():
    rows = [_row(FP32, 1.0), _row("quantize:int8", 1.2), _row("prune", 0.99, cosine=0.5)]
    pipelines = {FP32: variant_pipeline(FP32)}

    pipelines["quantize:int8"] = variant_pipeline("quantize:int8")
    pipelines["prune"] = variant_pipeline("prune-channels:ratio=0.5")
    _ratios_and_flags(rows, pipelines)
    assert rows[0].flags == [] and rows[0].ratio_to_fp32 is None
    assert rows[1].ratio_to_fp32 == pytest.approx(1.2)
    assert rows[1].flags == ["int8 not faster than fp32 (1.20x)"]
    assert rows[2].flags == ["pruned but not faster (0.99x)",
                             "outputs diverge from fp32 (cosine 0.5000)"]


def test_labelled_rows_are_flagged_by_task_accuracy_not_cosine():
    rows = [_row(FP32, 1.0, accuracy=0.99), _row("healed", 0.5, cosine=0.97, accuracy=0.985),
            _row("broken", 0.5, cosine=0.999, accuracy=0.95)]
    pipelines = {FP32: variant_pipeline(FP32), "healed": variant_pipeline("fold-constants"),
                 "broken": variant_pipeline("fold-constants")}
    _ratios_and_flags(rows, pipelines)
    assert rows[1].flags == []
    assert rows[2].flags == ["task accuracy 4.0 pt below fp32 (0.9500)"]


def test_interleaved_rotates_the_order():
    order = []
    calls = {k: (lambda k=k: order.append(k)) for k in "abc"}
    result = interleaved(calls, warmup=0, repeat=3)
    assert order == list("abcbcacab")
    assert all(lat.runs == 3 for lat in result.values())
    assert np.isfinite(result["a"].p50_ms)


def test_bad_variant_fails_before_work(tiny_cnn_path, tmp_path):
    with pytest.raises(PipelineSpecError, match="unknown pass"):
        bench(tiny_cnn_path, tmp_path / "b", variants=["fp32", "no-such-pass"])
    assert not (tmp_path / "b").exists()


def test_a_failed_memory_probe_leaves_the_cell_empty_and_other_errors_keep_their_type(monkeypatch):
    import subprocess
    import types

    import slimgraph.bench.peers as peers
    from slimgraph.bench.run import _peak_memory

    row = types.SimpleNamespace(artifact_dir="a", backend="ort-cpu")

    def child_failed(*args):
        raise subprocess.CalledProcessError(1, ["memprobe"])

    monkeypatch.setattr(peers, "probe_peak_memory", child_failed)
    assert _peak_memory(row, {}, None, 1) is None

    def bug(*args):
        raise AttributeError("a bug, not a failed probe")

    monkeypatch.setattr(peers, "probe_peak_memory", bug)
    with pytest.raises(AttributeError):
        _peak_memory(row, {}, None, 1)
