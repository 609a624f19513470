"""4-bit DequantizeLinear -> its float weight, computed before import.

apache-tvm 0.27's Relax importer copies one byte per element from an initializer, so a packed
int4/uint4 tensor fails with "TensorCopyFromBytes: size mismatch". A DequantizeLinear whose
4-bit input, scale and zero point are constants is evaluated here instead, with ONNX's formula

    y = (x - zero_point) * scale        (blocked: scale and zero point repeat ``block_size``
                                          times along ``axis``; per-axis: they broadcast on it)

in float32: one rounding of an exact integer times the scale, the same value onnxruntime's
kernel computes. The library then holds float weights: int4 keeps its accuracy on TVM, not its
size. The other quantized forms import as they are (QuantizeLinear/DequantizeLinear int8,
DynamicQuantizeLinear + MatMulInteger; the binary decode is folded by the constant folder).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

FOUR_BIT = frozenset({ir.DataType.INT4, ir.DataType.UINT4})


class FoldFourBitDequantize(RewriteRuleClassBase):
    """``DequantizeLinear(x4, scale[, zero_point])`` of constants -> a float constant."""

    def pattern(self, op: Any, x: ir.Value, scale: ir.Value) -> ir.Value:
        return op.DequantizeLinear(x, scale, _allow_other_inputs=True,
                                   _allow_other_attributes=True, _outputs=["y"])

    def check(self, context: Any, x: ir.Value, scale: ir.Value, y: ir.Value) -> MatchResult:
        result = MatchResult()
        if x.dtype not in FOUR_BIT:
            return result.fail(f"{x.name!r} is {x.dtype}, not a 4-bit type")
        if any(v is not None and v.const_value is None for v in y.producer().inputs):
            return result.fail("the 4-bit input, scale or zero point is not a constant")
        return result

    def rewrite(self, op: Any, x: ir.Value, scale: ir.Value, y: ir.Value) -> ir.Value:
        node = y.producer()
        zero_point = node.inputs[2] if len(node.inputs) > 2 else None
        weight = dequantize(
            x.const_value.numpy(), scale.const_value.numpy(),
            None if zero_point is None else zero_point.const_value.numpy(),
            node.attributes.get_int("axis", 1), node.attributes.get_int("block_size", 0),
        )
        return op.Constant(value=ir.tensor(weight, name=f"{y.name}_folded"))


def dequantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int,
               block: int) -> np.ndarray:
    """ONNX DequantizeLinear (per-tensor, per-axis or blocked) in the scale's float type."""
    axis = axis % x.ndim if x.ndim else 0
    if scale.ndim and block:
        scale = np.repeat(scale, block, axis=axis).take(range(x.shape[axis]), axis=axis)
        if zero_point is not None:
            zero_point = np.repeat(zero_point, block, axis=axis).take(range(x.shape[axis]),
                                                                      axis=axis)
    elif scale.ndim:  # per-axis: a 1-D scale along ``axis``
        shape = [1] * x.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero_point = None if zero_point is None else zero_point.reshape(shape)
    centred = x.astype(np.int32) - (0 if zero_point is None else zero_point.astype(np.int32))
    return (centred.astype(scale.dtype) * scale).astype(scale.dtype)


rules = RewriteRuleSet([FoldFourBitDequantize.rule()])
