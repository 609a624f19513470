"""prune-layers: remove whole residual blocks and transformer layers, leaving the identity.

Blocks. A residual block is an ``Add(skip, branch)`` whose ``skip`` input is an ancestor of its
``branch`` input, whose branch holds at least one weighted op (Conv, Gemm, MatMul with a constant
weight) and whose output has the skip's shape. Removing it replaces its output by ``skip``: the
branch contributes zero. In a post-norm transformer (BERT, MiniLM) the sum feeds a
LayerNormalization whose input chain is norm to norm; the norm belongs to the block, so removing
the block hands the previous norm's output straight on. What follows the sum (the ReLU after a
ResNet basic block's sum) stays: ``relu(x + 0)`` is ``x`` for the non-negative ``x`` it already was.

Units. What ``keep``/``drop``/``ratio`` count are units: a block whose branch attends (a Softmax,
or a MatMul of two activations) starts a transformer layer and the chained blocks that follow it
(the feed-forward block) join that layer; any other block is a unit of its own. A unit is not
removable when one of its blocks is not: a shortcut through a projection (both sides of the sum
hold weighted ops from a common input), a shape change, or a branch value used outside the block.

Names. A unit is named by the deepest module scope its nodes share (the torch exporter records
it per node), else by the common dotted prefix of its weights' names, else ``block<i>``.

Importance. ``importance=output`` (default) removes one unit at a time and runs the graph on the
calibration data: the score is ``1 - mean cosine`` of the outputs to the unmodified graph's; the
highest-scoring units are kept. ``importance=uniform`` keeps evenly spaced units
(``round(linspace(0, n - 1, keep))``: the first and the last, the DistilBERT kind of choice).
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import os
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from slimgraph.errors import PipelineSpecError
from slimgraph.model_stats import layer_macs
from slimgraph.passes.base import SlimgraphPass, one_of
from slimgraph.passes.prune.channel_groups import layer_name
from slimgraph.tags import TORCH_NAME_SCOPES
from slimgraph.tolerance import LOSSY

logger = logging.getLogger(__name__)

IMPORTANCES = ("output", "uniform")
_WEIGHTED = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_NORMS = frozenset({"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"})


@dataclasses.dataclass
class ResidualBlock:
    """One ``Add(skip, branch)``: its input (``skip``), output, nodes and whether it can go."""

    add: ir.Node
    skip: ir.Value
    output: ir.Value
    nodes: list[ir.Node]  # the branch, the Add and a post-norm, in graph order
    attention: bool
    reason: str | None = None  # why it is not removable


@dataclasses.dataclass
class Unit:
    """What prune-layers keeps or removes: a transformer layer or one residual block."""

    name: str
    kind: str
    blocks: list[ResidualBlock]
    macs: int = 0
    score: float | None = None
    kept: bool = True

    @property
    def input(self) -> ir.Value:
        return self.blocks[0].skip

    @property
    def output(self) -> ir.Value:
        return self.blocks[-1].output

    @property
    def reason(self) -> str | None:
        return next((b.reason for b in self.blocks if b.reason), None)

    @property
    def removable(self) -> bool:
        return self.reason is None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "blocks": len(self.blocks),
                "nodes": sum(len(b.nodes) for b in self.blocks), "macs": self.macs,
                "removable": self.removable, "reason": self.reason, "score": self.score,
                "kept": self.kept}


def _is_constant(value: ir.Value) -> bool:
    if value.const_value is not None or value.is_initializer():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def _weighted(node: ir.Node) -> bool:
    return node.op_type in _WEIGHTED and any(v is not None and _is_constant(v)
                                            for v in node.inputs[1:])


def _attends(node: ir.Node) -> bool:
    if node.op_type in ("Softmax", "Attention", "MultiHeadAttention"):
        return True
    return (node.op_type == "MatMul" and len(node.inputs) == 2
            and not any(v is None or _is_constant(v) for v in node.inputs))


class _Graph:
    """Order and reachability over one graph's nodes."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.nodes = list(graph)
        self.order = {node: i for i, node in enumerate(self.nodes)}

    def position(self, value: ir.Value) -> int:
        producer = value.producer()
        return -1 if producer is None else self.order[producer]

    def ancestors(self, value: ir.Value, floor: int = -1) -> set[ir.Node]:
        """Nodes ``value`` depends on whose position is above ``floor``."""
        seen: set[ir.Node] = set()
        stack = [value.producer()]
        while stack:
            node = stack.pop()
            if node is None or node in seen or self.order[node] <= floor:
                continue
            seen.add(node)
            stack.extend(v.producer() for v in node.inputs if v is not None)
        return seen

    def depends_on(self, nodes: set[ir.Node], value: ir.Value) -> set[ir.Node]:
        """The members of ``nodes`` that read ``value`` directly or through other members."""
        out: set[ir.Node] = set()
        for node in sorted(nodes, key=self.order.__getitem__):
            if any(v is value or (v is not None and v.producer() in out) for v in node.inputs):
                out.add(node)
        return out


