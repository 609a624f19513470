"""quantize: QuantizeLinear/DequantizeLinear insertion (int8 static or dynamic, int4, binary).

The modes and their math live beside their code: ``int8`` (calibrated QDQ placement, per-channel
weights, dynamic activations), ``smooth`` (SmoothQuant migration before int8), ``weight_only``
(int4 blocks, binary signs), ``calibrate`` (activation statistics), ``divergence`` (where a
quantized model first leaves the float one). This module holds the pass: options, the accuracy
guard and the speed guard (its timing in ``latency``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from slimgraph.backends.ort import run_feeds
from slimgraph.calibration import Feeds, split_held_out
from slimgraph.model_stats import infer_shapes
from slimgraph.passes.base import SlimgraphPass
from slimgraph.passes.quantize.calibrate import (
    channel_absmax,
    channel_statistics,
    collect_ranges,
)
from slimgraph.passes.quantize.divergence import tensor_cosines
from slimgraph.passes.quantize.embedding import embedding_tables, quantize_embeddings
from slimgraph.passes.quantize.int8 import (
    WEIGHT_SCALES,
    Int8Target,
    apply_dynamic,
    apply_static,
    cpu_flags,
    int8_target,
    place,
    quantize_weight,
)
from slimgraph.passes.quantize.latency import SPEED_BUDGET_S, kernel_summary, latency_ratio
from slimgraph.passes.quantize.layers import Counts, is_float_activation, quantizable_layers
from slimgraph.passes.quantize.rounding import ROUNDINGS, layer_statistics
from slimgraph.passes.quantize.smooth import (
    alpha_factors,
    search_factors,
    smooth_layers,
    smoothing_groups,
)
from slimgraph.passes.quantize.weight_only import apply_weight_only, quantize_int4_blocks
from slimgraph.tolerance import BINARY, INT4, INT8, Tolerance

logger = logging.getLogger(__name__)

MODES = ("int8", "int4", "binary")
BLOCK_SIZES = (32, 64, 128)
INT4_FORMATS = ("qdq", "nbits")
CALIBRATORS = ("minmax", "percentile", "entropy", "mse")
ACTIVATION_TYPES = ("auto", "u8", "s8")
_SEARCH_ROWS = 1024  # calibration rows per smoothed input that smooth=auto scores candidates on
GUARD_RANK_SAMPLES = 64  # samples each layer's sensitivity is measured on
GUARD_FLOAT_SHARE_PCT = 25  # default max_float: a quarter of the layers (int8 keeps its speed)


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
    tolerance: ClassVar[Tolerance] = INT8
    needs_calibration = True
    wants_verification = True

    def __init__(
        self,
        mode: str = "int8",
        *,
        dynamic: bool = False,
        calib: str = "mse",
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
        rounding: str = "gptq",
        guard: bool = True,
    ) -> None:
        _check_options(mode, dynamic, calib, percentile, activations, reduce_range, tolerance, block,
                       smooth, max_float, format, weight_scales, acts, embeddings, rounding)
        self.mode = mode
        self.dynamic = dynamic
        self.calib = calib
        self.percentile = percentile
        self.activations = activations
        self.reduce_range = reduce_range
        self.tolerance = _declared_tolerance(mode, tolerance)
        self.guard_cosine = tolerance
        # On by default for int8 at its declared tolerance; tolerance= turns it on in every mode.
        self.guard = tolerance is not None or (guard and mode == "int8")
        self.fallen: list[str] = []
        self.exclude = list(exclude or [])
        self.block = block
        self.weight_scales = weight_scales
        self.acts = acts
        self.embeddings = embeddings
        self.format = format
        self.rounding = rounding
        self.speed_check = speed_check
        self.smooth = smooth
        self.max_float = max_float
        self.needs_calibration = (
            (mode == "int8" and not dynamic) or tolerance is not None or smooth is not None
        )
        super().__init__()

    def options(self) -> dict:
        opts = super().options()
        opts["tolerance"] = self.guard_cosine
        opts["guard"] = self.guard
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
        float_model = model.clone() if (timed or self.guard) else None
        feeds = list(self.calibration) if self.calibration is not None else []
        calib_feeds, held_out = split_held_out(feeds)
        if self.smooth is not None:
            dtypes = self._smooth(model, set(layers) - set(self.exclude), calib_feeds)

        ranges: dict[str, tuple[float, float]] = {}
        static = self.mode == "int8" and not self.dynamic
        if static:
            wanted = _range_candidates(model, dtypes, set(self.exclude))
            ranges = collect_ranges(model, wanted, calib_feeds, self.calib, self.percentile)
        statistics = {}
        if static and self.rounding == "gptq":
            statistics = layer_statistics(model, [x for x in layers if x not in self.exclude],
                                          calib_feeds)

        def build(keep_float: set[str], into: ir.Model) -> Counts:
            if self.mode != "int8":
                counts = apply_weight_only(into, self.mode, self.block, keep_float,
                                           self.format == "nbits", self.acts == "binary")
            elif self.dynamic:
                counts = apply_dynamic(into, dtypes, target, keep_float)
            else:
                counts = apply_static(into, dtypes, ranges, target, keep_float, self.weight_scales,
                                      statistics)
            if self.embeddings == "int8":
                counts.embeddings = quantize_embeddings(into.graph, keep_float)
            return counts

        keep_float = set(self.exclude)
        if self.guard:
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
            if self.rounding == "gptq":
                self.report.count("layers_gptq", counts.gptq)
                self.report.count("biases_corrected", counts.biases_corrected)
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
            if self.fallen:
                self._fallback_cost(float_model, model, build, held_out or feeds)
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
        """Keep the most damaging layers float until the outputs meet the guard's tolerance.

        Judged on the data the artifact is verified on where export bound it (``verification``),
        else on the held-out calibration samples. A layer kept float also reads a float input
        (see ``int8.place``), so the unit of the search is a layer with its input activation.
        Layers are ranked by how much keeping each one float alone improves the cosine of the
        outputs (on at most ``GUARD_RANK_SAMPLES`` samples), most damaging first; the shortest
        prefix of that ranking that meets the tolerance (binary search, at most ``max_float``) is
        kept float.
        """
        from slimgraph.verify import check_metrics, compare_outputs

        data = self.verification or held_out
        target = self.guard_tolerance()
        if not data:
            if self.guard_cosine is not None:
                raise ValueError("the accuracy guard (tolerance=) needs calibration samples")
            self.report.notes.append("accuracy guard: no held-out or verification data; not run")
            return keep_float
        reference = run_feeds(model, data)
        names = [v.name for v in model.graph.outputs]
        rank_data = _first_samples(data, GUARD_RANK_SAMPLES)
        rank_reference = reference[: len(rank_data)]

        def built(keep: set[str]) -> ir.Model:
            candidate = model.clone()
            build(keep, candidate)
            return candidate

        def failures(keep: set[str]) -> tuple[list[str], list]:
            metrics = compare_outputs(names, reference, run_feeds(built(keep), data))
            return check_metrics(metrics, target, self.check_top1), metrics

        def rank_cosine(keep: set[str]) -> float:
            return _min_cosine(rank_reference, run_feeds(built(keep), rank_data))

        missed, metrics = failures(keep_float)
        self.report.notes.append(f"accuracy guard: all layers int8 -> {_describe(metrics)} "
                                 f"on {_samples(data)} samples ({self._guard_source()})")
        if not missed:
            return keep_float
        active = [x for x in layers if x not in keep_float]
        budget = (max(1, -(-len(active) * GUARD_FLOAT_SHARE_PCT // 100)) if self.max_float is None
                  else self.max_float)
        budget = min(budget, len(active))
        ranked = self._rank_by_sensitivity(active, budget, keep_float, rank_cosine)
        count, result = _shortest_holding_prefix(
            budget, lambda n: failures(keep_float | set(ranked[:n])))
        fallen = ranked[:count]
        if count:
            missed, metrics = result or failures(keep_float | set(fallen))
        self.fallen = fallen
        verdict = "holds" if not missed else "STILL MISSED"
        self.report.notes.append(
            f"accuracy guard: kept float {', '.join(fallen) or 'nothing'} -> {_describe(metrics)}, "
            f"tolerance {_describe_tolerance(target, self.check_top1)} {verdict}"
            + (f" (max_float={budget})" if missed and count == budget else "")
        )
        keep_float = keep_float | set(fallen)
        if missed:
            self._report_divergence(model, built(keep_float), data, dtypes, target, missed)
        return keep_float

    def _rank_by_sensitivity(self, active: list[str], budget: int, keep_float: set[str],
                             rank_cosine) -> list[str]:
        """The ``active`` layers, the one whose keeping float alone gains the most cosine first
        (none where ``budget`` is 0); notes the gains of the first ``budget``."""
        if not budget:
            return []
        base = rank_cosine(keep_float)
        gains = {x: rank_cosine(keep_float | {x}) - base for x in active}
        ranked = sorted(active, key=lambda x: -gains[x])
        self.report.notes.append(
            "layer sensitivity (cosine gained when kept float alone): "
            + ", ".join(f"{x}=+{max(gains[x], 0.0):.2g}" for x in ranked[:budget])
        )
        return ranked

    def _report_divergence(self, model: ir.Model, quantized: ir.Model, data: list[Feeds],
                           dtypes: dict[str, ir.DataType], target: Tolerance,
                           missed: list[str]) -> None:
        """Warn that the tolerance is missed, naming the first tensor where ``quantized`` leaves
        the float ``model`` (or the lowest cosine, where none is below the tolerance)."""
        cosines = tensor_cosines(model, quantized, data[:4], dtypes)
        first = next((d for d in cosines if d.cosine < target.min_cosine), None)
        lowest = min(cosines, key=lambda d: d.cosine, default=None)
        where = (first.describe() if first else "none below the cosine tolerance"
                 + (f"; the lowest: {lowest.describe()}" if lowest else ""))
        self.report.notes.append(
            f"WARNING: accuracy guard: tolerance {_describe_tolerance(target, self.check_top1)} "
            f"missed ({'; '.join(missed)}); first diverging tensor: {where}")
        logger.warning("quantize: tolerance missed; first diverging tensor: %s", where)

    def guard_tolerance(self) -> Tolerance:
        """What the guard holds the outputs to: the declared tolerance, its cosine raised to
        ``tolerance=`` where given; top-1 agreement only where ``check_top1``."""
        return Tolerance(self.tolerance.max_rel_err,
                         self.guard_cosine if self.guard_cosine is not None else self.tolerance.min_cosine,
                         self.tolerance.min_top1 if self.check_top1 else 0.0)

    def _guard_source(self) -> str:
        return "the verification data" if self.verification else "held-out calibration samples"

    def _fallback_cost(self, float_model: ir.Model, model: ir.Model, build,
                       feeds: list[Feeds]) -> None:
        """What the layers the guard kept float cost in speed: the model against all layers int8,
        and each layer alone (latency ratios in onnxruntime, as the speed guard times them)."""
        from slimgraph.frontend import random_feeds

        feed = feeds[0] if feeds else random_feeds(float_model, batch=1)
        all_int8 = float_model.clone()
        build(set(self.exclude), all_int8)
        each = []
        for layer in self.fallen:
            one = float_model.clone()
            build(set(self.exclude) | {layer}, one)
            each.append(f"{layer} {latency_ratio(all_int8, one, feed, SPEED_BUDGET_S / 3):.3f}x")
        total = latency_ratio(all_int8, model, feed)
        self.report.notes.append(
            f"accuracy guard: the {len(self.fallen)} float layer(s) cost {total:.2f}x the latency "
            f"of all layers int8 ({', '.join(each)})")

    def _speed_guard(self, float_model: ir.Model, model: ir.Model, feeds: list[Feeds]) -> None:
        from slimgraph.frontend import random_feeds

        feed = feeds[0] if feeds else random_feeds(float_model, batch=1)
        ratio = latency_ratio(float_model, model, feed)
        logger.info("quantize: int8/fp32 latency %.3fx", ratio)
        if ratio >= 1.0:
            warning = (
                f"WARNING: speed guard: the int8 model is NOT faster than fp32 in onnxruntime here "
                f"(int8/fp32 latency {ratio:.2f}x); where the time goes, per run: "
                f"{kernel_summary(model, feed)} (int8) vs {kernel_summary(float_model, feed)} (fp32)"
            )
            logger.warning("quantize: %s", warning)
            self.report.notes.append(warning)
        else:
            self.report.notes.append(f"speed guard: int8/fp32 latency {ratio:.2f}x in onnxruntime")


def _check_options(
    mode: str, dynamic: bool, calib: str, percentile: float, activations: str,
    reduce_range: bool | None, tolerance: float | None, block: int, smooth: float | str | None,
    max_float: int | None, format: str, weight_scales: str, acts: str, embeddings: str,
    rounding: str,
) -> None:
    """Refuse an option value of InsertQDQPass outside its range, or a combination of modes and
    options that does not apply (ValueError naming the option)."""
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
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; valid: {', '.join(ROUNDINGS)}")
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
    if block not in BLOCK_SIZES:
        raise ValueError(f"block must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block}")
    if mode != "int8" and (dynamic or activations != "auto" or reduce_range is not None
                           or weight_scales != "auto"):
        raise ValueError(f"mode {mode!r} is weight-only: dynamic, activations, reduce_range "
                         "and weight_scales apply to int8")
    if mode == "binary" and smooth is not None:
        raise ValueError("smooth applies to int8 and int4: binary weights keep one scale per "
                         "output channel, which a per-input-channel smoothing would break")
    if acts not in ("float", "binary"):
        raise ValueError(f"unknown acts {acts!r}; valid: float, binary")
    if acts == "binary" and mode != "binary":
        raise ValueError("acts=binary (sign activations, XNOR networks) applies to mode binary")
    if embeddings not in ("int8", "float"):
        raise ValueError(f"unknown embeddings {embeddings!r}; valid: int8, float")


def _declared_tolerance(mode: str, tolerance: float | None) -> Tolerance:
    """The mode's tolerance, its cosine set by ``tolerance=`` (for int8: lowered to it, never raised)."""
    if mode == "int4":
        return INT4 if tolerance is None else dataclasses.replace(
            INT4, min_cosine=tolerance)
    if mode == "binary":
        return BINARY if tolerance is None else dataclasses.replace(
            BINARY, min_cosine=tolerance)
    return (
        INT8 if tolerance is None
        else dataclasses.replace(INT8, min_cosine=min(tolerance, INT8.min_cosine))
    )


