"""Machine facts recorded with every benchmark: CPU model and SIMD flags, cores, versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# The flags that decide which int8/fp32 kernels a runtime picks.
INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                     "avx512_bf16", "amx_int8", "amx_bf16", "asimddp", "sve")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts(threads: int) -> dict[str, Any]:
    from slimgraph.artifact import package_versions

    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cpu_flags": sorted(f for f in INTERESTING_FLAGS if f in flags),
        "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}),
        "cores": os.cpu_count(),
        "cores_usable": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else os.cpu_count()),
        "threads": threads,
        "versions": package_versions(),
    }