def find_blocks(model: ir.Model) -> list[ResidualBlock]:
    """Every residual block of the main graph, in graph order (removable or not)."""
    g = _Graph(model.graph)
    blocks = []
    for add in g.nodes:
        if add.op_type != "Add" or len(add.inputs) != 2 or any(
                v is None or _is_constant(v) for v in add.inputs):
            continue
        block = _residual(g, add)
        if block is not None:
            blocks.append(block)
    return blocks


def _residual(g: _Graph, add: ir.Node) -> ResidualBlock | None:
    a, b = add.inputs
    for skip, branch in ((a, b), (b, a)):
        if skip.shape is not None and add.outputs[0].shape is not None and not _same_shape(
                skip, add.outputs[0]):
            continue  # a broadcast sum (an attention mask added to the scores), not a shortcut
        floor = g.position(skip)
        region = g.ancestors(branch, floor)
        members = g.depends_on(region, skip)
        if branch.producer() not in members or not any(_weighted(n) for n in members):
            continue
        return _block(g, add, skip, members)
    return _projection(g, add)


def _block(g: _Graph, add: ir.Node, skip: ir.Value, branch: set[ir.Node]) -> ResidualBlock:
    nodes = set(branch) | {add}
    output = add.outputs[0]
    consumers = output.consumers()
    post_norm = (len(consumers) == 1 and consumers[0].op_type in _NORMS
                 and consumers[0].inputs[0] is output and not output.is_graph_output()
                 and skip.producer() is not None and skip.producer().op_type in _NORMS)
    if post_norm:
        nodes.add(consumers[0])
        output = consumers[0].outputs[0]
    reason = None
    if not _same_shape(skip, output):
        reason = f"shapes unknown or unequal ({_shape(skip)} -> {_shape(output)})"
    for node in branch:
        for v in node.outputs:
            outside = [c for c in v.consumers() if c not in nodes]
            if outside or v.is_graph_output():
                where = layer_name(outside[0]) if outside else "a graph output"
                reason = reason or f"branch value {v.name!r} is also read by {where}"
    attention = any(_attends(n) for n in branch)
    return ResidualBlock(add, skip, output, sorted(nodes, key=g.order.__getitem__), attention,
                         reason)


def _projection(g: _Graph, add: ir.Node) -> ResidualBlock | None:
    """A sum of two weighted paths from one input (a shortcut through a projection): listed,
    never removed."""
    a, b = add.inputs
    side_a, side_b = g.ancestors(a), g.ancestors(b)
    common = side_a & side_b
    if not common:
        return None
    fork = max(common, key=g.order.__getitem__)
    paths = []
    for side in (side_a, side_b):
        members = {n for n in side if g.order[n] > g.order[fork]}
        if not any(_weighted(n) for n in members):
            return None
        paths.append(members)
    source = next((v for v in fork.outputs if v.consumers()), fork.outputs[0])
    nodes = sorted(paths[0] | paths[1] | {add}, key=g.order.__getitem__)
    return ResidualBlock(add, source, add.outputs[0], nodes, any(_attends(n) for n in nodes),
                         "projection shortcut (both sides of the sum are weighted)")