def _shortest_holding_prefix(budget: int, failures_of_prefix) -> tuple[int, tuple[list[str], list] | None]:
    """The shortest length in [1, ``budget``] whose ranking prefix leaves no failure (binary
    search; ``budget`` where none does), with that length's failures and metrics if measured."""
    low, high, best = 1, budget, None
    results: dict[int, tuple[list[str], list]] = {}
    while low <= high:
        mid = (low + high) // 2
        results[mid] = failures_of_prefix(mid)
        if results[mid][0]:
            low = mid + 1
        else:
            best, high = mid, mid - 1
    count = best if best is not None else budget
    return count, results.get(count)


def _first_samples(feeds: list[Feeds], count: int) -> list[Feeds]:
    """The leading feeds that hold about ``count`` samples (at least one feed)."""
    taken, samples = [], 0
    for feed in feeds:
        if taken and samples >= count:
            break
        taken.append(feed)
        samples += _samples([feed])
    return taken


def _samples(feeds: list[Feeds]) -> int:
    from slimgraph.verify import batch_size

    return sum(batch_size(f) for f in feeds)


def _describe(metrics) -> str:
    parts = []
    for m in metrics:
        part = f"cosine {m.cosine:.5f}, max rel err {m.max_rel_err:.3g}"
        if m.top1_agreement is not None:
            part += f", top-1 {m.top1_agreement:.4f}"
        parts.append(part)
    return "; ".join(parts)


def _describe_tolerance(tolerance: Tolerance, top1: bool) -> str:
    text = f"cosine >= {tolerance.min_cosine:g}, max rel err <= {tolerance.max_rel_err:g}"
    return text + (f", top-1 >= {tolerance.min_top1:g}" if top1 else "")


def _min_cosine(reference: list[list[np.ndarray]], actual: list[list[np.ndarray]]) -> float:
    from slimgraph.verify import compare_outputs

    names = [str(i) for i in range(len(reference[0]))]
    return min(m.cosine for m in compare_outputs(names, reference, actual))


def _dtypes(model: ir.Model) -> dict[str, ir.DataType]:
    """Element type of every value, with shape inference on a copy where the graph lacks types."""
    probe = model.clone()
    if any(v.dtype is None for n in probe.graph for v in n.outputs):
        failure = infer_shapes(probe)
        if failure:  # onnx shape inference rejects some valid graphs
            logger.info("quantize: shape inference failed (%s); using the types present", failure)
    dtypes = {name: v.dtype for name, v in ir.convenience.create_value_mapping(
        probe.graph, include_subgraphs=False).items() if v.dtype is not None}
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
