"""fold-sparse: remove what sparsity made dead and store sparse initializers compactly.

1. Whole output channels whose weights are all zero go, exactly, through prune-channels' dead
   channel removal (``channels=false`` skips this; a quantized graph skips it with a note).
2. Every initializer with zeros (float weights after sparsify, share-weights' byte indices and
   masks) is stored as its non-zero values plus their positions, as a bitmask or as relative
   indices (the gap to the previous non-zero, one byte each, a stored zero filling gaps over
   255, as in Deep Compression), whichever is smaller once entropy-coded as ``export --pack``
   codes it (xz of the positions plus the values: gaps code to fewer bytes than a bitmask of the
   same density under xz, so raw size alone picks the wrong one); ``positions=bitmask|relative``
   forces one. It is decoded back to the dense tensor by
   standard ONNX operators whose inputs are all initializers, so onnxruntime folds the decode once
   when it loads the model and runs at dense speed::

       bitmask:  Gather([0, values...], CumSum(bits) * bits)     bits = Mod(BitShift(packed, 0..7), 2)
       relative: ScatterElements(ConstantOfShape(n), CumSum(gaps) - 1, values)

   The decoded tensor is bit-identical to the original (a negative zero counts as a value). Only
   tensors where the compact form saves bytes are converted.
"""

from __future__ import annotations

import lzma

import numpy as np
import onnx_ir as ir
from onnx_ir.tape import Tape

from slimgraph.artifact import PACK_PRESET
from slimgraph.bits import BIT_SHIFTS, pack_bits
from slimgraph.passes.base import SlimgraphPass, one_of
from slimgraph.passes.prune.channels import _QDQ_OPS, PruneChannelsPass
from slimgraph.passes.quantize.layers import Namer, add_initializer

# Bytes a decode costs beyond its data: small constant initializers and node protos, measured on
# serialized graphs (about 60-90 bytes per node, 6-8 nodes).
DECODE_OVERHEAD = 600
POSITIONS = ("auto", "bitmask", "relative")


def _nonzero(array: np.ndarray) -> np.ndarray:
    """True where an element is not +0 (bit pattern zero): -0.0 is kept as a value."""
    if array.dtype.kind == "f":
        return array.view(np.dtype(f"u{array.dtype.itemsize}")) != 0
    return array != 0


