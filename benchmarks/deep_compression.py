"""deep_compression: sparsify + share-weights + fold-sparse + ``export --pack``, with and without heal.

Compression is counted as Deep Compression (Han, Mao & Dally, ICLR'16) counts it, on weights:
dense fp32 weight bytes / the bytes the weights take in the packed artifact (xz included). The
graph's own bytes (node protos, names) and the whole-file ratio are reported beside it. Rows:

- ``mlp`` (LeNet-300-100 class; bar >= 40x) and ``digits-cnn`` (LeNet-5 class; bar >= 39x), both
  at test accuracy within 0.5 pt of the float model on scikit-learn digits' 360-image test split.
  Each is exported by ``slimgraph.export(..., pack=True)`` twice: the pipeline as given, and the
  same pipeline with its heal stages taken out. The packed file is unpacked and loaded in a plain
  ``onnxruntime.InferenceSession``; its outputs are compared with the same graph with its weights
  stored dense (the artifact's model through fold-constants, which folds the decodes back) and
  both are timed, interleaved, at batch 1.
- ``2:4``: the N:M pattern checked, independently of the pass, on the mlp's Gemms and the
  digits-cnn's Convs (every 4 consecutive weights along the reduction axis hold at most 2).
- ``speed``: what unstructured and 2:4 sparsity do to onnxruntime's dense kernels on MiniLM
  (nothing: the same dense GEMMs run), at batch 1 and 16, interleaved with the dense model.
- ``minilm-2:4``: all-MiniLM-L6-v2 ``sparsify:0.5,pattern=2:4`` + heal: held-out cosine to the
  float embeddings before and after heal, ``model.onnx`` and packed sizes.
- ``gpu-2:4``: where a CUDA GPU is present, a Linear layer's 2:4 weight through torch's
  semi-structured sparse tensors against the dense one on MiniLM's FFN shapes; skipped otherwise.

    python benchmarks/deep_compression.py          # -> benchmarks/results/deep_compression.{json,md}
    python benchmarks/deep_compression.py --rows mlp,digits-cnn,2:4
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import tempfile
import time
from pathlib import Path

import heal as heal_bench  # benchmarks/heal.py: the MiniLM scorer and interleaved latency
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

import slimgraph
from slimgraph.artifact import package_versions
from slimgraph.backends.ort import serialize, session_for
from slimgraph.frontend.builtin import get_builtin
from slimgraph.heal.data import training_data
from slimgraph.passes import Pipeline
from slimgraph.timing import interleaved

RESULTS = Path(__file__).parent / "results"
NAME = "deep_compression"
ROWS = ("mlp", "digits-cnn", "2:4", "speed", "minilm-2:4", "gpu-2:4")
BAR = {"mlp": 40.0, "digits-cnn": 39.0}
MAX_DROP = 0.005  # test accuracy within 0.5 pt of float

_HEAL = "heal:steps=1500,lr=3e-3,alpha=0.5"
PIPELINES = {
    # One-shot per-layer pruning to 95%, heal, 4-bit codebooks (biases in them), heal the codebooks.
    "mlp": ["fold-constants", "sparsify:0.95", "heal:steps=3000,lr=3e-3,alpha=0.5",
            "share-weights:bits=4,biases=true", "heal:steps=1000,lr=1e-3,alpha=0.5",
            "fold-sparse"],
    # A 13.7k-weight CNN: iterative global pruning (60 -> 80 -> 90 -> 93%) with heal between, then
    # 4-bit codebooks for the convolutions and the last layer and 2-bit for the 98%-sparse fc1
    # (Han et al. also gave conv layers more bits than fc layers), heal the codebooks.
    "digits-cnn": ["fold-constants", "sparsify:0.6,scope=global", _HEAL,
                   "sparsify:0.8,scope=global", _HEAL, "sparsify:0.9,scope=global", _HEAL,
                   "sparsify:0.93,scope=global", _HEAL,
                   "share-weights:bits=4,biases=true,skip=classifier.1.weight",
                   "share-weights:bits=2,biases=true", "heal:steps=2000,lr=3e-3,alpha=0.5",
                   "fold-sparse"],
}
MINILM_24 = "fold-constants,sparsify:0.5,pattern=2:4"
MINILM_HEAL = "heal:steps=1000,lr=3e-4,hidden=1"
SESSION = {"allow_spinning": False, "intra_op_num_threads": 2}


def _accuracy(session: ort.InferenceSession, name: str) -> float:
    evaluation = get_builtin(name).evaluation()
    right = total = 0
    for feed, labels in zip(evaluation.feeds, evaluation.labels, strict=True):
        right += int((session.run(None, feed)[0].argmax(-1) == labels).sum())
        total += labels.size
    return right / total


def _outputs(session: ort.InferenceSession, name: str) -> np.ndarray:
    return np.concatenate([session.run(None, f)[0] for f in get_builtin(name).evaluation().feeds])


def _latency(models: dict[str, bytes], feed: dict[str, np.ndarray], rounds: int) -> dict:
    sessions = {k: session_for(m, SESSION) for k, m in models.items()}
    calls = {k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}
    lat = interleaved(calls, warmup=10, repeat=rounds)
    return {k: round(v.p50_ms, 4) for k, v in lat.items()}


def compress_row(name: str, heal: bool, rounds: int) -> dict:
    """Export ``name`` through its pipeline (or the pipeline less heal), packed, and measure it."""
    stages = [s for s in PIPELINES[name] if heal or not s.startswith("heal")]
    spec = ",".join(stages)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "artifact"
        start = time.perf_counter()
        slimgraph.export(name, out, passes=spec, pack=True, allow_mismatch=True)
        seconds = time.perf_counter() - start
        manifest = json.loads((out / "manifest.json").read_text())
        packed = (out / "model.onnx.xz").read_bytes()
    unpacked = lzma.decompress(packed)
    plain = ort.InferenceSession(unpacked, providers=["CPUExecutionProvider"])
    dense, _ = Pipeline.parse("fold-constants").run(ir.from_proto(
        onnx.load_model_from_string(unpacked)))
    dense_bytes = serialize(dense)
    dense_session = ort.InferenceSession(dense_bytes, providers=["CPUExecutionProvider"])
    float_session = ort.InferenceSession(serialize(slimgraph.load(name).model),
                                         providers=["CPUExecutionProvider"])
    diff = float(np.abs(_outputs(plain, name) - _outputs(dense_session, name)).max())
    feed = {k: v[:1] for k, v in get_builtin(name).evaluation().feeds[0].items()}
    latency = _latency({"packed": unpacked, "dense": dense_bytes}, feed, rounds)
    facts = manifest["pack"]
    accuracy, float_accuracy = _accuracy(plain, name), _accuracy(float_session, name)
    heal_notes = [n for p in manifest["passes"] if p["name"] == "heal" for n in p["notes"]
                  if "held-out" in n]
    return {
        "model": name, "passes": spec, "heal": heal, "export_seconds": round(seconds, 1),
        "float_accuracy": float_accuracy, "accuracy": accuracy,
        "accuracy_drop_pt": round(100 * (float_accuracy - accuracy), 2),
        "pack": facts, "max_abs_diff_to_dense": diff,
        "latency_batch1_ms": latency,
        "latency_ratio": round(latency["packed"] / latency["dense"], 3),
        "bar": BAR[name],
        "met": facts["weight_compression"] >= BAR[name]
        and float_accuracy - accuracy <= MAX_DROP + 1e-9,
        "sparsity": [n for p in manifest["passes"] if p["name"] == "sparsify"
                     for n in p["notes"]][-5:],
        "share": [n for p in manifest["passes"] if p["name"] == "share-weights"
                  for n in p["notes"]],
        "fold": [n for p in manifest["passes"] if p["name"] == "fold-sparse" for n in p["notes"]],
        "heal_notes": heal_notes,
    }


def _reduction_groups(node: ir.Node, w: np.ndarray) -> np.ndarray | None:
    """Groups of 4 consecutive weights along the reduction axis: a Conv's input channels (the
    innermost axis of an NHWC implicit GEMM), a Gemm's K. None where K is not a multiple of 4."""
    if node.op_type == "Conv":
        view = np.moveaxis(w, 1, -1)
    else:
        view = w if node.attributes.get_int("transB", 0) else w.T
    return None if view.shape[-1] % 4 else view.reshape(-1, 4)


