"""quantize: QuantizeLinear/DequantizeLinear insertion (int8 static or dynamic, int4, binary).

The modes and their math live beside their code: ``int8`` (calibrated QDQ placement, per-channel
weights, dynamic activations), ``smooth`` (SmoothQuant migration before int8), ``weight_only``
(int4 blocks, binary signs), ``calibrate`` (activation statistics), ``divergence`` (where a
quantized model first leaves the float one). This module holds the pass: options, the accuracy
guard and the speed guard.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from slimgraph.calibration import Feeds, split_held_out
from slimgraph.passes.base import SlimgraphPass
from slimgraph.passes.quantize.calibrate import (
    channel_absmax,
    channel_statistics,
    collect_ranges,
    inputs_of,
    serialize,
    values_by_name,
)
from slimgraph.passes.quantize.divergence import Divergence, first_divergence
from slimgraph.passes.quantize.embedding import embedding_tables, quantize_embeddings
from slimgraph.passes.quantize.int8 import (
    WEIGHT_SCALES,
    Int8Target,
    QParams,
    activation_qparams,
    apply_dynamic,
    apply_static,
    cpu_flags,
    int8_target,
    place,
    quantize_weight,
)
from slimgraph.passes.quantize.layers import (
    Counts,
    is_float_activation,
    quantizable_layers,
    weight_axis,
)
from slimgraph.passes.quantize.smooth import (
    alpha_factors,
    search_factors,
    smooth_layers,
    smoothing_groups,
)
from slimgraph.passes.quantize.weight_only import (
    BINARY_WEIGHT_TAG,
    apply_weight_only,
    binary_weight,
    pack_signs,
    quantize_int4_blocks,
    unpack_signs,
)
from slimgraph.passes.report import Tolerance

logger = logging.getLogger(__name__)

MODES = ("int8", "int4", "binary")
BLOCK_SIZES = (32, 64, 128)
INT4_FORMATS = ("qdq", "nbits")
CALIBRATORS = ("minmax", "percentile", "entropy")
ACTIVATION_TYPES = ("auto", "u8", "s8")
INT8_TOLERANCE = Tolerance(max_rel_err=0.25, min_cosine=0.99, min_top1=0.97)
INT4_TOLERANCE = Tolerance(max_rel_err=0.5, min_cosine=0.97, min_top1=0.9)
# Binary weights without retraining keep little of a model's function: verification records the
# metrics but nothing is enforced (recovery by fine-tuning is a separate step).
BINARY_TOLERANCE = Tolerance(max_rel_err=1e9, min_cosine=-1.0, min_top1=0.0)
_SPEED_BUDGET_S = 1.5  # seconds of timed calls the speed guard spends
_SPEED_MIN_ROUNDS, _SPEED_MAX_ROUNDS = 15, 2000
_SPEED_SESSION = {"allow_spinning": False, "intra_op_num_threads": 2}  # timed and profiled alike
_SEARCH_ROWS = 1024  # calibration rows per smoothed input that smooth=auto scores candidates on


# ---------------------------------------------------------------------------------------------
# The pass.


class InsertQDQPass(SlimgraphPass):
    """Quantizes a model: ``int8`` static (calibrated QDQ) or ``dynamic=true``, ``int4``, ``binary``.

    ``smooth=ALPHA`` migrates activation outliers into MatMul/Gemm weights first (SmoothQuant,
    exact in float); ``smooth=auto`` picks the factors per layer group by measured error (see
    ``smooth``). ``tolerance=`` (a minimum cosine to the float model on held-out calibration
    samples) turns on the accuracy guard: layers are ranked by the error each causes alone and the
    worst stay float (at most ``max_float`` of them) until the tolerance holds; if it cannot hold,
    the report names the first tensor where the quantized and float models diverge.
    ``speed_check`` times the result against the float model in onnxruntime and warns in the
    report when int8 is not faster. ``format=nbits`` writes int4 layers as onnxruntime's
    com.microsoft MatMulNBits instead of blocked DequantizeLinear + MatMul. ``weight_scales``
    (static int8): ``channel``, ``tensor``, or ``auto`` (one scale where per-channel gains nothing,
    see ``int8``). ``acts=binary`` (binary mode) feeds each binary layer ``Sign(x)`` (XNOR nets).
    ``embeddings``: ``int8`` (default, every mode) stores Gather tables such as token embeddings as
    int8 rows with per-row scales (see ``embedding``); ``float`` leaves them.
    """

    name = "quantize"
    tolerance: ClassVar[Tolerance] = INT8_TOLERANCE
    needs_calibration = True

    def __init__(
        self,
        mode: str = "int8",
        *,
        dynamic: bool = False,
        calib: str = "percentile",
        percentile: float = 99.999,
        activations: str = "auto",
        reduce_range: bool | None = None,
        tolerance: float | None = None,
        exclude: list[str] | None = None,
        speed_check: bool = True,
        block: int = 32,
        smooth: float | str | None = None,
        max_float: int | None = None,
        format: str = "qdq",
        weight_scales: str = "auto",
        acts: str = "float",
        embeddings: str = "int8",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
        if calib not in CALIBRATORS:
            raise ValueError(f"unknown calib {calib!r}; valid: {', '.join(CALIBRATORS)}")
        if activations not in ACTIVATION_TYPES:
            raise ValueError(f"unknown activations {activations!r}; valid: {', '.join(ACTIVATION_TYPES)}")
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        if tolerance is not None and not 0.0 < tolerance <= 1.0:
            raise ValueError(f"tolerance is a minimum cosine in (0, 1], got {tolerance}")
        if weight_scales not in WEIGHT_SCALES:
            raise ValueError(f"unknown weight_scales {weight_scales!r}; valid: {', '.join(WEIGHT_SCALES)}")
        if format not in INT4_FORMATS:
            raise ValueError(f"unknown format {format!r}; valid: {', '.join(INT4_FORMATS)}")
        if format != "qdq" and mode != "int4":
            raise ValueError("format=nbits (com.microsoft MatMulNBits) applies to int4 only")
        if smooth is not None and smooth != "auto" and not (
                isinstance(smooth, (int, float)) and 0.0 < smooth <= 1.0):
            raise ValueError(f"smooth is the SmoothQuant migration strength in (0, 1] or auto, "
                             f"got {smooth!r}")
        if max_float is not None and max_float < 0:
            raise ValueError(f"max_float is a number of layers >= 0, got {max_float}")
        if dynamic and activations == "s8":
            raise ValueError("dynamic=true quantizes activations to uint8 (DynamicQuantizeLinear)")
        self.mode = mode
        self.dynamic = dynamic
        self.calib = calib
        self.percentile = percentile
        self.activations = activations
        self.reduce_range = reduce_range
        self.tolerance = (
            INT8_TOLERANCE if tolerance is None
            else dataclasses.replace(INT8_TOLERANCE, min_cosine=min(tolerance, INT8_TOLERANCE.min_cosine))
        )
        self.guard_cosine = tolerance
        self.exclude = list(exclude or [])
        if block not in BLOCK_SIZES:
            raise ValueError(f"block must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block}")
        if mode != "int8" and (dynamic or activations != "auto" or reduce_range is not None
                               or weight_scales != "auto"):
            raise ValueError(f"mode {mode!r} is weight-only: dynamic, activations, reduce_range "
                             "and weight_scales apply to int8")
        if mode == "binary" and smooth is not None:
            raise ValueError("smooth applies to int8 and int4: binary weights keep one scale per "
                             "output channel, which a per-input-channel smoothing would break")
        self.block = block
        self.weight_scales = weight_scales
        if acts not in ("float", "binary"):
            raise ValueError(f"unknown acts {acts!r}; valid: float, binary")
        if acts == "binary" and mode != "binary":
            raise ValueError("acts=binary (sign activations, XNOR networks) applies to mode binary")
        self.acts = acts
        if embeddings not in ("int8", "float"):
            raise ValueError(f"unknown embeddings {embeddings!r}; valid: int8, float")
        self.embeddings = embeddings
        self.format = format
        self.speed_check = speed_check
        self.smooth = smooth
        self.max_float = max_float
        self.needs_calibration = (
            (mode == "int8" and not dynamic) or tolerance is not None or smooth is not None
        )
        if mode == "int4":
            self.tolerance = INT4_TOLERANCE if tolerance is None else dataclasses.replace(
                INT4_TOLERANCE, min_cosine=tolerance)
        elif mode == "binary":
            self.tolerance = BINARY_TOLERANCE if tolerance is None else dataclasses.replace(
                BINARY_TOLERANCE, min_cosine=tolerance)
        super().__init__()

    def options(self) -> dict:
        opts = super().options()
        opts["tolerance"] = self.guard_cosine
        return opts

    def target(self) -> Int8Target:
        """The int8 kernels aimed at: from the options, else from this CPU's flags."""
        detected = int8_target(cpu_flags())
        activations = {"u8": ir.DataType.UINT8, "s8": ir.DataType.INT8}.get(
            self.activations, detected.activations
        )
        if self.dynamic:
            activations = ir.DataType.UINT8
        reduce_range = detected.reduce_range if self.reduce_range is None else self.reduce_range
        reason = detected.reason if (self.activations == "auto" and self.reduce_range is None) else "as asked"
        return Int8Target(activations, reduce_range, reason)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not quantizable_layers(model, _dtypes(model)):
            self.report.notes.append("nothing to quantize: no Conv/Gemm/MatMul with a constant weight")
            return ir.passes.PassResult(model, False)
        if self.mode == "int4" and self.format == "qdq" and model.opset_imports.get("", 1) < 21:
            from onnxscript.version_converter import convert_version

            # Blocked DequantizeLinear with INT4 weights exists from opset 21 on.
            self.report.notes.append(f"opset {model.opset_imports.get('', 1)} -> 21 for int4 weights")
            convert_version(model, 21)
        dtypes = _dtypes(model)
        layers = quantizable_layers(model, dtypes)
        target = self.target()
        if self.mode == "int8":
            self.report.notes.append(f"int8 target: {target.describe()}")
        tables = {n.name for n in embedding_tables(model.graph)}
        unknown = sorted(set(self.exclude) - set(layers) - tables)
        if unknown:
            self.report.notes.append(f"exclude: no quantizable layer named {', '.join(unknown)}")
        timed = self.speed_check and self.mode == "int8"
        float_model = model.clone() if (timed or self.guard_cosine is not None) else None
        feeds = list(self.calibration) if self.calibration is not None else []
        calib_feeds, held_out = split_held_out(feeds)
        if self.smooth is not None:
            dtypes = self._smooth(model, set(layers) - set(self.exclude), calib_feeds)

        ranges: dict[str, tuple[float, float]] = {}
        static = self.mode == "int8" and not self.dynamic
        if static:
            wanted = _range_candidates(model, dtypes, set(self.exclude))
            ranges = collect_ranges(model, wanted, calib_feeds, self.calib, self.percentile)

        def build(keep_float: set[str], into: ir.Model) -> Counts:
            if self.mode != "int8":
                counts = apply_weight_only(into, self.mode, self.block, keep_float,
                                           self.format == "nbits", self.acts == "binary")
            elif self.dynamic:
                counts = apply_dynamic(into, dtypes, target, keep_float)
            else:
                counts = apply_static(into, dtypes, ranges, target, keep_float, self.weight_scales)
            if self.embeddings == "int8":
                counts.embeddings = quantize_embeddings(into.graph, keep_float)
            return counts

        keep_float = set(self.exclude)
        if self.guard_cosine is not None:
            keep_float = self._guard(model, build, keep_float, layers, held_out, dtypes)
        counts = build(keep_float, model)
        self.report.count("layers_quantized", counts.layers)
        self.report.count("layers_float", len([x for x in layers if x in keep_float]))
        if counts.embeddings:
            self.report.count("embeddings_quantized", counts.embeddings)
        if static:
            self.report.count("joins_quantized", counts.joins)
            self.report.count("relus_folded", counts.relus_folded)
            self.report.count("qdq_pairs", counts.qdq_pairs)
            self.report.count("biases_quantized", counts.biases)
        untouched = {"dynamic": "Conv", "int4": "Conv"}.get("dynamic" if self.dynamic else self.mode)
        convs = sum(1 for n in model.graph if n.op_type == "Conv") if untouched else 0
        if convs and self.dynamic:
            self.report.notes.append(
                f"dynamic: {convs} Conv node(s) stay float (onnxruntime has no u8s8 ConvInteger "
                "kernel on CPU); use static int8 for CNNs"
            )
        elif convs:
            self.report.notes.append(f"int4: {convs} Conv node(s) stay float (int4 is for MatMul/Gemm)")
        if timed and float_model is not None and counts.layers:
            self._speed_guard(float_model, model, held_out or feeds)
        logger.info("quantize: %s", self.report.counts)
        return ir.passes.PassResult(model, counts.layers > 0)

    def _smooth(self, model: ir.Model, layers: set[str], feeds: list[Feeds]) -> dict[str, ir.DataType]:
        """SmoothQuant the MatMul/Gemm layers in place; returns the element types of the new graph."""
        assert self.smooth is not None
        if not feeds:
            raise ValueError("smooth= needs calibration samples (per-channel activation maxima)")
        groups = smoothing_groups(model.graph, layers)
        names = [x.name for x in groups]
        if self.smooth == "auto":
            absmax, samples = channel_statistics(model, names, feeds, sample_rows=_SEARCH_ROWS)
            factors, chosen = search_factors(groups, absmax, samples, self._dequantized,
                                             quantize_inputs=self.mode == "int8")
            picked = Counter(kind.split()[0] for kind in chosen.values())
            how = "auto (" + ", ".join(f"{k} {n}" for k, n in sorted(picked.items())) + " of the groups)"
        else:
            factors = alpha_factors(groups, channel_absmax(model, names, feeds), self.smooth)
            how = f"alpha {self.smooth:g}"
        smoothed = smooth_layers(model, groups, factors)
        self.report.count("layers_smoothed", smoothed)
        moved = sum(1 for x in groups if x in factors and not np.all(factors[x] == 1.0))
        self.report.notes.append(
            f"smooth: {how}, {smoothed} MatMul/Gemm layer(s) behind {moved} Mul node(s)"
        )
        return _dtypes(model)

    def _dequantized(self, weight: np.ndarray) -> np.ndarray:
        """A [K, N] weight quantized about as this mode will, and decoded (for ``smooth=auto``).

        int4 rounds with the plain ``max|block| / 7`` scales here: the clip search of
        ``quantize_int4_blocks`` would make ``smooth=auto`` 3x slower for the same choices.
        """
        if self.mode == "int4":
            q, scales = quantize_int4_blocks(weight, 0, self.block, search=False)
            return q.astype(np.float64) * np.repeat(scales, self.block, axis=0)[: weight.shape[0]]
        q, scales = quantize_weight(weight, 1, self.target().reduce_range)
        return q.astype(np.float64) * scales[None, :]

    def _guard(self, model, build, keep_float: set[str], layers: list[str],
               held_out: list[Feeds], dtypes: dict[str, ir.DataType]) -> set[str]:
        """Keep the most sensitive layers float until the held-out cosine reaches the tolerance."""
        threshold = self.guard_cosine
        assert threshold is not None
        if not held_out:
            raise ValueError("the accuracy guard (tolerance=) needs calibration samples")
        reference = _run_all(model, held_out)

        def cosine(keep: set[str]) -> float:
            candidate = model.clone()
            build(keep, candidate)
            return _min_cosine(reference, _run_all(candidate, held_out))

        score = cosine(keep_float)
        self.report.notes.append(f"accuracy guard: all layers int8 -> cosine {score:.5f}")
        if score >= threshold:
            return keep_float
        active = [x for x in layers if x not in keep_float]
        errors = {x: 1.0 - cosine(set(layers) - {x}) for x in active}
        ranked = sorted(active, key=lambda x: -errors[x])
        self.report.notes.append(
            "layer sensitivity (1 - cosine, alone): "
            + ", ".join(f"{x}={errors[x]:.3g}" for x in ranked)
        )
        fallen: list[str] = []
        budget = len(ranked) if self.max_float is None else self.max_float
        for layer in ranked[:budget]:
            keep_float = keep_float | {layer}
            fallen.append(layer)
            score = cosine(keep_float)
            if score >= threshold:
                break
        verdict = "holds" if score >= threshold else "STILL MISSED"
        self.report.notes.append(
            f"accuracy guard: kept float {', '.join(fallen) or 'nothing'} -> cosine {score:.5f}, "
            f"tolerance {threshold:g} {verdict}"
            + (f" (max_float={self.max_float})" if len(fallen) == budget < len(ranked) else "")
        )
        if score < threshold:
            candidate = model.clone()
            build(keep_float, candidate)
            first = first_divergence(model, candidate, held_out, dtypes, threshold)
            where = first.describe() if first else "no single tensor below the tolerance"
            self.report.notes.append(f"WARNING: accuracy guard: tolerance {threshold:g} missed; "
                                     f"first diverging tensor: {where}")
            logger.warning("quantize: tolerance %g missed; first diverging tensor: %s", threshold, where)
        return keep_float

    def _speed_guard(self, float_model: ir.Model, model: ir.Model, feeds: list[Feeds]) -> None:
        from slimgraph.frontend import random_feeds

        feed = feeds[0] if feeds else random_feeds(float_model, batch=1)
        ratio = latency_ratio(float_model, model, feed)
        logger.info("quantize: int8/fp32 latency %.3fx", ratio)
        if ratio >= 1.0:
            warning = (
                f"WARNING: speed guard: the int8 model is NOT faster than fp32 in onnxruntime here "
                f"(int8/fp32 latency {ratio:.2f}x); where the time goes, per run: "
                f"{_kernel_summary(model, feed)} (int8) vs {_kernel_summary(float_model, feed)} (fp32)"
            )
            logger.warning("quantize: %s", warning)
            self.report.notes.append(warning)
        else:
            self.report.notes.append(f"speed guard: int8/fp32 latency {ratio:.2f}x in onnxruntime")


