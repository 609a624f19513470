"""prune-channels: remove dead output channels exactly, and with ``ratio=``/``macs=`` the least
important channel groups, physically shrinking every tensor the channels touch.

Dead channels. A unit (channels that move together, see channel_groups) can be removed exactly
when every consumer that sums over it (a Conv, Gemm or MatMul input slice) reads a constant there,
or has an all-zero weight slice for it. The constant's contribution is then folded into that
consumer's bias: for Gemm ``alpha * sum_k c_k B[k, :]``, for Conv ``c_k * sum(W[:, k])`` -- but
only for a Conv without padding, since zero padding makes a constant input vary at the border
(a constant of 0 needs no fold and is exact with any padding). A channel is constant when its
weight slice is zero (it outputs its bias), its BatchNorm scale is zero (it outputs beta), or,
with ``active=true`` and calibration data, a following Relu never lets it through.

Importance pruning. Each unit is scored by the L1/L2 norm of every weight slice it owns
(producer rows and consumer columns alike) or by its BatchNorm scales; within each group
(``scope=layer``) or across groups after dividing by the group mean (``scope=global``), the
lowest-scoring units go until ``ratio`` of them, or all but ``macs`` of the MACs, are gone.

Attention heads. In a transformer graph the Q/K/V projections of one attention block form a group
whose units are whole heads (D columns of each of Q, K, V with their biases, and D rows of the
output projection). ``ratio`` applies to them like to any group (half the heads at 0.5);
``heads=`` overrides it for head groups only: ``ratio=0.5,heads=0`` prunes FFN neurons and keeps
every head, ``heads=0.5`` alone prunes only heads. With ``heads=`` every attention block loses
that fraction of its heads (``scope`` then ranks only the other groups); each block keeps at least
one head, and ``round_to`` never applies to heads: a head count is already a multiple of D channels.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from slimgraph.errors import PipelineSpecError, UnsupportedOpError
from slimgraph.model_stats import infer_shapes, layer_macs, param_count, weight_bytes
from slimgraph.passes.base import SlimgraphPass, one_of
from slimgraph.passes.prune.channel_groups import (
    FIXED,
    ChannelGroup,
    ChannelGroups,
    Producer,
    Sink,
    constant_array,
    layer_name,
)
from slimgraph.tolerance import CALIBRATED, LOSSY

logger = logging.getLogger(__name__)

IMPORTANCES = ("l1", "l2", "bn")
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                      "QLinearMatMul", "ConvInteger", "MatMulInteger"})
SCOPES = ("layer", "global")


@dataclasses.dataclass
class _Constraint:
    """Elements of which at least one must stay (a layer's outputs, a Split part, a Slice)."""

    fixed: int  # elements of no unit
    members: dict[int, int]  # unit -> how many of the elements it holds
    kept: int = 0


class PruneChannelsPass(SlimgraphPass):
    """Removes dead channels exactly and, with ratio= or macs=, the least important channel groups."""

    name = "prune-channels"

    def __init__(
        self,
        ratio: float | None = None,
        macs: float | None = None,
        heads: float | None = None,
        importance: str = "l2",
        round_to: int = 1,
        scope: str = "layer",
        protect: list[str] | None = None,
        active: bool = False,
        dead: bool = True,
    ) -> None:
        where = "prune-channels"
        if ratio is not None and macs is not None:
            raise PipelineSpecError(f"{where}: give ratio= or macs=, not both")
        if ratio is not None and not 0 < ratio < 1:
            raise PipelineSpecError(f"{where}: ratio must be in (0, 1), got {ratio}")
        if macs is not None and not 0 < macs < 1:
            raise PipelineSpecError(f"{where}: macs (the fraction of MACs to keep) must be in "
                                    f"(0, 1), got {macs}")
        if heads is not None and not 0 <= heads < 1:
            raise PipelineSpecError(f"{where}: heads (the fraction of attention heads to remove) "
                                    f"must be in [0, 1), got {heads}")
        one_of(where, "importance", importance, IMPORTANCES)
        one_of(where, "scope", scope, SCOPES)
        if round_to < 1:
            raise PipelineSpecError(f"{where}: round_to must be >= 1, got {round_to}")
        self.ratio, self.macs, self.importance, self.round_to = ratio, macs, importance, round_to
        self.heads = heads
        self.scope, self.protect, self.active, self.dead = scope, protect, active, dead
        self.needs_calibration = active
        if ratio is not None or macs is not None or heads:
            self.tolerance = LOSSY
        elif active:
            self.tolerance = CALIBRATED
        super().__init__()

    def options(self) -> dict[str, object]:
        defaults = {"ratio": None, "macs": None, "heads": None, "importance": "l2", "round_to": 1,
                    "scope": "layer", "protect": None, "active": False, "dead": True}
        opts = super().options()
        return {k: ("+".join(v) if isinstance(v, list) else v) for k, v in opts.items()
                if v != defaults[k]}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        qdq = next((n for n in model.graph if n.op_type in _QDQ_OPS), None)
        if qdq is not None:
            raise UnsupportedOpError(
                f"prune-channels: the graph is already quantized ({qdq.op_type} node "
                f"{layer_name(qdq)!r}); prune before quantizing, e.g. "
                "'prune-channels:ratio=0.5,quantize:int8'"
            )
        stats_before = _stats(model)
        groups = ChannelGroups(model)
        # Named layers are never pruned; the default (first conv) is only kept from importance
        # pruning, since removing its dead channels is exact.
        for producer in self._protected(groups):
            groups.block_producer(producer, f"protected layer {producer.name!r}")
        plan = _Plan(groups)
        removed: set[int] = set()
        folds: dict[ir.Node, np.ndarray] = {}
        if self.dead:
            dead_relu = self._dead_relu(model, groups) if self.active else None
            removed, folds = plan.dead_units(groups.constant_channels(dead_relu))
            self.report.count("dead_channels", plan.element_count(removed))
        if self.ratio is not None or self.macs is not None or self.heads:
            if self.protect is None:
                for producer in [p for p in groups.producers if p.node.op_type == "Conv"][:1]:
                    groups.block_producer(producer, f"first conv {producer.name!r} (protect=)")
                plan.blocked = groups.blocked_units()
            pruned = self._importance_units(model, groups, plan, removed)
            self.report.count("pruned_channels", plan.element_count(pruned))
            removed |= pruned
        if plan.head_units:
            self.report.count("heads_removed", len(removed & plan.head_units))
        if not removed:
            return ir.passes.PassResult(model, False)
        channels_before = {p.name: len(p.elems) for p in groups.producers}
        plan.apply(model, removed, folds)
        for p in groups.producers:
            kept = int(np.sum(plan.keep(p.elems)))
            if kept != channels_before[p.name]:
                self.report.count("layers_pruned")
                self.report.notes.append(f"{p.name}: {channels_before[p.name]} -> {kept} channels")
        stats_after = _stats(model)
        for key in stats_before:
            self.report.counts[f"{key}_before"] = stats_before[key]
            self.report.counts[f"{key}_after"] = stats_after[key]
        logger.info("prune-channels removed %s channels", plan.element_count(removed))
        return ir.passes.PassResult(model, True)

    def _protected(self, groups: ChannelGroups) -> list[Producer]:
        producers = groups.producers
        if self.protect is None:  # the classifier feeds a graph output: never pruned anyway
            return []
        chosen = []
        for name in self.protect:
            hits = [p for p in producers if name in _layer_aliases(p)]
            if not hits:
                known = ", ".join(p.name for p in producers) or "none"
                raise PipelineSpecError(
                    f"prune-channels: protect names an unknown layer {name!r}; prunable layers "
                    f"(node names; weight names and their module prefix work too): {known}"
                )
            chosen.extend(hits)
        return chosen

    def _dead_relu(self, model: ir.Model, groups: ChannelGroups) -> dict[ir.Node, np.ndarray]:
        """Relu nodes on channel-carrying values -> channels never positive on calibration data."""
        from slimgraph.backends.ort import probe_session

        if self.calibration is None:
            raise PipelineSpecError("prune-channels: active=true needs calibration data (--calib)")
        relus = [n for n in model.graph if n.op_type == "Relu" and n.outputs[0] in groups.maps
                 and not n.outputs[0].is_graph_output()]
        if not relus:
            return {}
        names = [n.outputs[0].name for n in relus]
        session, _ = probe_session(model, names, {"graph_optimization_level": "disabled"})
        peaks = [None] * len(relus)
        for feed in self.calibration:
            for i, array in enumerate(session.run(names, feed)):
                axis = groups.maps[relus[i].outputs[0]].axis
                peak = np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1).max(axis=1)
                peaks[i] = peak if peaks[i] is None else np.maximum(peaks[i], peak)
        dead = {node: peak <= 0 for node, peak in zip(relus, peaks, strict=True)
                if peak is not None}
        self.report.count("calibration_samples", len(self.calibration))
        return dead

    def _importance_units(self, model: ir.Model, groups: ChannelGroups, plan: _Plan,
                          removed: set[int]) -> set[int]:
        scores = plan.scores(self.importance)
        if self.importance == "bn" and plan.bn_missing:
            self.report.notes.append(
                f"importance=bn: {plan.bn_missing} groups have no BatchNorm (folded?); "
                "they are scored by L2 norm")
        if self.macs is None:
            return plan.select(self.ratio, scores, removed, self.scope, self.round_to, self.heads)
        macs = _node_macs(model)
        total = sum(macs.values())
        low, high, best = 0.0, 0.99, set()
        for _ in range(20):
            mid = (low + high) / 2
            chosen = plan.select(mid, scores, removed, self.scope, self.round_to, self.heads)
            if plan.estimate_macs(macs, removed | chosen) <= self.macs * total:
                best, high = chosen, mid
            else:
                low = mid
        if not best:
            best = plan.select(high, scores, removed, self.scope, self.round_to, self.heads)
            self.report.notes.append(f"macs={self.macs} is out of reach; pruned at ratio {high}")
        return best


