"""plot: the roofline figure (roofline.png) of an Advice."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimgraph.advise.advice import Advice


def plot_roofline(advice: Advice, path: Path) -> Path | None:
    """Roofs of the top choices and this CPU, with the layers as points at their bounds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = np.logspace(-4, 4, 200)
    by_name = {f"{c.device.name} / {c.precision}": c for c in advice.ranked}
    for i, (key, bounds) in enumerate(advice.layers.items()):
        choice = by_name[key]
        peak = choice.device.tops[choice.precision] * 1e12
        line = ax.plot(xs, np.minimum(peak, xs * choice.device.memory_gbps * 1e9), "-",
                       linewidth=1.2, label=f"{key} roof")[0]
        if choice.device.caches:  # the fastest cache's roof, dotted
            ax.plot(xs, np.minimum(peak, xs * choice.device.caches[0][1] * 1e9), ":",
                    linewidth=1, color=line.get_color())
        points = [b for b in bounds if b.ops > 0 and b.bytes > 0 and b.seconds > 0]
        ax.scatter([b.intensity for b in points], [b.ops / b.seconds for b in points],
                   s=12, alpha=0.6, color=line.get_color(),
                   marker="os^vD"[i % 5], label=f"{key} layers at their bound")
        if choice.device.here and choice.precision == "fp32" and advice.host_layers:
            measured = {r["node"]: r["measured_ms"] for r in advice.host_layers}
            done = [(b, measured[b.node]) for b in points if measured.get(b.node)]
            ax.scatter([b.intensity for b, _ in done], [b.ops / (ms / 1e3) for b, ms in done],
                       s=14, facecolors="none", edgecolors="black", linewidths=0.6,
                       label=f"{key} layers as measured (profiler)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (operations / byte)")
    ax.set_ylabel("operations / s at the bound")
    # "$" would start matplotlib's mathtext, which fails on text that is not TeX: keep it literal.
    ax.set_title(f"{advice.model}, batch {advice.batch}: roofline".replace("$", r"\$"))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