def latency_ratio(float_model: ir.Model, quantized: ir.Model, feed: Feeds,
                  budget_s: float = _SPEED_BUDGET_S) -> float:
    """Median quantized latency over median float latency, one call of each at a time in
    rotating order for about ``budget_s`` (onnxruntime CPU, no spinning): the method of
    ``slimgraph bench``, so the guard and bench agree.

    Long runs of one session before the other read differently: on the 35 us digits-cnn, blocks
    of ~500 back-to-back calls put int8/fp32 at 0.95x on a busy machine where single calls
    alternating read 0.63x (and bench agreed).
    """
    from slimgraph.backends.ort import session_for
    from slimgraph.bench.timing import interleaved

    sessions = [session_for(serialize(m), _SPEED_SESSION) for m in (float_model, quantized)]
    inputs = [inputs_of(s, feed) for s in sessions]
    pairs = list(zip(sessions, inputs, strict=True))
    once = max(min(_time_once(s, x), _time_once(s, x)) for s, x in pairs)  # the first call is cold
    rounds = int(min(_SPEED_MAX_ROUNDS, max(_SPEED_MIN_ROUNDS, budget_s / (2 * max(once, 1e-6)))))
    calls = {i: (lambda s=s, x=x: s.run(None, x)) for i, (s, x) in enumerate(pairs)}
    latency = interleaved(calls, warmup=5, repeat=rounds)
    return latency[1].p50_ms / latency[0].p50_ms