def _shape(value: ir.Value) -> str:
    return "?" if value.shape is None else "x".join(str(d) for d in value.shape)


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    return a.shape is not None and b.shape is not None and list(a.shape) == list(b.shape)


def find_units(model: ir.Model) -> list[Unit]:
    """The units prune-layers counts: transformer layers and residual blocks, in graph order."""
    groups: list[list[ResidualBlock]] = []
    for block in find_blocks(model):
        current = groups[-1] if groups else None
        if (current is not None and not block.attention and current[0].attention
                and current[-1].output is block.skip):
            current.append(block)
        else:
            groups.append([block])
    macs = {}
    for layer in layer_macs(model):
        macs[layer.node] = macs.get(layer.node, 0) + layer.macs
    units = []
    for i, blocks in enumerate(groups):
        kind = "transformer layer" if blocks[0].attention else "residual block"
        nodes = [n for b in blocks for n in b.nodes]
        units.append(Unit(_unit_name(nodes) or f"block{i}", kind, blocks,
                          sum(macs.get(layer_name(n), 0) for n in nodes)))
    names = [u.name for u in units]
    for i, unit in enumerate(units):
        if names.count(unit.name) > 1:
            unit.name = f"block{i}"
    return units


def _unit_name(nodes: list[ir.Node]) -> str | None:
    scopes = []
    for node in nodes:
        raw = node.metadata_props.get(TORCH_NAME_SCOPES)
        if raw is None:
            scopes = []
            break
        try:
            scopes.append(list(ast.literal_eval(raw))[:-1])  # the last entry is the op itself
        except (ValueError, SyntaxError):
            scopes = []
            break
    if scopes:
        common = scopes[0]
        for s in scopes[1:]:
            n = 0
            while n < min(len(common), len(s)) and common[n] == s[n]:
                n += 1
            common = common[:n]
        if common and common[-1]:
            return common[-1]
    weights = [v.name for n in nodes for v in n.inputs
               if v is not None and v.is_initializer() and v.name]
    if weights:
        prefix = os.path.commonprefix(weights)
        if "." in prefix:
            return prefix.rsplit(".", 1)[0] or None
    return None


def remove_unit(model: ir.Model, unit: Unit) -> None:
    """Replace ``unit``'s output by its input and drop what nothing reads any more."""
    old, new = unit.output, unit.input
    if old.is_graph_output():
        identity = ir.Node("", "Identity", [new], num_outputs=1,
                           name=f"{unit.name}/identity")
        model.graph.append(identity)
        replacement = identity.outputs[0]
        replacement.shape, replacement.type = old.shape, old.type
        old.replace_all_uses_with(replacement, replace_graph_outputs=True)
        name = old.name
        old.name = None
        replacement.name = name
    else:
        old.replace_all_uses_with(new)
    RemoveUnusedNodesPass()(model)
    used = {v.name for n in model.graph for v in n.inputs if v is not None}
    used |= {v.name for v in model.graph.outputs}
    for name in [k for k in model.graph.initializers if k not in used]:
        model.graph.initializers.pop(name)


def _mean_cosine(outputs: list[np.ndarray], references: list[np.ndarray]) -> float:
    from slimgraph.passes.heal import mean_row_cosine

    return float(np.mean([mean_row_cosine(o, r) for o, r in zip(outputs, references, strict=True)]))


