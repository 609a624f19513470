"""The speed guard's timing: the quantized model's latency against the float one's in
onnxruntime, and where the time goes when int8 is not faster."""

from __future__ import annotations

import time

import onnx_ir as ir

from slimgraph.backends.ort import inputs_of, serialize
from slimgraph.calibration import Feeds

SPEED_BUDGET_S = 1.5  # seconds of timed calls the speed guard spends
_SPEED_MIN_ROUNDS, _SPEED_MAX_ROUNDS = 15, 2000
_SPEED_SESSION = {"allow_spinning": False, "intra_op_num_threads": 2}  # timed and profiled alike


def latency_ratio(float_model: ir.Model, quantized: ir.Model, feed: Feeds,
                  budget_s: float = SPEED_BUDGET_S) -> float:
    """Median quantized latency over median float latency, one call of each at a time in
    rotating order for about ``budget_s`` (onnxruntime CPU, no spinning): the method of
    ``slimgraph bench``, so the guard and bench agree.

    Long runs of one session before the other read differently: on the 35 us digits-cnn, blocks
    of ~500 back-to-back calls put int8/fp32 at 0.95x on a busy machine where single calls
    alternating read 0.63x (and bench agreed).
    """
    from slimgraph.backends.ort import session_for
    from slimgraph.timing import interleaved

    sessions = [session_for(serialize(m), _SPEED_SESSION) for m in (float_model, quantized)]
    inputs = [inputs_of(s, feed) for s in sessions]
    pairs = list(zip(sessions, inputs, strict=True))
    once = max(min(_time_once(s, x), _time_once(s, x)) for s, x in pairs)  # the first call is cold
    rounds = int(min(_SPEED_MAX_ROUNDS, max(_SPEED_MIN_ROUNDS, budget_s / (2 * max(once, 1e-6)))))
    calls = {i: (lambda s=s, x=x: s.run(None, x)) for i, (s, x) in enumerate(pairs)}
    latency = interleaved(calls, warmup=5, repeat=rounds)
    return latency[1].p50_ms / latency[0].p50_ms


def kernel_summary(model: ir.Model, feed: Feeds, top: int = 4) -> str:
    """The costliest op types of ``model`` in onnxruntime's profiler, as onnxruntime fused them."""
    from slimgraph.backends.ort import kernel_time_by_op

    per_op = kernel_time_by_op(serialize(model), feed, config=_SPEED_SESSION)
    return ", ".join(f"{op} {us:.0f} us" for op, us in list(per_op.items())[:top])


def _time_once(session, feed: Feeds) -> float:
    start = time.perf_counter()
    session.run(None, feed)
    return time.perf_counter() - start
