"""host: this machine as a Device (CPU family, caches, measured memory bandwidth), the GPU it
was lent, and onnxruntime timed on it."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from slimgraph.advise.device import Device, _cpu_tops

HOST = "this-cpu"  # the machine advise runs on; no catalogue entry may take its name


def cpu_flags() -> tuple[str, set[str], dict[str, int]]:
    """Vendor, feature flags and cache sizes (bytes: l2 total, l3) of this machine's CPU."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    vendor, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id" and not vendor:
            vendor = value.strip()
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
    caches = {}
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(root.glob("index*")) if root.exists() else []:
        level = (index / "level").read_text().strip()
        size = (index / "size").read_text().strip()
        kind = (index / "type").read_text().strip()
        if kind == "Instruction" or not size.endswith("K"):
            continue
        caches[f"l{level}"] = int(size[:-1]) * 1024
    return vendor, flags, caches


def host_device(families: dict[str, dict]) -> Device | None:
    """This machine's CPU: the first family its vendor and flags match, at the family's boost
    clock on ``os.cpu_count()`` cores, with cache levels and a measured memory bandwidth."""
    vendor, flags, caches = cpu_flags()
    family = next((f for f in families.values()
                   if f.get("vendor", "") in ("", vendor) and set(f["match"]) <= flags
                   and not set(f.get("absent", [])) & flags), None)
    if family is None:
        return None
    cores = os.cpu_count() or 1
    ghz = family["boost_ghz"]
    per_cycle = family.get("cache_bytes_per_cycle", {})
    levels = []
    if "l2" in caches and "l2" in per_cycle:
        levels.append((caches["l2"] * cores, cores * per_cycle["l2"] * ghz))
    if "l3" in caches and "l3" in per_cycle:
        levels.append((caches["l3"], cores * per_cycle["l3"] * ghz))
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return Device(
        name=HOST, kind="cpu", backend="ort-cpu",
        tops=_cpu_tops(family, cores, ghz), memory_gbps=measure_bandwidth(cores),
        memory_gb=round(memory_gb, 1), price_per_hour=None,
        source=f"detected: {vendor}, flags {', '.join(sorted(set(family['match'])))}, {cores} "
               f"cores; per-cycle peaks and {ghz} GHz boost from cpu_family {family['name']!r} "
               f"({family['source']}); memory bandwidth measured (copy, {cores} threads)",
        caches=levels, here=True)


def measure_bandwidth(threads: int, megabytes: int = 256, repeat: int = 7) -> float:
    """DRAM bandwidth in GB/s on ``threads`` threads, each over its own ``megabytes / threads``
    and timed on its own (a thread that starts late does not dilute the others): the fastest of a
    copy (three times its size moves: read, read for ownership, write), an in-place scale (twice:
    read, write back) and a sum (once), best of ``repeat``. The fastest pattern is kept because the
    bound needs what a kernel can reach, not what numpy's copy does."""
    n = megabytes * 2**20 // 8 // threads
    pairs = [(np.ones(n), np.empty(n)) for _ in range(threads)]
    kernels = {3: lambda p: np.copyto(p[1], p[0]), 2: lambda p: np.multiply(p[0], 1.0, out=p[0]),
               1: lambda p: np.add.reduce(p[0])}

    def timed(kernel, pair) -> float:
        start = time.perf_counter()
        kernel(pair)
        return time.perf_counter() - start

    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for moved, kernel in kernels.items():
            for _ in range(repeat):
                seconds = list(pool.map(lambda p, k=kernel: timed(k, p), pairs))
                best = max(best, sum(moved * n * 8 / s for s in seconds) / 1e9)
    return round(best, 1)


def lent_gpu(catalogue: list[Device]) -> Device | None:
    """The catalogue entry of the NVIDIA GPU on this machine, if onnxruntime can use CUDA and
    ``nvidia-smi`` names a GPU the catalogue has."""
    import shutil
    import subprocess

    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers() or not shutil.which("nvidia-smi"):
        return None
    run = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False)
    return gpu_entry(run.stdout.splitlines()[0] if run.returncode == 0 and run.stdout else "",
                     catalogue)


def gpu_entry(reported: str, catalogue: list[Device]) -> Device | None:
    """The catalogue GPU whose model number (T4, L4, A10, A100, H100, H200) ``reported`` names."""
    words = reported.upper().replace("-", " ").split()
    for device in catalogue:
        parts = device.name.upper().split("-")
        if device.kind == "gpu" and len(parts) > 1 and parts[1] in words:
            return device
    return None


def measure_host(model_bytes: bytes, feed: dict[str, np.ndarray], repeat: int = 50,
                 providers: list[str] | None = None) -> float:
    """p50 ms of onnxruntime here (CPU by default: all cores, default graph optimisations)."""
    from slimgraph.backends.ort import inputs_of, session_for
    from slimgraph.timing import interleaved

    session = session_for(model_bytes, providers=providers)
    feed = inputs_of(session, feed)
    return interleaved({"m": lambda: session.run(None, feed)}, warmup=5, repeat=repeat)["m"].p50_ms
