"""Channel dependency groups: which output channels of which layers must be pruned together.

Every output channel of a prunable producer (Conv, ConvTranspose, Gemm, MatMul with a constant
weight) is an *element*. One forward walk over the graph follows the elements through the ops
that keep channels apart (activations, BatchNorm, pooling, Pad, Resize, Concat, Split, Slice,
Flatten, Reshape, Transpose, ...) and records, for every value, which element each index along its
channel axis carries. Ops that combine channel-carrying values index by index (residual
Add/Sub/Mul) unite their elements; a grouped or depthwise Conv unites each input group with its
output group. Connected elements form a *unit*, the channels removed together; units that share
producers form a *group*. A unit that reaches anything the walk does not understand (a graph
output, an unknown op, a Reshape that mixes channels) is blocked: pruning never guesses.

Attention heads. A Reshape that splits the channel axis [.., H*D] into [.., H, D] makes each block
of D consecutive channels one unit (a head) and carries the heads along axis H. A MatMul of two
activations (Q @ K^T, softmax @ V) whose heads sit on a batch axis pairs them index by index, so
the Q, K and V columns of head h unite; the Reshape that merges [.., H, D] back feeds the output
projection, whose D rows per head join the same unit. Removing a head shrinks H in both Reshape
shape constants; scores are computed per head, so the 1/sqrt(D) scale and the mask stay as they are.

The walk also records everything a removal must touch: constants to slice (producer weights and
biases, consumer weights, BatchNorm parameters, per-channel constants) and channel counts to
recount (Conv ``group``, Reshape shapes, Split sizes, Slice bounds, Resize sizes).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

FIXED = -1  # element id of a channel that belongs to no prunable producer

_UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu",
    "Celu", "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt",
    "Reciprocal", "Identity", "Dropout", "Cast", "Floor", "Ceil", "Round", "Sin", "Cos", "Sign",
    "ThresholdedRelu", "Shrink",
})
# Ops that move, copy or average values without changing them: a constant stays that constant.
_CONST_LAYOUT = frozenset({
    "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Concat", "Pad",
    "MaxPool", "GlobalMaxPool", "AveragePool", "GlobalAveragePool", "Resize", "ReduceMean",
    "ReduceMax", "ReduceMin",
})
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu"})
_POOL = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
                   "GlobalLpPool"})
_REDUCE = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
                     "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"})
# Elementwise ops whose per-channel constant output we can compute (dead-channel folding).
_CONST_UNARY: dict[str, Callable[[np.ndarray, ir.Node], np.ndarray]] = {
    "Relu": lambda x, n: np.maximum(x, 0.0),
    "LeakyRelu": lambda x, n: np.where(x >= 0, x, x * n.attributes.get_float("alpha", 0.01)),
    "Identity": lambda x, n: x,
    "Dropout": lambda x, n: x,
    "Sigmoid": lambda x, n: 1.0 / (1.0 + np.exp(-x)),
    "Tanh": lambda x, n: np.tanh(x),
    "Neg": lambda x, n: -x,
    "Abs": lambda x, n: np.abs(x),
    "Gelu": lambda x, n: _gelu(x, n.attributes.get_string("approximate", "none")),
}
_CONST_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
    "Max": np.maximum, "Min": np.minimum,
}


def _gelu(x: np.ndarray, approximate: str) -> np.ndarray:
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(x / np.sqrt(2.0)))


@dataclasses.dataclass
class ChannelMap:
    """The element carried by each index along a value's channel axis (FIXED: not prunable)."""

    axis: int
    elems: np.ndarray


@dataclasses.dataclass
class SliceSite:
    """A constant input of ``node`` whose slices along ``axis`` carry the channels ``elems``.

    ``role`` is "out" (a producer's weight or bias), "in" (a consumer's weight: the channels are
    reduced over there) or "param" (a per-channel constant: BatchNorm, a per-channel Add/Mul).
    """

    node: ir.Node
    index: int
    axis: int
    elems: np.ndarray
    role: str


@dataclasses.dataclass
class Sink:
    """A consumer that sums over channels: ``site`` is its weight, ``value`` the input it reads."""

    site: SliceSite
    value: ir.Value


@dataclasses.dataclass
class CountEdit:
    """A channel count held in an attribute or a constant that must follow a removal.

    kind "group": Conv ``group`` = kept(elems) / per_group; "entry": entry ``position`` of the
    constant input ``index`` = kept(elems); "split": input ``index`` = kept count of each of
    ``parts``; "slice": starts/ends entry ``position`` = the kept range of ``elems[start:end]``.
    """

    kind: str
    node: ir.Node
    elems: np.ndarray
    index: int = 0
    position: int = 0
    per_group: int = 1
    parts: list[np.ndarray] = dataclasses.field(default_factory=list)
    start: int = 0
    end: int = 0


@dataclasses.dataclass
class Producer:
    """A prunable layer: its output channels are the elements ``elems``."""

    node: ir.Node
    name: str
    weight: ir.Value
    elems: np.ndarray