def pattern_row() -> dict:
    """2:4 on real Gemm (mlp) and Conv (digits-cnn) weights, checked here, not by the pass."""
    result = {}
    for name in ("mlp", "digits-cnn"):
        model, _ = Pipeline.parse("fold-constants,sparsify:pattern=2:4").run(
            slimgraph.load(name).model)
        for node in model.graph:
            if node.op_type not in ("Conv", "Gemm") or node.inputs[1].const_value is None:
                continue
            w = node.inputs[1].const_value.numpy()
            groups = _reduction_groups(node, w)
            result[f"{name}/{node.name}"] = {
                "op": node.op_type, "shape": list(w.shape),
                "groups": 0 if groups is None else len(groups),
                "max_nonzero_per_4": None if groups is None else int((groups != 0).sum(1).max()),
                "sparsity": round(float(np.mean(w == 0)), 4)}
    return result


def speed_row(rounds: int) -> dict:
    """MiniLM dense against 90% unstructured and 2:4 sparse weights, stored dense: same kernels."""
    loaded = slimgraph.load("minilm")
    models = {"dense": serialize(Pipeline.parse("fold-constants").run(loaded.model.clone())[0])}
    for key, spec in (("unstructured 0.9", "fold-constants,sparsify:0.9"),
                      ("2:4", "fold-constants,sparsify:pattern=2:4")):
        models[key] = serialize(Pipeline.parse(spec).run(loaded.model.clone())[0])
    held_out = training_data(loaded).held_out  # padded batches of documentation sentences
    stacked = {k: np.concatenate([f[k] for f in held_out])[:16] for k in held_out[0]}
    out = {}
    for batch in (1, 16):
        feed = {k: v[:batch] for k, v in stacked.items()}
        ms = _latency(models, feed, rounds)
        out[f"batch {batch}"] = {k: {"ms": v, "ratio": round(v / ms["dense"], 3)}
                                 for k, v in ms.items()}
    return out


