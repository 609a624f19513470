"""report.md: the manifest's facts laid out for a person."""

from __future__ import annotations

from typing import Any


def _shape(value: dict[str, Any]) -> str:
    shape = value["shape"]
    return "?" if shape is None else "x".join(str(d) for d in shape)


def render_report(manifest: dict[str, Any]) -> str:
    src = manifest["source"]
    before, after = manifest["model"]["before"], manifest["model"]["after"]
    lines = [
        f"# slimgraph export: {src['name']}",
        "",
        f"Source: {src['kind']} `{src['name']}` (sha256 `{src['sha256'][:16]}…`)",
        f"Pipeline: `{manifest['pipeline'] or '(none)'}`",
        "",
        "## Model",
        "",
        "| | nodes | params | weight bytes |",
        "|---|---:|---:|---:|",
        f"| before | {before['nodes']} | {before['params']:,} | {before['weight_bytes']:,} |",
        f"| after | {after['nodes']} | {after['params']:,} | {after['weight_bytes']:,} |",
        "",
        "| input/output | name | dtype | shape |",
        "|---|---|---|---|",
    ]
    for kind in ("inputs", "outputs"):
        for v in manifest[kind]:
            lines.append(f"| {kind[:-1]} | `{v['name']}` | {v['dtype']} | {_shape(v)} |")
    if "pack" in manifest:
        p = manifest["pack"]
        lines += ["", "## Packed", "",
                  f"`{p['file']}` ({p['codec']}; unpack: `{p['unpack']}`): weights dense fp32 "
                  f"{p['dense_fp32_weight_bytes']:,} bytes, stored {p['stored_weight_bytes']:,}, "
                  f"packed {p['packed_weight_bytes']:,} ({p['weight_compression']}x); graph "
                  f"overhead {p['graph_overhead_bytes']:,}; model.onnx {p['model_onnx_bytes']:,}; "
                  f"packed file {p['packed_bytes']:,} ({p['file_compression']}x)."]
    if manifest["passes"]:
        lines += ["", "## Passes", "", "| pass | modified | nodes | what it did |",
                  "|---|---|---|---|"]
        for r in manifest["passes"]:
            did = ", ".join(f"{k}: {v}" for k, v in sorted(r["counts"].items())) or "-"
            lines.append(
                f"| `{r['name']}` | {r['modified']} | {r['nodes_before']} → {r['nodes_after']} "
                f"| {did} |"
            )
        notes = [f"- `{r['name']}`: {note}" for r in manifest["passes"] for note in r["notes"]]
        if notes:
            lines += ["", *notes]
    tol = manifest["tolerance"]
    lines += [
        "",
        "## Verification",
        "",
        f"Against the float reference; tolerance: max relative error ≤ {tol['max_rel_err']:g}, "
        f"cosine ≥ {tol['min_cosine']:g}, top-1 agreement ≥ {tol['min_top1']:g} "
        "(top-1 binding for classifiers only).",
        "",
        "| backend | output | samples | max abs err | max rel err | cosine | top-1 | result |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, entry in manifest["backends"].items():
        ver = entry["verification"]
        if "skipped" in ver:
            lines.append(f"| {name} | - | - | - | - | - | - | NOT RUN: {ver['skipped']} |")
            continue
        for m in ver["outputs"]:
            top1 = "-" if m["top1_agreement"] is None else f"{m['top1_agreement']:.4f}"
            lines.append(
                f"| {name} | `{m['name']}` | {ver['samples']} | {m['max_abs_err']:.3g} | "
                f"{m['max_rel_err']:.3g} | {m['cosine']:.6f} | {top1} | "
                f"{'pass' if ver['passed'] else 'FAIL'} |"
            )
        for failure in ver["failures"]:
            lines.append(f"\n**{name}**: {failure}")
    for name, entry in manifest["backends"].items():
        if entry["options"].get("untuned"):
            lines.append(f"\n**{name}**: untuned build (default schedules): measured 2-90x slower "
                         "than onnxruntime on CPU; export with `tune=N` to tune it.")
    for name, entry in manifest["backends"].items():
        if entry.get("report"):
            lines += ["", f"## {name}", "", *entry["report"]]
    lines += ["", "## Versions", ""]
    lines += [f"- {k} {v}" for k, v in sorted(manifest["versions"].items())]
    return "\n".join(lines) + "\n"
