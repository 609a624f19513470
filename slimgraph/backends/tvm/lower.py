"""Rewrites that make a graph importable by TVM's Relax ONNX frontend (apache-tvm 0.27).

- LSTM has no converter: it is unrolled into standard ops (``lstm.py``).
- 4-bit tensors do not import: 4-bit DequantizeLinear of constants is evaluated (``quantized.py``).
- Shape computations (Shape -> Range/Expand -> GatherND indices, as torch exports attention
  masks) leave the frontend without static shapes, and a later Reshape with -1 then fails. With
  a fixed batch every such computation is a constant: the batch is written into the input
  shapes and the graph is constant-folded (onnxscript's folder).

int8 weights are not folded (their DequantizeLinear stays), so the library keeps them narrow.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import onnx_ir as ir
from onnx_ir.passes import common
from onnxscript.optimizer import fold_constants

from slimgraph.backends.tvm import lstm, quantized
from slimgraph.errors import UnsupportedOpError

KEEP_UNFOLDED = frozenset({"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"})
# the folder evaluates whatever it can and logs a warning for each partial evaluation that fails
_FOLDER_LOGGER = "onnxscript.optimizer._constant_folding"


def prepare_for_import(model: ir.Model, batch: int | None, backend: str) -> ir.Model:
    """A copy of ``model`` that the Relax frontend imports; ``batch`` fixes the first dim of
    every input (the symbolic batch)."""
    model = model.clone()
    if batch is not None:
        for value in model.graph.inputs:
            if value.shape is not None and value.shape.rank():
                value.shape = ir.Shape([batch, *value.shape[1:]])
    lstm.rules.apply_to_model(model)
    for node in model.graph:
        if node.op_type == "LSTM" and node.domain in ("", "ai.onnx"):
            raise UnsupportedOpError(
                f"{backend}: LSTM node {node.name!r}: the TVM Relax ONNX frontend has no LSTM and "
                f"slimgraph cannot unroll this one: {lstm.refusal(node)}"
            )
    quantized.rules.apply_to_model(model)
    for node in model.graph:
        narrow = [v.name for v in node.inputs if v is not None and v.dtype in quantized.FOUR_BIT]
        if narrow:
            raise UnsupportedOpError(
                f"{backend}: {node.op_type} node {node.name!r} reads 4-bit tensor(s) {narrow}; "
                "TVM 0.27 imports no 4-bit tensors (slimgraph folds only a 4-bit "
                "DequantizeLinear of constants)"
            )
    with _quiet(_FOLDER_LOGGER):
        fold_constants(model, should_fold=lambda n: False if n.op_type in KEEP_UNFOLDED else None)
    common.RemoveUnusedNodesPass()(model)
    # the frontend reads only ``value`` from Constant nodes (not value_ints, value_float, ...)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    return model


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