def minilm_row(steps_spec: str) -> dict:
    scorer = heal_bench.Scorer("minilm")
    sparse, _ = scorer.variant(MINILM_24)
    start = time.perf_counter()
    pipeline = Pipeline.parse(steps_spec)
    pipeline.bind_training(scorer.data)
    healed, (report,) = pipeline.run(sparse.clone())
    seconds = time.perf_counter() - start
    folded, _ = Pipeline.parse("fold-sparse").run(healed.clone())
    model_bytes = serialize(folded)
    packed = lzma.compress(model_bytes, preset=9 | lzma.PRESET_EXTREME)
    dense_bytes = len(serialize(scorer.float_model))
    return {
        "passes": MINILM_24, "heal": steps_spec, "heal_seconds": round(seconds, 1),
        "float": scorer.score(scorer.float_model), "before": scorer.score(sparse),
        "after": scorer.score(healed), "after_fold_sparse": scorer.score(folded),
        "float_model_bytes": dense_bytes, "model_onnx_bytes": len(model_bytes),
        "packed_bytes": len(packed), "training": scorer.data.source,
        "notes": report.notes,
    }


def gpu_row(rounds: int) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA GPU on this machine"}
    from torch.sparse import to_sparse_semi_structured

    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for tokens, d_in, d_out in ((16 * 128, 384, 1536), (16 * 128, 1536, 384), (8192, 4096, 4096)):
        weight = torch.randn(d_out, d_in, dtype=torch.float16, device="cuda")
        mask = torch.tensor([1, 1, 0, 0], dtype=torch.bool, device="cuda").tile(d_out, d_in // 4)
        dense = weight * mask
        sparse = to_sparse_semi_structured(dense)
        x = torch.randn(tokens, d_in, dtype=torch.float16, device="cuda")
        diff = float((torch.nn.functional.linear(x, sparse) - torch.nn.functional.linear(x, dense))
                     .abs().max())
        times = {}
        for key, w in (("dense", dense), ("2:4", sparse)):
            for _ in range(10):
                torch.nn.functional.linear(x, w)
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(rounds):
                torch.nn.functional.linear(x, w)
            end.record()
            torch.cuda.synchronize()
            times[key] = start.elapsed_time(end) / rounds
        out[f"{tokens}x{d_in}->{d_out}"] = {"dense_ms": round(times["dense"], 4),
                                            "sparse_ms": round(times["2:4"], 4),
                                            "speedup": round(times["dense"] / times["2:4"], 3),
                                            "max_abs_diff": diff}
    return out


def _markdown(results: dict) -> str:
    v, m = results["versions"], results["machine"]
    lines = [
        "# deep_compression: sparsify + share-weights + fold-sparse + --pack",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; onnxruntime {v.get('onnxruntime')}, torch "
        f"{v.get('torch')}. Weight compression = dense fp32 weight bytes / bytes of the weights in "
        "the packed (xz) artifact, as Deep Compression counts it; the graph's own bytes and the "
        "whole-file ratio beside it. Accuracy: scikit-learn digits test split (360 images). "
        "Reproduce: `python benchmarks/deep_compression.py`.",
        "",
    ]
    rows = results["rows"]
    table = [r for k, r in rows.items() if k.split("/")[0] in BAR]
    if table:
        lines += ["| model | heal | float top-1 | top-1 | drop (pt) | dense fp32 weights | packed "
                  "weights | **weight compression** | graph overhead | model.onnx | packed file "
                  "| file ratio | bar | met | max diff to dense | latency vs dense |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in table:
            p = r["pack"]
            lines.append(
                f"| {r['model']} | {'yes' if r['heal'] else 'no'} | {r['float_accuracy']:.4f} | "
                f"{r['accuracy']:.4f} | {r['accuracy_drop_pt']:+.2f} | "
                f"{p['dense_fp32_weight_bytes']:,} | {p['packed_weight_bytes']:,} | "
                f"**{p['weight_compression']}x** | {p['graph_overhead_bytes']:,} | "
                f"{p['model_onnx_bytes']:,} | {p['packed_bytes']:,} | {p['file_compression']}x | "
                f">= {r['bar']}x, <= 0.5 pt | {'yes' if r['met'] else 'no'} | "
                f"{r['max_abs_diff_to_dense']} | {r['latency_ratio']}x |")
        lines.append("")
        for r in table:
            lines.append(f"- {r['model']} ({'heal' if r['heal'] else 'no heal'}): `{r['passes']}`")
        lines.append("")
    if "2:4" in rows:
        lines += ["## 2:4 on real Conv and Gemm weights (checked by the benchmark)", "",
                  "| layer | op | shape | groups of 4 | max non-zeros per group | sparsity |",
                  "|---|---|---|---|---|---|"]
        for layer, r in rows["2:4"].items():
            worst = r["max_nonzero_per_4"]
            lines.append(f"| {layer} | {r['op']} | {r['shape']} | {r['groups']:,} | "
                         f"{'not a multiple of 4: left dense' if worst is None else worst} | "
                         f"{r['sparsity']} |")
        lines.append("")
    if "speed" in rows:
        lines += ["## Speed: sparsity does not make onnxruntime's dense kernels faster (MiniLM)", "",
                  "Weights stored dense with zeros; p50 latency, interleaved in one run, "
                  "2 intra-op threads, spinning off.", "",
                  "| batch | dense ms | unstructured 0.9 ms (ratio) | 2:4 ms (ratio) |",
                  "|---|---|---|---|"]
        for batch, r in rows["speed"].items():
            lines.append(f"| {batch} | {r['dense']['ms']} | {r['unstructured 0.9']['ms']} "
                         f"({r['unstructured 0.9']['ratio']}x) | {r['2:4']['ms']} "
                         f"({r['2:4']['ratio']}x) |")
        lines.append("")
    if "minilm-2:4" in rows:
        r = rows["minilm-2:4"]
        lines += ["## MiniLM 2:4 + heal", "",
                  f"`{r['passes']}` then `{r['heal']}` ({r['heal_seconds']} s), distilled on "
                  f"{r['training']}.", "",
                  "| | held-out cosine | everyday sentences cosine |", "|---|---|---|"]
        for key in ("float", "before", "after", "after_fold_sparse"):
            s = r[key]
            lines.append(f"| {key.replace('_', ' ')} | {s['held-out cosine']:.4f} | "
                         f"{s['everyday sentences cosine']:.4f} |")
        lines += ["", f"Sizes: float model.onnx {r['float_model_bytes']:,} bytes; 2:4 after "
                      f"fold-sparse {r['model_onnx_bytes']:,} bytes; packed (xz) "
                      f"{r['packed_bytes']:,} bytes.", ""]
    if "gpu-2:4" in rows:
        r = rows["gpu-2:4"]
        lines += ["## GPU 2:4 (torch semi-structured sparse against dense, fp16)", ""]
        if "skipped" in r:
            lines += [f"Skipped: {r['skipped']}.", ""]
        else:
            lines += [f"{r['device']}, torch {r['torch']}", "",
                      "| shape | dense ms | 2:4 ms | speed-up | max diff |", "|---|---|---|---|---|"]
            for k, s in r.items():
                if isinstance(s, dict):
                    lines.append(f"| {k} | {s['dense_ms']} | {s['sparse_ms']} | {s['speedup']}x | "
                                 f"{s['max_abs_diff']} |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--rounds", type=int, default=300, help="timed rounds for latency")
    parser.add_argument("--minilm-heal", default=MINILM_HEAL)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    path = args.out / f"{NAME}.json"
    results = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    results["versions"] = package_versions()
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    args.out.mkdir(parents=True, exist_ok=True)
    for row in args.rows.split(","):
        if row in BAR:
            for heal in (False, True):
                results["rows"][f"{row}/{'heal' if heal else 'no-heal'}"] = compress_row(
                    row, heal, args.rounds)
        elif row == "2:4":
            results["rows"][row] = pattern_row()
        elif row == "speed":
            results["rows"][row] = speed_row(args.rounds // 3)
        elif row == "minilm-2:4":
            results["rows"][row] = minilm_row(args.minilm_heal)
        elif row == "gpu-2:4":
            results["rows"][row] = gpu_row(args.rounds)
        else:
            raise SystemExit(f"unknown row {row!r}; rows: {', '.join(ROWS)}")
        path.write_text(json.dumps(results, indent=2) + "\n")  # saved after every row
        (args.out / f"{NAME}.md").write_text(_markdown(results))
    print(_markdown(results))


if __name__ == "__main__":
    main()