@dataclasses.dataclass
class ChannelGroup:
    """Producers whose channels are coupled, with their units (element roots) and block reasons."""

    producers: list[Producer]
    units: list[int]
    blocked: list[int]
    reasons: list[str]
    heads: bool = False  # units are attention heads (Q/K/V column blocks)

    @property
    def layers(self) -> list[str]:
        return [p.name for p in self.producers]

    @property
    def prunable(self) -> bool:
        return len(self.blocked) < len(self.units)


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The array of an initializer or Constant output (not an overridable graph input), or None."""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        attr = node.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return attr.value.numpy()
    return None


def layer_name(node: ir.Node) -> str:
    """A node's name, or its op type and output name when it has none."""
    return node.name or f"{node.op_type}:{node.outputs[0].name}"


def _rank(value: ir.Value) -> int | None:
    if value.shape is not None:
        return len(value.shape)
    array = constant_array(value)
    return None if array is None else array.ndim


def _dims(value: ir.Value) -> list[Any] | None:
    if value.shape is not None:
        return list(value.shape)
    array = constant_array(value)
    return None if array is None else list(array.shape)


def _ints(node: ir.Node, name: str, input_index: int | None = None) -> list[int] | None:
    """An ints attribute, or (newer opsets) the same list given as a constant input."""
    attr = node.attributes.get(name)
    if attr is not None:
        return list(attr.as_ints())
    if input_index is not None and len(node.inputs) > input_index:
        array = constant_array(node.inputs[input_index])
        if array is not None:
            return [int(v) for v in array.reshape(-1)]
    return None


def _clip_bounds(node: ir.Node) -> tuple[float, float]:
    """Clip's (min, max), from inputs (opset 11+) or attributes; NaN where not constant."""
    bounds = []
    for i, name, default in ((1, "min", -np.inf), (2, "max", np.inf)):
        if len(node.inputs) > i and node.inputs[i] is not None:
            array = constant_array(node.inputs[i])
            bounds.append(np.nan if array is None else float(array.reshape(-1)[0]))
        else:
            bounds.append(node.attributes.get_float(name, default))
    return bounds[0], bounds[1]