def _layer_aliases(producer: Producer) -> set[str]:
    """Names a user may give for a layer: node name, weight name, weight's module prefix."""
    names = {producer.name, producer.node.name or "", producer.weight.name or ""}
    weight = producer.weight.name or ""
    if weight.endswith(".weight"):
        names.add(weight[: -len(".weight")])
    return names - {""}


def _node_macs(model: ir.Model) -> dict[str, int]:
    out: dict[str, int] = {}
    for layer in layer_macs(model):
        out[layer.node] = out.get(layer.node, 0) + layer.macs
    return out


def _stats(model: ir.Model) -> dict[str, int]:
    infer_shapes(model)
    return {"params": param_count(model), "weight_bytes": weight_bytes(model),
            "macs": sum(layer.macs for layer in layer_macs(model))}


class _Plan:
    """Decisions over the units of one analysis, and their application to the graph."""

    def __init__(self, groups: ChannelGroups) -> None:
        self.groups = groups
        self.find = groups.find
        self.blocked = groups.blocked_units()
        self.channel_groups: list[ChannelGroup] = groups.groups()
        self.head_units = {u for g in self.channel_groups if g.heads for u in g.units}
        self.bn_missing = 0
        self.constraints: list[_Constraint] = []
        self._unit_constraints: dict[int, list[tuple[_Constraint, int]]] = {}
        for elems in self._kept_sets():
            units: dict[int, int] = {}
            for e in elems:
                if e != FIXED:
                    u = self.find(int(e))
                    units[u] = units.get(u, 0) + 1
            constraint = _Constraint(int(np.sum(elems == FIXED)), units)
            self.constraints.append(constraint)
            for u, k in units.items():
                self._unit_constraints.setdefault(u, []).append((constraint, k))

    def _kept_sets(self) -> list[np.ndarray]:
        sets = [p.elems for p in self.groups.producers]
        for edit in self.groups.edits:
            if edit.kind == "split":
                sets.extend(edit.parts)
            elif edit.kind == "slice":
                sets.append(edit.elems[edit.start:edit.end])
        return sets

    def keep(self, elems: np.ndarray, removed: set[int] | None = None) -> np.ndarray:
        removed = self._removed if removed is None else removed
        return np.array([e == FIXED or self.find(int(e)) not in removed for e in elems], dtype=bool)

    def element_count(self, units: set[int]) -> int:
        return sum(1 for p in self.groups.producers for e in p.elems if self.find(int(e)) in units)

    def _try_remove(self, unit: int) -> bool:
        """Remove ``unit`` unless that empties a layer, a Split part or a Slice."""
        entries = self._unit_constraints.get(unit, [])
        if any(c.kept - k < 1 for c, k in entries):
            return False
        for c, k in entries:
            c.kept -= k
        return True

    def _reset(self, removed: set[int]) -> None:
        for c in self.constraints:
            c.kept = c.fixed + sum(n for u, n in c.members.items() if u not in removed)

    # -- dead units ------------------------------------------------------------------------------

    def dead_units(self, consts: dict[ir.Value, np.ndarray]) -> tuple[set[int], dict[ir.Node, np.ndarray]]:
        """Units every summing consumer reads as a foldable constant, and the bias folds they need."""
        candidates = {self.find(int(e)) for p in self.groups.producers for e in p.elems}
        candidates -= set(self.blocked)
        self._reset(set())
        for sink in self.groups.sinks:
            values = consts.get(sink.value)
            weight = constant_array(sink.site.node.inputs[sink.site.index])
            n = len(sink.site.elems)
            columns = np.moveaxis(weight, sink.site.axis, 0).reshape(n, -1)
            reads = np.any(columns != 0, axis=1)
            foldable = _foldable(sink)
            for k, e in enumerate(sink.site.elems):
                if e == FIXED or not reads[k]:
                    continue
                c = np.nan if values is None else values[k]
                if np.isnan(c) or (c != 0 and not foldable):
                    candidates.discard(self.find(int(e)))
        removed: set[int] = set()
        for unit in sorted(candidates):
            if self._try_remove(unit):
                removed.add(unit)
        folds: dict[ir.Node, np.ndarray] = {}
        for sink in self.groups.sinks:
            delta = _fold_delta(sink, consts.get(sink.value), ~self.keep(sink.site.elems, removed))
            if delta is not None:
                folds[sink.site.node] = folds.get(sink.site.node, 0) + delta
        return removed, folds

    # -- importance ----------------------------------------------------------------------------

    def scores(self, importance: str) -> dict[int, float]:
        """Unit -> importance: summed |w| (l1) or w^2 (l2) over its weight slices, or |BN scale|."""
        weights: dict[int, float] = {}
        bn: dict[int, float] = {}
        for site in self.groups.sites:
            is_bn = site.node.op_type == "BatchNormalization" and site.index == 1
            if site.index != 1 or (site.role == "param" and not is_bn):
                continue
            array = constant_array(site.node.inputs[site.index]).astype(np.float64)
            rows = np.moveaxis(array, site.axis, 0).reshape(len(site.elems), -1)
            if is_bn:
                target, per_row = bn, np.abs(rows).sum(axis=1)
            else:
                target = weights
                per_row = np.abs(rows).sum(axis=1) if importance == "l1" else (rows**2).sum(axis=1)
            for e, value in zip(site.elems, per_row, strict=True):
                if e != FIXED:
                    u = self.find(int(e))
                    target[u] = target.get(u, 0.0) + float(value)
        if importance != "bn":
            return weights
        out = dict(weights)
        for group in self.channel_groups:
            if all(u in bn for u in group.units):
                out.update({u: bn[u] for u in group.units})
            else:
                self.bn_missing += 1
        return out

    def select(self, ratio: float | None, scores: dict[int, float], already: set[int], scope: str,
               round_to: int, heads: float | None = None) -> set[int]:
        """The units to prune so that each group (or all groups together) loses ``ratio``; head
        groups lose ``heads`` of their heads each where it is given."""
        self._reset(already)

        def fraction(group: ChannelGroup) -> float:
            return (heads if group.heads and heads is not None else ratio) or 0.0

        ranked_groups = [g for g in self.channel_groups if not (g.heads and heads is not None)]
        if scope == "global":
            ranked = []
            for group in ranked_groups:
                mean = np.mean([scores.get(u, 0.0) for u in group.units]) or 1.0
                ranked += [(scores.get(u, 0.0) / mean, u, id(group)) for u in self._free(group, already)]
            total = sum(len(g.units) for g in ranked_groups if self._free(g, already))
            budget = {}
            for _, _unit, gid in sorted(ranked)[: int(round((ratio or 0.0) * total))]:
                budget[gid] = budget.get(gid, 0) + 1
            self._reset(already)
        chosen: set[int] = set()
        for group in self.channel_groups:
            free = self._free(group, already)
            if not free:
                continue
            n = len(group.units)
            per_layer = scope == "layer" or (group.heads and heads is not None)
            removing = round(n * fraction(group)) if per_layer else budget.get(id(group), 0)
            kept = n - removing
            if round_to > 1 and not group.heads:
                kept = min(n, max(round_to, round(kept / round_to) * round_to))
            target = n - kept - sum(1 for u in group.units if u in already)
            for u in sorted(free, key=lambda u: (scores.get(u, 0.0), u)):
                if target <= 0:
                    break
                if self._try_remove(u):
                    chosen.add(u)
                    target -= 1
        return chosen

    def _free(self, group: ChannelGroup, already: set[int]) -> list[int]:
        return [u for u in group.units if u not in self.blocked and u not in already]

    def estimate_macs(self, macs: dict[str, int], removed: set[int]) -> float:
        """MACs after removing ``removed``: each layer scales with its kept outputs and inputs."""
        factor: dict[str, float] = {}
        for site in self.groups.sites:
            if site.index == 1 and site.role in ("out", "in"):
                frac = float(np.mean(self.keep(site.elems, removed)))
                name = site.node.name or site.node.op_type
                factor[name] = factor.get(name, 1.0) * frac
        return sum(m * factor.get(name, 1.0) for name, m in macs.items())

    # -- application ---------------------------------------------------------------------------

    def apply(self, model: ir.Model, removed: set[int], folds: dict[ir.Node, np.ndarray]) -> None:
        """Slice every recorded constant, fold biases, recount channel counts, refresh shapes."""
        self._removed = removed
        graph = model.graph
        arrays: dict[tuple[ir.Node, int], np.ndarray] = {}
        slices: dict[tuple[ir.Node, int], dict[int, np.ndarray]] = {}
        for node, delta in folds.items():
            arrays[(node, 2)] = _add_to_bias(node, delta)
        for site in self.groups.sites:
            keep = self.keep(site.elems)
            if not keep.all():
                slices.setdefault((site.node, site.index), {})[site.axis] = keep
        for node, _ in arrays:
            if (node, 2) not in slices:
                out_site = next((s for s in self.groups.sites
                                 if s.node is node and s.index == 1 and s.role == "out"), None)
                if out_site is not None and not self.keep(out_site.elems).all():
                    bias_axis = arrays[(node, 2)].ndim - 1
                    slices[(node, 2)] = {bias_axis: self.keep(out_site.elems)}
        names = {v.name for v in _all_values(graph)}
        # In the order recorded, not a set's: initializer order and names must not vary run to run.
        for key in dict.fromkeys([*arrays, *slices]):
            node, index = key
            array = arrays.get(key)
            if array is None:
                array = constant_array(node.inputs[index])
            for axis, keep in slices.get(key, {}).items():
                array = np.compress(keep, array, axis=axis)
            old = node.inputs[index] if index < len(node.inputs) else None
            base = (old.name if old is not None else None) or f"{node.name or node.op_type}_bias"
            _set_constant_input(graph, node, index, np.ascontiguousarray(array), base, names)
        for edit in self.groups.edits:
            self._apply_edit(graph, edit, names)
        for value in self.groups.maps:
            if not value.is_graph_input() and not value.is_graph_output():
                value.shape = None
        RemoveUnusedNodesPass()(model)  # and the initializers nothing reads any more
        infer_shapes(model)

    def _apply_edit(self, graph: ir.Graph, edit, names: set[str]) -> None:
        node = edit.node
        if edit.kind == "group":
            kept = int(np.sum(self.keep(edit.elems)))
            node.attributes["group"] = ir.AttrInt64("group", kept // edit.per_group)
        elif edit.kind == "entry":
            array = constant_array(node.inputs[edit.index]).copy()
            array[edit.position] = int(np.sum(self.keep(edit.elems)))
            _set_constant_input(graph, node, edit.index, array, node.inputs[edit.index].name, names)
        elif edit.kind == "split":
            sizes = np.array([int(np.sum(self.keep(p))) for p in edit.parts], dtype=np.int64)
            if node.attributes.get("split") is not None:
                node.attributes["split"] = ir.AttrInt64s("split", sizes.tolist())
            else:
                node.attributes.pop("num_outputs", None)
                _set_constant_input(graph, node, 1, sizes, f"{node.name or 'split'}_sizes", names)
        elif edit.kind == "slice":
            keep = self.keep(edit.elems)
            start = int(np.sum(keep[: edit.start]))
            end = start + int(np.sum(keep[edit.start: edit.end]))
            for index, bound in ((1, start), (2, end)):
                array = constant_array(node.inputs[index]).copy()
                array[edit.position] = bound
                _set_constant_input(graph, node, index, array, node.inputs[index].name, names)


def _foldable(sink: Sink) -> bool:
    """Whether a constant non-zero input channel of this consumer can go into its bias exactly."""
    node = sink.site.node
    if node.op_type == "Gemm":
        return node.attributes.get_float("beta", 1.0) != 0
    if node.op_type == "Conv":
        pads = node.attributes.get("pads")
        auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
        return (pads is None or not any(pads.as_ints())) and auto_pad in ("NOTSET", "VALID")
    return False  # MatMul has no bias to fold into; ConvTranspose scatters over borders


def _fold_delta(sink: Sink, values: np.ndarray | None, gone: np.ndarray) -> np.ndarray | None:
    """The bias change that replaces removed constant inputs of one consumer (None if zero)."""
    if values is None or not gone.any():
        return None
    c = np.where(gone, np.nan_to_num(values), 0.0)
    if not c.any():
        return None
    node = sink.site.node
    weight = constant_array(node.inputs[sink.site.index]).astype(np.float64)
    if node.op_type == "Conv":
        per_input = weight.reshape(weight.shape[0], weight.shape[1], -1).sum(axis=2)  # [M, C]
        return per_input @ c
    matrix = weight if sink.site.axis == 0 else weight.T  # [K, N]
    return node.attributes.get_float("alpha", 1.0) * (c @ matrix)


def _add_to_bias(node: ir.Node, delta: np.ndarray) -> np.ndarray:
    weight = constant_array(node.inputs[1])
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = np.zeros(delta.shape, np.float64) if bias_value is None else (
        constant_array(bias_value).astype(np.float64))
    if node.op_type == "Gemm":
        delta = delta / node.attributes.get_float("beta", 1.0)
    return (bias + delta).astype(weight.dtype)


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def _set_constant_input(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray,
                        base: str, names: set[str]) -> None:
    """Give ``node`` a fresh initializer at input ``index`` (shared originals stay untouched)."""
    name, i = f"{base}_pruned", 1
    while name in names:
        i += 1
        name = f"{base}_pruned{i}"
    names.add(name)
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(array.shape),
                     type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)
