"""results.md and the plots (latency-vs-accuracy Pareto front, artifact size bars)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slimgraph.bench.results import BenchResult, Row


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render_markdown(result: BenchResult) -> str:
    m = result.machine
    s = result.settings
    lines = [
        f"# slimgraph bench: {result.model}",
        "",
        f"Machine: {m['cpu']} ({m['machine']}), {m['cores']} cores, {s['threads']} threads, "
        f"flags: {', '.join(m['cpu_flags']) or 'none'}.",
        f"Timing: {s['warmup']} warm-up runs, then {s['repeat']} interleaved rounds; medians. "
        "Ratios are to fp32 on the same backend and batch, in this run.",
        "",
        "| batch | variant | backend | p50 ms | p90 ms | p99 ms | samples/s | vs fp32 | build s "
        "| bytes | peak MiB | cosine | max abs err | top-1 agr. | task acc. | flags |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result.rows:
        name = f"{r.variant} (peer)" if r.peer else r.variant
        if r.status != "ok":
            lines.append(f"| {r.batch} | {name} | {r.backend} | {r.status}: {r.reason} "
                         "| | | | | | | | | | | | |")
            continue
        lat = r.latency
        lines.append(
            f"| {r.batch} | {name} | {r.backend} | {lat.p50_ms:.3f} | {lat.p90_ms:.3f} | "
            f"{lat.p99_ms:.3f} | {_f(r.throughput, ',.0f')} | {_f(r.ratio_to_fp32, '.2f')} | "
            f"{_f(r.build_s, '.2f')} | {_f(r.artifact_bytes, ',')} | "
            f"{_f(r.peak_memory_mb, '.1f')} | {_f(r.cosine, '.5f')} | "
            f"{_f(r.max_abs_err, '.3g')} | {_f(r.top1_agreement, '.4f')} | "
            f"{_f(r.task_accuracy, '.4f')} | {'; '.join(r.flags)} |"
        )
    workers = [r for r in result.rows if r.workers_throughput is not None]
    if workers:
        lines += ["", f"## Data-parallel throughput, {s['workers']} workers", "",
                  "| batch | variant | backend | samples/s | scaling vs 1 |", "|---:|---|---|---:|---:|"]
        for r in workers:
            lines.append(f"| {r.batch} | {r.variant} | {r.backend} | {r.workers_throughput:,.0f} | "
                         f"{r.workers_scaling:.2f}x |")
    flagged = [r for r in result.rows if r.flags]
    if flagged:
        lines += ["", "## Flags", ""]
        lines += [f"- batch {r.batch}, {r.variant} on {r.backend}: {'; '.join(r.flags)}"
                  for r in flagged]
    lines += ["", "Plots: `pareto.png` (latency vs accuracy), `size.png` (artifact bytes).", "",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(m["versions"].items()))]
    return "\n".join(lines) + "\n"


def _accuracy_of(r: Row) -> float | None:
    return r.task_accuracy if r.task_accuracy is not None else r.cosine


def render_plots(result: BenchResult, root: Path) -> list[Path]:
    """Write pareto.png and size.png; returns the files written (none if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    ok = [r for r in result.rows if r.status == "ok" and _accuracy_of(r) is not None]
    written = []
    if ok:
        batches = sorted({r.batch for r in ok})
        fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
        use_task = all(r.task_accuracy is not None for r in ok)
        for ax, batch in zip(axes[0], batches, strict=True):
            pts = [r for r in ok if r.batch == batch]
            for r in pts:  # a legend, not annotations: near-equal points would overprint
                ax.scatter(r.latency.p50_ms, _accuracy_of(r), marker="s" if r.peer else "o",
                           s=40, label=f"{r.variant} / {r.backend}" + (" (peer)" if r.peer else ""))
            front = _pareto(pts)
            ax.plot([r.latency.p50_ms for r in front], [_accuracy_of(r) for r in front], "--",
                    color="gray", linewidth=1)
            ax.set_xscale("log")
            ax.set_xlabel("p50 latency (ms, log)")
            ax.set_ylabel("task accuracy" if use_task else "cosine to fp32")
            ax.set_title(f"{result.model}, batch {batch}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(root / "pareto.png", dpi=110)
        plt.close(fig)
        written.append(root / "pareto.png")
    sized = {}
    for r in result.rows:
        if r.status == "ok" and r.artifact_bytes:
            sized[f"{r.variant}\n{r.backend}"] = r.artifact_bytes
    if sized:
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(sized)), 4))
        ax.bar(list(sized), [b / 1024 for b in sized.values()])
        ax.set_ylabel("artifact KiB")
        ax.set_title(f"{result.model}: artifact size")
        ax.tick_params(axis="x", labelsize=7)
        fig.tight_layout()
        fig.savefig(root / "size.png", dpi=110)
        plt.close(fig)
        written.append(root / "size.png")
    return written


def _pareto(rows: list[Row]) -> list[Row]:
    """Rows no other row beats on both latency and accuracy, by increasing latency."""
    front, best = [], float("-inf")
    for r in sorted(rows, key=lambda r: r.latency.p50_ms):
        if _accuracy_of(r) > best:
            front.append(r)
            best = _accuracy_of(r)
    return front