class ChannelGroups:
    """The channel dependency analysis of one graph (see the module docstring)."""

    def __init__(self, model: ir.Model) -> None:
        ShapeInferencePass()(model)  # shapes only; the walk needs ranks and static dims
        self.graph = model.graph
        self.maps: dict[ir.Value, ChannelMap] = {}
        self.sites: list[SliceSite] = []
        self.sinks: list[Sink] = []
        self.edits: list[CountEdit] = []
        self.producers: list[Producer] = []
        # Head-split Reshape output -> (its input, head dim D); element -> D for head elements.
        self.head_splits: dict[ir.Value, tuple[ir.Value, int]] = {}
        self.head_dims: dict[int, int] = {}
        # For dead-channel folding: value -> (pieces of (input value, index array), pad value).
        self.gathers: dict[ir.Value, tuple[list[tuple[ir.Value, np.ndarray]], float | None]] = {}
        self._parent: list[int] = []
        self._space: list[int] = []  # producer index of each element
        self._blocked: dict[int, str] = {}
        self._handled: set[ir.Node] = set()
        self._producer_of: dict[ir.Value, Producer] = {}
        self._walk()

    # -- union-find over elements ---------------------------------------------------------

    def find(self, e: int) -> int:
        """The unit (root element) that element ``e`` belongs to."""
        root = e
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[e] != root:
            self._parent[e], e = root, self._parent[e]
        return root

    def _union(self, a: int, b: int, why: str) -> None:
        if a == FIXED or b == FIXED:
            self._block([a, b], why)
            return
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._parent[max(ra, rb)] = min(ra, rb)

    def _block(self, elems: Iterable[int], why: str) -> None:
        for e in elems:
            if e != FIXED:
                self._blocked.setdefault(int(e), why)

    def _block_inputs(self, node: ir.Node, why: str) -> None:
        for v in node.inputs:
            if v is not None and v in self.maps:
                self._block(self.maps[v].elems, f"{why} ({layer_name(node)})")

    def _new_elems(self, n: int) -> np.ndarray:
        start = len(self._parent)
        self._parent.extend(range(start, start + n))
        self._space.extend([len(self.producers)] * n)
        return np.arange(start, start + n, dtype=np.int64)

    def blocked_units(self) -> dict[int, str]:
        """Unit root -> the reason it may not be removed."""
        out: dict[int, str] = {}
        for e, why in self._blocked.items():
            out.setdefault(self.find(e), why)
        return out

    def block_producer(self, producer: Producer, why: str) -> None:
        """Make every unit touching ``producer``'s channels unprunable (protected layers)."""
        self._block(producer.elems, why)

    def groups(self) -> list[ChannelGroup]:
        """Producers coupled through shared units, each with its units, in graph order."""
        unit_spaces: dict[int, set[int]] = {}
        for e in range(len(self._parent)):
            unit_spaces.setdefault(self.find(e), set()).add(self._space[e])
        parent = list(range(len(self.producers)))

        def root(s: int) -> int:
            while parent[s] != s:
                s = parent[s]
            return s

        for spaces in unit_spaces.values():
            first, *rest = sorted(spaces)
            for s in rest:
                parent[root(s)] = root(first)
        blocked = self.blocked_units()
        by_root: dict[int, ChannelGroup] = {}
        for i, producer in enumerate(self.producers):
            by_root.setdefault(root(i), ChannelGroup([], [], [], [])).producers.append(producer)
        head_units = {self.find(e) for e in self.head_dims}
        for unit in sorted(unit_spaces):
            group = by_root[root(min(unit_spaces[unit]))]
            group.units.append(unit)
            group.heads |= unit in head_units
            if unit in blocked:
                group.blocked.append(unit)
                if blocked[unit] not in group.reasons:
                    group.reasons.append(blocked[unit])
        return list(by_root.values())

    # -- the walk ---------------------------------------------------------------------------

    def _walk(self) -> None:
        for node in self.graph:
            self._handled.add(node)
            if node.domain not in ("", "ai.onnx"):
                self._block_inputs(node, f"custom op {node.domain}::{node.op_type}")
                continue
            if self._producer(node):
                continue
            if not any(v is not None and v in self.maps for v in node.inputs):
                continue
            handler = getattr(self, f"_op_{node.op_type}", None)
            if handler is None:
                if node.op_type in _UNARY:
                    handler = self._unary
                elif node.op_type in _BINARY:
                    handler = self._binary
                elif node.op_type in _POOL:
                    handler = self._pool
                elif node.op_type in _REDUCE:
                    handler = self._reduce
            if handler is None:
                self._block_inputs(node, f"{node.op_type} is not understood")
            else:
                handler(node)
        for v in self.graph.outputs:
            if v in self.maps:
                self._block(self.maps[v].elems, f"graph output {v.name!r}")
        for v, cmap in self.maps.items():
            if any(use.node not in self._handled for use in v.uses()):
                self._block(cmap.elems, f"{v.name!r} is used inside a subgraph")

    def _set(self, value: ir.Value, axis: int, elems: np.ndarray,
             gather: list[tuple[ir.Value, np.ndarray]] | None = None, pad: float | None = None
             ) -> None:
        self.maps[value] = ChannelMap(axis, np.asarray(elems, dtype=np.int64))
        if gather is not None:
            self.gathers[value] = (gather, pad)

    def _pass_through(self, node: ir.Node, source: ir.Value, axis: int | None = None,
                      pad: float | None = None) -> None:
        cmap = self.maps[source]
        index = np.arange(len(cmap.elems))
        self._set(node.outputs[0], cmap.axis if axis is None else axis, cmap.elems,
                  [(source, index)], pad)

    def _producer(self, node: ir.Node) -> bool:
        """Handle a prunable layer (its output is a new channel space); False if it is not one."""
        op = node.op_type
        if op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2:
            return False
        x, w = node.inputs[0], node.inputs[1]
        weight = constant_array(w)
        if weight is None or weight.dtype.kind != "f" or x is None:
            return False
        group = node.attributes.get_int("group", 1)
        if op == "Conv":
            out_axis, in_axis, channels = 0, 1, weight.shape[0]
        elif op == "ConvTranspose":
            if group != 1:
                return False
            out_axis, in_axis, channels = 1, 0, weight.shape[1]
        elif op == "Gemm":
            if node.attributes.get_int("transA", 0):
                return False
            trans_b = node.attributes.get_int("transB", 0)
            out_axis, in_axis = (0, 1) if trans_b else (1, 0)
            channels = weight.shape[out_axis]
        else:
            x_rank = _rank(x)
            if weight.ndim != 2 or x_rank is None or x_rank < 2:
                return False
            out_axis, in_axis, channels = 1, 0, weight.shape[1]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        c = None if bias is None else constant_array(bias)
        bias_axis = None
        if c is not None:
            bias_axis = c.ndim - 1 if op != "Gemm" or (c.ndim and c.shape[-1] == channels) else None
        name = layer_name(node)
        if bias is not None and c is None:
            # A computed bias cannot be sliced: the outputs stay, the inputs may still go.
            elems = np.full(channels, FIXED, dtype=np.int64)
        else:
            elems = self._new_elems(channels)
            self.producers.append(Producer(node, name, w, elems))
            self._producer_of[node.outputs[0]] = self.producers[-1]
        self.sites.append(SliceSite(node, 1, out_axis, elems, "out"))
        if bias_axis is not None:
            self.sites.append(SliceSite(node, 2, bias_axis, elems, "out"))
        xmap = self.maps.get(x)
        if xmap is not None:
            if op == "Conv" and group > 1:
                self._grouped_conv(node, xmap, elems, group)
            elif xmap.axis != (_rank(x) or 0) - 1 and op in ("Gemm", "MatMul"):
                self._block(xmap.elems, f"{name} reads channels off its last axis")
            elif op in ("Conv", "ConvTranspose") and xmap.axis != 1:
                self._block(xmap.elems, f"{name} reads channels off axis 1")
            else:
                site = SliceSite(node, 1, in_axis, xmap.elems, "in")
                self.sites.append(site)
                self.sinks.append(Sink(site, x))
        elif op == "Conv" and group > 1:
            self._block(elems, f"grouped {name} reads unprunable channels")
        if elems[0] != FIXED:
            out_axis_value = 1 if op in ("Conv", "ConvTranspose", "Gemm") else _rank(x) - 1
            self._set(node.outputs[0], out_axis_value, elems)
        return True

    def _grouped_conv(self, node: ir.Node, xmap: ChannelMap, elems: np.ndarray, group: int) -> None:
        """Group j of the input and group j of the output go together; ``group`` is recounted."""
        c_in, c_out = len(xmap.elems), len(elems)
        if xmap.axis != 1 or c_in % group or c_out % group:
            self._block([*xmap.elems, *elems], f"{layer_name(node)}: unsupported grouping")
            return
        k, m = c_in // group, c_out // group
        for j in range(group):
            members = [*xmap.elems[j * k:(j + 1) * k], *elems[j * m:(j + 1) * m]]
            for e in members[1:]:
                self._union(members[0], e, f"grouped {layer_name(node)} reads an unprunable channel")
        self.edits.append(CountEdit("group", node, elems, per_group=m))

    # -- op handlers (each sees a node with at least one channel-carrying input) -------------

    def _mapped(self, node: ir.Node) -> tuple[ir.Value, ChannelMap]:
        for v in node.inputs:
            if v is not None and v in self.maps:
                return v, self.maps[v]
        raise AssertionError("handler called without a mapped input")

    def _only_first_input_mapped(self, node: ir.Node) -> bool:
        if any(v is not None and v in self.maps for v in node.inputs[1:]):
            self._block_inputs(node, f"{node.op_type} reads channels in a side input")
            return False
        return node.inputs[0] in self.maps

    def _extra_outputs_used(self, node: ir.Node) -> bool:
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            self._block_inputs(node, f"{node.op_type} has a second output in use")
            return True
        return False

    def _unary(self, node: ir.Node) -> None:
        if self._only_first_input_mapped(node) and not self._extra_outputs_used(node):
            self._pass_through(node, node.inputs[0])

    def _binary(self, node: ir.Node) -> None:
        """Broadcasting elementwise ops: channel inputs are united index by index."""
        out_rank = _rank(node.outputs[0])
        ranks = [None if v is None else _rank(v) for v in node.inputs]
        if out_rank is None or None in ranks:
            self._block_inputs(node, f"{node.op_type} with unknown ranks")
            return
        first, fmap = self._mapped(node)
        axis = fmap.axis + out_rank - ranks[node.inputs.index(first)]
        why = f"{layer_name(node)} combines channels with an unprunable tensor"
        for i, v in enumerate(node.inputs):
            aligned = axis - (out_rank - ranks[i])
            if v in self.maps:
                vmap = self.maps[v]
                if vmap.axis != aligned or len(vmap.elems) != len(fmap.elems):
                    self._block_inputs(node, f"{node.op_type} mixes channel axes")
                    return
                for a, b in zip(fmap.elems, vmap.elems, strict=True):
                    self._union(int(a), int(b), why)
                continue
            dims = _dims(v)
            if dims is None:
                self._block_inputs(node, f"{node.op_type} with an operand of unknown shape")
                return
            if aligned < 0 or dims[aligned] == 1:
                continue
            if constant_array(v) is not None and dims[aligned] == len(fmap.elems):
                self.sites.append(SliceSite(node, i, aligned, fmap.elems, "param"))
            else:
                self._block_inputs(node, why)
                return
        self._set(node.outputs[0], axis, fmap.elems)

    def _op_BatchNormalization(self, node: ir.Node) -> None:
        if not self._only_first_input_mapped(node) or self._extra_outputs_used(node):
            return
        cmap = self.maps[node.inputs[0]]
        if cmap.axis != 1 or any(constant_array(v) is None for v in node.inputs[1:5]):
            self._block(cmap.elems, f"{layer_name(node)}: non-constant parameters or axis")
            return
        for i in range(1, 5):
            self.sites.append(SliceSite(node, i, 0, cmap.elems, "param"))
        self._set(node.outputs[0], 1, cmap.elems)

    def _op_InstanceNormalization(self, node: ir.Node) -> None:
        if not self._only_first_input_mapped(node):
            return
        cmap = self.maps[node.inputs[0]]
        if cmap.axis != 1 or any(constant_array(v) is None for v in node.inputs[1:3]):
            self._block(cmap.elems, f"{layer_name(node)}: non-constant parameters or axis")
            return
        for i in (1, 2):
            self.sites.append(SliceSite(node, i, 0, cmap.elems, "param"))
        self._set(node.outputs[0], 1, cmap.elems)

    def _pool(self, node: ir.Node) -> None:
        if not self._only_first_input_mapped(node) or self._extra_outputs_used(node):
            return
        if self.maps[node.inputs[0]].axis != 1:
            self._block_inputs(node, f"{node.op_type} pools the channel axis")
            return
        pads = _ints(node, "pads") or [0]
        auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
        padded = any(pads) or auto_pad not in ("NOTSET", "VALID")
        # AveragePool and LpPool see zeros at padded borders; MaxPool ignores padding.
        pad = 0.0 if padded and node.op_type in ("AveragePool", "LpPool") else None
        self._pass_through(node, node.inputs[0], pad=pad)

    def _op_Pad(self, node: ir.Node) -> None:
        if not self._only_first_input_mapped(node):
            return
        cmap, rank = self.maps[node.inputs[0]], _rank(node.inputs[0])
        pads = _ints(node, "pads", 1)
        axes = _ints(node, "axes", 3) or list(range(rank or 0))
        if pads is None or rank is None:
            self._block(cmap.elems, f"{layer_name(node)}: non-constant pads")
            return
        axes = [a % rank for a in axes]
        if cmap.axis in axes:
            j = axes.index(cmap.axis)
            if pads[j] or pads[j + len(axes)]:
                self._block(cmap.elems, f"{layer_name(node)} pads the channel axis")
                return
        mode = node.attributes.get_string("mode", "constant")
        value = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
        pad_value = float(value.reshape(-1)[0]) if value is not None and value.size else 0.0
        self._pass_through(node, node.inputs[0], pad=pad_value if mode == "constant" else None)

    def _op_Resize(self, node: ir.Node) -> None:
        if not self._only_first_input_mapped(node) or node.attributes.get("axes") is not None:
            self._block_inputs(node, "Resize with axes")
            return
        cmap = self.maps[node.inputs[0]]
        scales = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
        sizes = constant_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else None
        if scales is not None and scales.size:
            if scales[cmap.axis] != 1:
                self._block(cmap.elems, f"{layer_name(node)} scales the channel axis")
                return
        elif sizes is not None and sizes.size:
            self.edits.append(CountEdit("entry", node, cmap.elems, index=3, position=cmap.axis))
        else:
            self._block(cmap.elems, f"{layer_name(node)}: non-constant scales/sizes")
            return
        self._pass_through(node, node.inputs[0])

    def _op_Concat(self, node: ir.Node) -> None:
        axis = node.attributes.get_int("axis", 0)
        rank = _rank(node.outputs[0])
        if rank is None:
            self._block_inputs(node, "Concat of unknown rank")
            return
        axis %= rank
        first, fmap = self._mapped(node)
        if fmap.axis != axis:
            self._binary_like_concat(node, fmap)
            return
        pieces, gather = [], []
        for v in node.inputs:
            dims = _dims(v)
            if v in self.maps and self.maps[v].axis == axis:
                elems = self.maps[v].elems
                gather.append((v, np.arange(len(elems))))
            elif v not in self.maps and dims is not None and isinstance(dims[axis], int):
                elems = np.full(dims[axis], FIXED, dtype=np.int64)
                gather.append((v, np.full(dims[axis], -1)))
            else:
                self._block_inputs(node, "Concat of channels with unknown width")
                return
            pieces.append(elems)
        self._set(node.outputs[0], axis, np.concatenate(pieces), gather)

    def _binary_like_concat(self, node: ir.Node, fmap: ChannelMap) -> None:
        """Concat along another axis: every input carries the same channels, index by index."""
        why = f"{layer_name(node)} concatenates channels with an unprunable tensor"
        for v in node.inputs:
            vmap = self.maps.get(v)
            if vmap is None or vmap.axis != fmap.axis or len(vmap.elems) != len(fmap.elems):
                self._block_inputs(node, why)
                return
            for a, b in zip(fmap.elems, vmap.elems, strict=True):
                self._union(int(a), int(b), why)
        self._set(node.outputs[0], fmap.axis, fmap.elems)

    def _op_Split(self, node: ir.Node) -> None:
        if not self._only_first_input_mapped(node):
            return
        x = node.inputs[0]
        cmap, rank = self.maps[x], _rank(x)
        axis = node.attributes.get_int("axis", 0) % (rank or 1)
        if axis != cmap.axis:
            for out in node.outputs:
                self._set(out, cmap.axis, cmap.elems, [(x, np.arange(len(cmap.elems)))])
            return
        sizes = _ints(node, "split", 1)
        n = len(cmap.elems)
        if sizes is None:
            count = len(node.outputs)
            if n % count:
                self._block(cmap.elems, f"{layer_name(node)}: uneven split")
                return
            sizes = [n // count] * count
        bounds = np.cumsum([0, *sizes])
        parts = [cmap.elems[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]
        for i, out in enumerate(node.outputs):
            self._set(out, axis, parts[i], [(x, np.arange(bounds[i], bounds[i + 1]))])
        self.edits.append(CountEdit("split", node, cmap.elems, index=1, parts=parts))

    def _op_Slice(self, node: ir.Node) -> None:
        if not self._only_first_input_mapped(node):
            return
        x = node.inputs[0]
        cmap, rank = self.maps[x], _rank(x)
        starts, ends = _ints(node, "starts", 1), _ints(node, "ends", 2)
        axes = _ints(node, "axes", 3)
        steps = _ints(node, "steps", 4)
        if starts is None or ends is None or rank is None or node.attributes.get("starts"):
            self._block(cmap.elems, f"{layer_name(node)}: non-constant bounds")
            return
        axes = [a % rank for a in (axes if axes is not None else range(len(starts)))]
        if cmap.axis not in axes:
            self._pass_through(node, x)
            return
        j = axes.index(cmap.axis)
        if steps is not None and steps[j] != 1:
            self._block(cmap.elems, f"{layer_name(node)}: strided slice of channels")
            return
        n = len(cmap.elems)
        start, end, _ = slice(starts[j], ends[j]).indices(n)
        end = max(start, end)
        index = np.arange(start, end)
        self._set(node.outputs[0], cmap.axis, cmap.elems[start:end], [(x, index)])
        self.edits.append(CountEdit("slice", node, cmap.elems, index=1, position=j,
                                    start=start, end=end))

    def _op_Transpose(self, node: ir.Node) -> None:
        cmap = self.maps[node.inputs[0]]
        perm = _ints(node, "perm")
        rank = _rank(node.inputs[0])
        perm = perm if perm is not None else list(reversed(range(rank or 0)))
        if cmap.axis not in perm:
            self._block(cmap.elems, f"{layer_name(node)}: unknown permutation")
            return
        self._pass_through(node, node.inputs[0], axis=perm.index(cmap.axis))

    def _op_Squeeze(self, node: ir.Node) -> None:
        self._squeeze(node, unsqueeze=False)

    def _op_Unsqueeze(self, node: ir.Node) -> None:
        self._squeeze(node, unsqueeze=True)

    def _squeeze(self, node: ir.Node, unsqueeze: bool) -> None:
        if not self._only_first_input_mapped(node):
            return
        cmap = self.maps[node.inputs[0]]
        axes = _ints(node, "axes", 1)
        in_rank, out_rank = _rank(node.inputs[0]), _rank(node.outputs[0])
        if axes is None or in_rank is None or out_rank is None:
            self._block(cmap.elems, f"{layer_name(node)}: unknown axes")
            return
        if unsqueeze:
            kept = [i for i in range(out_rank) if i not in {a % out_rank for a in axes}]
            axis = kept[cmap.axis]
        else:
            gone = {a % in_rank for a in axes}
            if cmap.axis in gone:
                self._block(cmap.elems, f"{layer_name(node)} squeezes the channel axis")
                return
            axis = cmap.axis - sum(1 for a in gone if a < cmap.axis)
        self._pass_through(node, node.inputs[0], axis=axis)

    def _reduce(self, node: ir.Node) -> None:
        if not self._only_first_input_mapped(node):
            return
        cmap, rank = self.maps[node.inputs[0]], _rank(node.inputs[0])
        axes = _ints(node, "axes", 1)
        if rank is None or not axes:
            self._block(cmap.elems, f"{layer_name(node)} may reduce over channels")
            return
        axes = [a % rank for a in axes]
        if cmap.axis in axes:
            self._block(cmap.elems, f"{layer_name(node)} reduces over channels")
            return
        keep = node.attributes.get_int("keepdims", 1)
        axis = cmap.axis if keep else cmap.axis - sum(1 for a in axes if a < cmap.axis)
        self._pass_through(node, node.inputs[0], axis=axis)

    def _op_Softmax(self, node: ir.Node) -> None:
        cmap, rank = self.maps[node.inputs[0]], _rank(node.inputs[0])
        if rank is None or node.attributes.get_int("axis", -1) % rank == cmap.axis:
            self._block(cmap.elems, f"{layer_name(node)} normalises over channels")
            return
        self._pass_through(node, node.inputs[0])

    _op_LogSoftmax = _op_Softmax

    def _op_LayerNormalization(self, node: ir.Node) -> None:
        if not self._only_first_input_mapped(node):
            return
        cmap, rank = self.maps[node.inputs[0]], _rank(node.inputs[0])
        if rank is None or cmap.axis >= node.attributes.get_int("axis", -1) % rank:
            self._block(cmap.elems, f"{layer_name(node)} normalises over channels")
            return
        self._pass_through(node, node.inputs[0])

    def _op_Flatten(self, node: ir.Node) -> None:
        x = node.inputs[0]
        cmap, dims = self.maps[x], _dims(x)
        if dims is None:
            self._block(cmap.elems, f"{layer_name(node)}: unknown input shape")
            return
        split = node.attributes.get_int("axis", 1) % (len(dims) or 1) if dims else 0
        self._merge_trailing(node, x, dims, split, new_axis=1)

    def _merge_trailing(self, node: ir.Node, x: ir.Value, dims: list[Any], split: int,
                        new_axis: int) -> bool:
        """Output axis ``new_axis`` merges input dims ``split:`` (channels become feature blocks)."""
        cmap = self.maps[x]
        if cmap.axis < split:
            self._block(cmap.elems, f"{layer_name(node)} merges channels into another axis")
            return False
        rest = dims[split:]
        if not all(isinstance(d, int) for d in rest):
            self._block(cmap.elems, f"{layer_name(node)}: symbolic dims merged with channels")
            return False
        inner = math.prod(rest[cmap.axis - split + 1:])
        outer = math.prod(rest[:cmap.axis - split])
        index = np.tile(np.repeat(np.arange(len(cmap.elems)), inner), outer)
        self._set(node.outputs[0], new_axis, cmap.elems[index], [(x, index)])
        return True

    def _op_Reshape(self, node: ir.Node) -> None:
        if not self._only_first_input_mapped(node):
            return
        x = node.inputs[0]
        cmap, dims, out_dims = self.maps[x], _dims(x), _dims(node.outputs[0])
        shape = constant_array(node.inputs[1])
        why = f"{layer_name(node)} reshapes channels"
        if dims is None or out_dims is None or shape is None:
            self._block(cmap.elems, f"{why} with unknown shapes")
            return
        a = cmap.axis
        if len(out_dims) <= a or dims[:a] != out_dims[:a]:
            self._block(cmap.elems, why)
            return
        n = len(cmap.elems)
        same_axis = (
            out_dims[a] == n
            and all(isinstance(d, int) for d in [*dims[a + 1:], *out_dims[a + 1:]])
            and math.prod(dims[a + 1:]) == math.prod(out_dims[a + 1:])
        )
        if same_axis:
            self._pass_through(node, x)
        elif len(out_dims) == a + 1:
            if not self._merge_trailing(node, x, dims, a, new_axis=a):
                return
        elif not self._split_heads(node, x, dims, out_dims):
            self._block(cmap.elems, why)
            return
        if shape[a] > 0:
            self.edits.append(CountEdit("entry", node, self.maps[node.outputs[0]].elems, index=1,
                                        position=a))

    def _split_heads(self, node: ir.Node, x: ir.Value, dims: list[Any], out_dims: list[Any]
                     ) -> bool:
        """[.., H*D, rest] -> [.., H, D, rest]: each block of D channels is one head on axis H."""
        cmap = self.maps[x]
        a, n = cmap.axis, len(cmap.elems)
        if len(out_dims) < a + 2:
            return False
        heads, head_dim = out_dims[a], out_dims[a + 1]
        tails = [*dims[a + 1:], *out_dims[a + 2:]]
        if not all(isinstance(d, int) for d in [heads, head_dim, *tails]):
            return False
        if head_dim < 2 or heads * head_dim != n:
            return False
        if math.prod(dims[a + 1:]) != math.prod(out_dims[a + 2:]):
            return False
        why = f"{layer_name(node)} splits heads that hold an unprunable channel"
        blocks = cmap.elems.reshape(heads, head_dim)
        for block in blocks:
            for e in block[1:]:
                self._union(int(block[0]), int(e), why)
            if block[0] != FIXED:
                self.head_dims[int(block[0])] = head_dim
        self._set(node.outputs[0], a, blocks[:, 0])
        self.head_splits[node.outputs[0]] = (x, head_dim)
        return True

    def _op_MatMul(self, node: ir.Node) -> None:
        """A product of two activations (attention): heads on a batch axis pair index by index."""
        out_rank = _rank(node.outputs[0])
        ranks = [_rank(v) for v in node.inputs]
        if out_rank is None or None in ranks or min(ranks) < 3:
            self._block_inputs(node, f"{layer_name(node)} multiplies channels as a matrix")
            return
        first, fmap = self._mapped(node)
        axis = fmap.axis + out_rank - ranks[node.inputs.index(first)]
        why = f"{layer_name(node)} multiplies heads with an unprunable tensor"
        for v, rank in zip(node.inputs, ranks, strict=True):
            aligned = axis - (out_rank - rank)
            if v in self.maps:
                vmap = self.maps[v]
                if vmap.axis != aligned or aligned >= rank - 2 or len(vmap.elems) != len(fmap.elems):
                    self._block_inputs(node, f"{layer_name(node)} multiplies channels as a matrix")
                    return
                for a, b in zip(fmap.elems, vmap.elems, strict=True):
                    self._union(int(a), int(b), why)
                continue
            dims = _dims(v)
            if dims is None or (aligned >= 0 and dims[aligned] != 1):
                self._block_inputs(node, why)
                return
        self._set(node.outputs[0], axis, fmap.elems)

    # -- constant channels (for exact dead-channel removal) -----------------------------------

    def constant_channels(self, dead_relu: dict[ir.Node, np.ndarray] | None = None
                          ) -> dict[ir.Value, np.ndarray]:
        """Per channel-carrying value, the constant each index holds on every input (NaN: varies).

        A channel is constant when its producer's weight slice is zero (it outputs its bias), a
        BatchNorm scale is zero (it outputs beta), ``dead_relu`` says a Relu never lets it through
        (0), or it is computed elementwise from constants. Padding that inserts a different value
        (Pad, AveragePool with pads) makes it vary.
        """
        dead_relu = dead_relu or {}
        consts: dict[ir.Value, np.ndarray] = {}
        for value, cmap in self.maps.items():
            n = len(cmap.elems)
            out = np.full(n, np.nan)
            node = value.producer()
            if value in self._producer_of:
                out = self._producer_constants(self._producer_of[value], consts)
            elif value in self.head_splits:
                # A head is constant only where all of its D channels hold the same constant.
                src, head_dim = self.head_splits[value]
                per_head = consts.get(src, np.full(n * head_dim, np.nan)).reshape(n, head_dim)
                same = np.all(per_head == per_head[:, :1], axis=1)
                out = np.where(same, per_head[:, 0], np.nan)
            elif value in self.gathers:
                pieces, pad = self.gathers[value]
                parts = []
                for src, index in pieces:
                    src_consts = consts.get(src, np.full(len(index), np.nan))
                    parts.append(np.where(index >= 0, src_consts[np.maximum(index, 0)], np.nan))
                out = np.concatenate(parts) if parts else out
                if pad is not None:
                    out = np.where(out == pad, out, np.nan)
                if node.op_type == "Relu" and node in dead_relu:
                    out = np.where(dead_relu[node], 0.0, np.maximum(out, 0.0))
                elif node.op_type in _CONST_UNARY:
                    out = _CONST_UNARY[node.op_type](out, node)
                elif node.op_type == "Clip":
                    out = np.clip(out, *_clip_bounds(node))
                elif node.op_type not in _CONST_LAYOUT:  # Softmax, LayerNorm, ReduceSum, ...
                    out = np.full(n, np.nan)
            elif node.op_type == "MatMul":
                # A head that is all zeros in either factor is all zeros in the product.
                out = np.full(n, np.nan)
                for v in node.inputs:
                    if v in consts:
                        out = np.where(consts[v] == 0, 0.0, out)
            elif node.op_type in _CONST_BINARY:
                operands = [self._operand_constants(node, v, cmap, consts) for v in node.inputs]
                with np.errstate(all="ignore"):
                    out = operands[0]
                    for other in operands[1:]:
                        out = _CONST_BINARY[node.op_type](out, other)
                if node.op_type == "Mul":  # x * 0 is 0 whatever x is (x finite)
                    for operand in operands:
                        out = np.where(operand == 0, 0.0, out)
            elif node.op_type == "BatchNormalization":
                x = consts.get(node.inputs[0], np.full(n, np.nan))
                scale, bias, mean, var = (constant_array(v).astype(np.float64)
                                          for v in node.inputs[1:5])
                eps = node.attributes.get_float("epsilon", 1e-5)
                out = np.where(scale == 0, bias, scale * (x - mean) / np.sqrt(var + eps) + bias)
            elif node.op_type == "InstanceNormalization":
                scale, bias = (constant_array(v).astype(np.float64) for v in node.inputs[1:3])
                out = np.where(scale == 0, bias, np.nan)
            consts[value] = out
        return consts

    def _operand_constants(self, node: ir.Node, v: ir.Value, cmap: ChannelMap,
                           consts: dict[ir.Value, np.ndarray]) -> np.ndarray:
        """One operand of an elementwise op as per-channel constants along ``cmap.axis``."""
        n = len(cmap.elems)
        if v in consts:
            return consts[v]
        array = constant_array(v)
        out_rank = _rank(node.outputs[0])
        if array is None or out_rank is None:
            return np.full(n, np.nan)
        aligned = cmap.axis - (out_rank - array.ndim)
        if aligned < 0 or array.shape[aligned] == 1:
            flat = array.reshape(-1)
            return np.full(n, float(flat[0])) if np.all(flat == flat[0]) else np.full(n, np.nan)
        per_channel = np.moveaxis(array, aligned, 0).reshape(array.shape[aligned], -1)
        if per_channel.shape[1] > 1 and not np.all(per_channel == per_channel[:, :1]):
            return np.full(n, np.nan)
        return per_channel[:, 0].astype(np.float64)

    def _producer_constants(self, producer: Producer, consts: dict[ir.Value, np.ndarray]
                            ) -> np.ndarray:
        node = producer.node
        weight = constant_array(producer.weight)
        out_site = next(s for s in self.sites if s.node is node and s.index == 1 and s.role == "out")
        n = weight.shape[out_site.axis]
        zero = ~np.any(np.moveaxis(weight, out_site.axis, 0).reshape(n, -1), axis=1)
        bias = np.zeros(n)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = constant_array(node.inputs[2]).astype(np.float64)
            if node.op_type == "Gemm":
                if c.ndim == 2 and c.shape[0] != 1:
                    return np.full(n, np.nan)
                c = np.broadcast_to(c.reshape(-1), (n,)) * node.attributes.get_float("beta", 1.0)
            bias = c
        out = np.where(zero, bias, np.nan)
        if node.op_type == "Conv" and node.attributes.get_int("group", 1) > 1:
            # A group whose inputs are all zero outputs its bias (zero padding keeps it zero).
            x = consts.get(node.inputs[0])
            group = node.attributes.get_int("group", 1)
            if x is not None:
                x_zero = np.all((x == 0).reshape(group, -1), axis=1)
                out = np.where(np.repeat(x_zero, n // group), bias, out)
        return out


def channel_groups(model: ir.Model) -> list[ChannelGroup]:
    """The channel dependency groups of ``model`` (what `slimgraph inspect --groups` shows)."""
    return ChannelGroups(model).groups()


def groups_json(groups: list[ChannelGroup]) -> list[dict[str, Any]]:
    """Groups as plain data: layers, unit count (channels, or heads where ``heads``), prunable
    units and why others are not."""
    return [{"layers": [f"{p.name} [{p.weight.name}]" for p in g.producers],
             "channels": len(g.units), "heads": g.heads,
             "prunable": len(g.units) - len(g.blocked), "blocked_by": g.reasons} for g in groups]
