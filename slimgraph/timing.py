"""Fair timing: warm-up, interleaved rounds so drift hits every candidate alike, percentiles."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Hashable, Mapping

import numpy as np


@dataclasses.dataclass
class Latency:
    """Latency percentiles in milliseconds over ``runs`` timed calls."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    runs: int

    @classmethod
    def of(cls, seconds: list[float]) -> Latency:
        ms = np.asarray(seconds) * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(float(p50), float(p90), float(p99), len(seconds))


def interleaved(calls: Mapping[Hashable, Callable[[], object]], *, warmup: int, repeat: int,
                on_round: Callable[[], None] | None = None) -> dict[Hashable, Latency]:
    """Time every call ``repeat`` times in rotating round-robin order after ``warmup`` calls each.

    Round r starts at candidate r mod n, so no candidate is always first after another's caches.
    """
    keys = list(calls)
    for key in keys:
        for _ in range(warmup):
            calls[key]()
    samples: dict[Hashable, list[float]] = {k: [] for k in keys}
    for r in range(repeat):
        start = r % len(keys) if keys else 0
        for key in keys[start:] + keys[:start]:
            t0 = time.perf_counter()
            calls[key]()
            samples[key].append(time.perf_counter() - t0)
        if on_round:
            on_round()
    return {k: Latency.of(v) for k, v in samples.items()}


def parallel_throughput(calls: list[Callable[[], object]], batch: int, iterations: int) -> float:
    """Samples per second with one thread per call, each running ``iterations`` times at once.

    The runtimes release the GIL while they compute, so threads are real concurrent workers.
    """
    barrier = threading.Barrier(len(calls) + 1)

    def work(call: Callable[[], object]) -> None:
        call()  # warm
        barrier.wait()
        for _ in range(iterations):
            call()

    threads = [threading.Thread(target=work, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return len(calls) * iterations * batch / (time.perf_counter() - t0)