def relative_gaps(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gaps (1..255, from position -1) that reach every position, and which entries are fillers
    (a gap of 255 that lands on no position)."""
    gaps, filler = [], []
    previous = -1
    for p in positions.tolist():
        gap = p - previous
        while gap > 255:
            gaps.append(255)
            filler.append(True)
            gap -= 255
        gaps.append(gap)
        filler.append(False)
        previous = p
    return np.asarray(gaps, dtype=np.uint8), np.asarray(filler, dtype=bool)


class FoldSparsePass(SlimgraphPass):
    """Removes all-zero channels and stores sparse initializers as values + positions."""

    name = "fold-sparse"

    def __init__(self, channels: bool = True, positions: str = "auto") -> None:
        one_of("fold-sparse", "positions", positions, POSITIONS)
        self.channels, self.positions = channels, positions
        super().__init__()

    def options(self) -> dict[str, object]:
        opts = {} if self.channels else {"channels": False}
        return opts | ({} if self.positions == "auto" else {"positions": self.positions})

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        if self.channels:
            if any(n.op_type in _QDQ_OPS for n in model.graph):
                self.report.notes.append("fold-sparse: quantized graph, dead channels left in place")
            else:
                dead = PruneChannelsPass()
                modified = dead(model).modified
                removed = dead.report.counts.get("dead_channels", 0)
                self.report.count("dead_channels", removed)
                self.report.notes.extend(dead.report.notes)
        graph, namer = model.graph, Namer(model.graph)
        first = next(iter(graph), None)
        saved = 0
        for name in list(graph.initializers):
            value = graph.initializers[name]
            if value.const_value is None or value.is_graph_input() or first is None:
                continue
            array = value.const_value.numpy()
            if array.ndim == 0 or array.dtype.kind not in "fiu":
                continue
            decode = self._encode(graph, namer, name, array)
            if decode is None:
                continue
            nodes, result, stored, form = decode
            graph.insert_before(first, nodes)
            value.replace_all_uses_with(result)
            graph.initializers.pop(name)
            value.name = None
            result.name = name
            result.dtype, result.shape = value.dtype, ir.Shape(array.shape)
            saved += array.nbytes - stored
            self.report.count(f"tensors_{form}")
            self.report.notes.append(f"{name}: {array.nbytes:,} -> {stored:,} bytes ({form}, "
                                     f"{np.mean(~_nonzero(array)):.3f} zero)")
            modified = True
        self.report.count("bytes_saved", saved)
        return ir.passes.PassResult(model, modified)

    def _encode(self, graph: ir.Graph, namer: Namer, name: str, array: np.ndarray):
        flat = array.ravel()
        keep = _nonzero(flat)
        n, nnz = flat.size, int(keep.sum())
        if nnz == n:
            return None
        item = flat.dtype.itemsize
        positions = np.flatnonzero(keep)
        gaps, filler = relative_gaps(positions)
        bitmask_bytes = (n + 7) // 8 + (nnz + 1) * item
        relative_bytes = gaps.size * (1 + item)
        if min(bitmask_bytes, relative_bytes) + DECODE_OVERHEAD >= array.nbytes:
            return None
        stem = f"{name}.sparse"
        packed = pack_bits(keep).reshape(-1, 1)
        if self.positions == "bitmask" or self.positions == "auto" and (
                _coded(packed) + (nnz + 1) * item <= _coded(gaps) + gaps.size * item):
            values = np.concatenate([np.zeros(1, flat.dtype), flat[keep]])
            nodes, out = _bitmask_decode(graph, namer, stem, packed, values, n, array.shape)
            return nodes, out, bitmask_bytes, "bitmask"
        values = np.zeros(gaps.size, flat.dtype)
        values[~filler] = flat[positions]
        nodes, out = _relative_decode(graph, namer, stem, gaps, values, n, array.shape)
        return nodes, out, relative_bytes, "relative"


def _coded(positions: np.ndarray) -> int:
    """Bytes ``positions`` take entropy-coded, as ``export --pack`` codes them (xz)."""
    return len(lzma.compress(positions.tobytes(), preset=PACK_PRESET))


class _Decode:
    """A decode subgraph on an onnx_ir Tape: nodes named ``<stem>/<op>``, constants ``<stem>.<base>``
    registered in the graph (uniquely named) as it goes."""

    def __init__(self, graph: ir.Graph, namer: Namer, stem: str) -> None:
        self.graph, self.namer, self.stem, self.tape = graph, namer, stem, Tape()

    def const(self, base: str, array) -> ir.Value:
        return add_initializer(self.graph, self.namer, f"{self.stem}.{base}", np.asarray(array))

    def op(self, op_type: str, inputs: list, **attrs) -> ir.Value:
        return self.tape.op(op_type, inputs, attrs or None,
                            name=self.namer(f"{self.stem}/{op_type}"))

    def done(self, out: ir.Value) -> tuple[list[ir.Node], ir.Value]:
        return list(self.tape.nodes), out


def _bitmask_decode(graph, namer, stem, packed, values, n, shape):
    d = _Decode(graph, namer, stem)
    bits = d.op("BitShift", [d.const("bits", packed), d.const("shifts", BIT_SHIFTS[None])],
                direction="RIGHT")
    bit = d.op("Mod", [bits, d.const("two", np.array([2], np.uint8))])
    flat = d.op("Reshape", [bit, d.const("flat", np.array([-1], np.int64))])
    cut = d.op("Slice", [flat, d.const("start", np.array([0], np.int64)),
                         d.const("stop", np.array([n], np.int64))])
    mask = d.op("Cast", [cut], to=ir.DataType.INT64)
    rank = d.op("CumSum", [mask, d.const("axis", np.array(0, np.int64))])
    index = d.op("Mul", [mask, rank])
    dense = d.op("Gather", [d.const("values", values), index], axis=0)
    return d.done(d.op("Reshape", [dense, d.const("shape", np.array(shape, np.int64))]))


def _relative_decode(graph, namer, stem, gaps, values, n, shape):
    d = _Decode(graph, namer, stem)
    wide = d.op("Cast", [d.const("gaps", gaps)], to=ir.DataType.INT64)
    summed = d.op("CumSum", [wide, d.const("axis", np.array(0, np.int64))])
    position = d.op("Sub", [summed, d.const("one", np.array([1], np.int64))])
    zeros = d.op("ConstantOfShape", [d.const("length", np.array([n], np.int64))],
                 value=ir.tensor(np.zeros(1, values.dtype)))
    scatter = d.op("ScatterElements", [zeros, position, d.const("values", values)], axis=0)
    return d.done(d.op("Reshape", [scatter, d.const("shape", np.array(shape, np.int64))]))