class PruneLayersPass(SlimgraphPass):
    """Removes whole residual blocks and transformer layers: keep N, drop named, or a ratio."""

    name = "prune-layers"
    tolerance = LOSSY

    def __init__(self, keep: int | None = None, drop: list[str] | None = None,
                 ratio: float | None = None, importance: str = "output") -> None:
        where = "prune-layers"
        given = [k for k, v in (("keep", keep), ("drop", drop), ("ratio", ratio)) if v is not None]
        if len(given) != 1:
            raise PipelineSpecError(f"{where}: give exactly one of keep=N, drop=NAMES or ratio=R"
                                    + (f" (got {', '.join(given)})" if given else ""))
        if keep is not None and keep < 0:
            raise PipelineSpecError(f"{where}: keep must be >= 0, got {keep}")
        if ratio is not None and not 0 < ratio < 1:
            raise PipelineSpecError(f"{where}: ratio must be in (0, 1), got {ratio}")
        one_of(where, "importance", importance, IMPORTANCES)
        self.keep, self.drop, self.ratio, self.importance = keep, drop, ratio, importance
        self.needs_calibration = importance == "output" and drop is None
        self.units: list[Unit] = []
        super().__init__()

    def options(self) -> dict[str, object]:
        opts = super().options()
        return {k: ("+".join(v) if isinstance(v, list) else v) for k, v in opts.items()
                if v is not None and not (k == "importance" and v == "output")}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        units = find_units(model)
        removable = [u for u in units if u.removable]
        self.units = units
        self.report.count("units", len(units))
        self.report.count("removable_units", len(removable))
        doomed = self._choose(model, removable)
        for unit in units:
            unit.kept = unit not in doomed
            score = "" if unit.score is None else f", score {unit.score:.4g}"
            state = ("kept" if unit.kept else "removed") if unit.removable else \
                f"not removable: {unit.reason}"
            self.report.notes.append(f"{unit.name} ({unit.kind}, {len(unit.blocks)} block(s), "
                                     f"{unit.macs:,} MACs{score}): {state}")
        if not doomed:
            return ir.passes.PassResult(model, False)
        # Later units first: an earlier unit's output is the later one's input, so rewiring from
        # the end keeps every recorded value in the graph until its own unit is handled.
        for unit in sorted(doomed, key=lambda u: -units.index(u)):
            remove_unit(model, unit)
        self.report.count("units_removed", len(doomed))
        self.report.count("macs_removed", sum(u.macs for u in doomed))
        logger.info("prune-layers removed %d of %d units", len(doomed), len(units))
        return ir.passes.PassResult(model, True)

    def _choose(self, model: ir.Model, removable: list[Unit]) -> list[Unit]:
        if self.drop is not None:
            by_name = {u.name: u for u in removable}
            unknown = [n for n in self.drop if n not in by_name]
            if unknown:
                raise PipelineSpecError(
                    f"prune-layers: drop names unknown or unremovable units {unknown}; "
                    f"removable units: {', '.join(by_name) or 'none'}")
            return [by_name[n] for n in self.drop]
        n = len(removable)
        keep = min(self.keep, n) if self.keep is not None else n - int(round(self.ratio * n))
        if keep >= n:
            return []
        if self.importance == "uniform":
            kept = set(np.round(np.linspace(0, n - 1, keep)).astype(int).tolist()) if keep else set()
            return [u for i, u in enumerate(removable) if i not in kept]
        self._score(model, removable)
        ranked = sorted(removable, key=lambda u: -u.score)
        return ranked[keep:]

    def _score(self, model: ir.Model, units: list[Unit]) -> None:
        """Each unit's ``1 - mean cosine`` of the outputs with only that unit removed."""
        if self.calibration is None:
            raise PipelineSpecError("prune-layers: importance=output needs calibration data "
                                    "(--calib), or use importance=uniform")
        feeds = self.calibration.batched(16)
        reference = run_outputs(model, feeds)
        for unit in units:
            trial = model.clone()
            twin = next(u for u in find_units(trial) if u.name == unit.name)
            remove_unit(trial, twin)
            unit.score = max(0.0, 1.0 - _mean_cosine(run_outputs(trial, feeds), reference))
        self.report.count("calibration_samples", len(self.calibration))


def run_outputs(model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Every graph output over ``feeds``, concatenated along the batch axis."""
    from slimgraph.backends.ort import run_feeds

    runs = run_feeds(model, feeds)
    return [np.concatenate([r[i] for r in runs]) for i in range(len(runs[0]))]


def blocks_json(model: ir.Model) -> list[dict[str, Any]]:
    """The units of ``model`` as plain data (what `slimgraph inspect --blocks` shows)."""
    return [u.to_json() for u in find_units(model)]