def _kernel_summary(model: ir.Model, feed: Feeds, top: int = 4) -> str:
    """The costliest op types of ``model`` in onnxruntime's profiler, as onnxruntime fused them."""
    from slimgraph.backends.ort import kernel_time_by_op

    per_op = kernel_time_by_op(serialize(model), feed, config=_SPEED_SESSION)
    return ", ".join(f"{op} {us:.0f} us" for op, us in list(per_op.items())[:top])


def _time_once(session, feed: Feeds) -> float:
    start = time.perf_counter()
    session.run(None, feed)
    return time.perf_counter() - start


def _run_all(model: ir.Model, feeds: list[Feeds]) -> list[list[np.ndarray]]:
    from slimgraph.backends.ort import session_for

    session = session_for(serialize(model), {"allow_spinning": False})
    return [session.run(None, inputs_of(session, f)) for f in feeds]


def _min_cosine(reference: list[list[np.ndarray]], actual: list[list[np.ndarray]]) -> float:
    from slimgraph.verify import compare_outputs

    names = [str(i) for i in range(len(reference[0]))]
    return min(m.cosine for m in compare_outputs(names, reference, actual))


def _dtypes(model: ir.Model) -> dict[str, ir.DataType]:
    """Element type of every value, with shape inference on a copy where the graph lacks types."""
    probe = model.clone()
    if any(v.dtype is None for n in probe.graph for v in n.outputs):
        try:
            common.ShapeInferencePass()(probe)
        except Exception as exc:  # onnx shape inference rejects some valid graphs
            logger.info("quantize: shape inference failed (%s); using the types present", exc)
    dtypes = {name: v.dtype for name, v in values_by_name(probe.graph).items() if v.dtype is not None}
    for name, v in probe.graph.initializers.items():
        if v.const_value is not None:
            dtypes[name] = v.const_value.dtype
    return dtypes


def _range_candidates(model: ir.Model, dtypes: dict[str, ir.DataType], keep_float: set[str]) -> list[str]:
    """Every value the full int8 placement may quantize (fallbacks only ever drop some)."""
    probe = model.clone()
    placement = place(probe.graph, dtypes, keep_float)
    names = {placement.range_of[v] for v in placement.quantized}
    # A layer kept float by the guard un-folds its Relu, so both sides of each Relu are needed.
    for y, relu in placement.folded_relus.items():
        names |= {y.name, relu.outputs[0].name}
    for node in placement.int8_nodes:
        names |= {v.name for v in (*node.inputs, *node.outputs) if is_float_activation(v, dtypes)}
    return sorted(names)


__all__ = [
    "BINARY_WEIGHT_TAG",
    "Divergence",
    "InsertQDQPass",
    "Int8Target",
    "QParams",
    "activation_qparams",
    "binary_weight",
    "collect_ranges",
    "cpu_flags",
    "first_divergence",
    "int8_target",
    "latency_ratio",
    "pack_signs",
    "quantizable_layers",
    "quantize_int4_blocks",
    "quantize_weight",
    "unpack_signs",
    "weight_axis",
]
