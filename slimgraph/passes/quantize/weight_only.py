"""Weight-only modes: int4 blocks and binary signs.

int4 (weight-only, MatMul/Gemm): blocks of ``block`` weights along K share a scale (the
least-squared-error clip of ``max|block|``, see ``quantize_int4_blocks``); the weight is a
blocked DequantizeLinear of INT4 values (opset 21) feeding a MatMul (a Gemm is rewritten as
MatMul + Add first). onnxruntime usually turns that pair into its
contrib MatMulNBits kernel at load (all 36 layers of minilm), but not always (2 of 3 layers of the
digits mlp stay DequantizeLinear + MatMul and dequantize on every run, 3-5x slower than fp32 at
batch 1). ``format=nbits`` emits MatMulNBits directly (same values and scales, see
``matmul_nbits``); measured in ``benchmarks/quantize_int4_nbits.py``.

binary (XNOR-Net weights): ``W ~ sign(W) * alpha_c`` with ``alpha_c = mean |W_c|`` per output
channel (the L2-optimal scale for a fixed sign pattern). Signs are stored packed, 1 bit per weight
(``slimgraph.bits``: least significant bit first), and decoded by standard ops on initializers
only (see ``_binary_decode``); alpha and the layer's bias are stored as float16 (a Cast widens
them at load, folded like the decode). ``acts=binary``
also binarises each binary layer's input, ``x_b = Sign(x)`` (0 stays 0), so the layer computes
``alpha_c * (sign(W_c) . sign(x)) + b_c``: the XNOR-popcount product of XNOR networks.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from slimgraph.bits import BIT_SHIFTS, pack_signs
from slimgraph.passes.quantize.int8 import replace_gemm
from slimgraph.passes.quantize.layers import (
    FLOAT,
    LAYER_OPS,
    Counts,
    Namer,
    add_initializer,
    add_stored_as,
    constant_weight,
    layer_ids,
    replace_node,
    weight_axis,
)
from slimgraph.tags import BINARY_WEIGHT_TAG

CLIP_RATIOS = tuple(np.linspace(0.6, 1.0, 17))  # block scales tried, as fractions of max|block|


def quantize_int4_blocks(weight: np.ndarray, axis: int, block: int,
                         search: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 along ``axis`` in blocks of ``block``: (int4 values, float32 block scales).

    Without ``search`` each block's scale is ``max|block| / 7``. With it (the default), each
    block's scale is the one, among ``r * max|block| / 7`` and ``r * max|block| / 8`` for ``r`` in
    CLIP_RATIOS, with the least squared rounding-plus-clipping error: clipping a block's few
    largest weights buys finer steps for all the others (on MiniLM, mean embedding cosine 0.959 ->
    0.967 over plain ``max|block| / 7``). The scales have the weight's shape with
    ``ceil(dim / block)`` along ``axis``, the layout of a blocked DequantizeLinear (opset 21).
    """
    import ml_dtypes

    moved = np.moveaxis(weight.astype(np.float64), axis, 0)
    dim = moved.shape[0]
    blocks = -(-dim // block)
    padded = np.zeros((blocks * block, *moved.shape[1:]))
    padded[:dim] = moved
    grouped = padded.reshape(blocks, block, *moved.shape[1:])
    amax = np.abs(grouped).max(axis=1)
    scales = np.where(amax > 0, amax / 7, 1.0)
    best = np.full(amax.shape, np.inf)
    for ratio in CLIP_RATIOS if search else ():
        for levels in (7, 8):  # 8: the block's extreme lands on -8 (or clips at +7)
            candidate = np.where(amax > 0, ratio * amax / levels, 1.0)
            steps = candidate[:, None]
            error = ((np.clip(np.round(grouped / steps), -8, 7) * steps - grouped) ** 2).sum(axis=1)
            better = error < best
            best, scales = np.where(better, error, best), np.where(better, candidate, scales)
    q = np.clip(np.round(moved / np.repeat(scales, block, axis=0)[:dim]), -8, 7)
    return (np.moveaxis(q, 0, axis).astype(ml_dtypes.int4),
            np.moveaxis(scales, 0, axis).astype(np.float32))


def binary_weight(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """XNOR-Net binary weights: (packed signs, alpha = mean |W| per output channel along ``axis``)."""
    moved = np.moveaxis(np.abs(weight.astype(np.float64)), axis, 0)
    alpha = moved.reshape(moved.shape[0], -1).mean(axis=1).astype(np.float32)
    return pack_signs(weight), alpha


def _binary_decode(
    graph: ir.Graph, namer: Namer, node: ir.Node, w: ir.Value, axis: int, shared: dict[str, ir.Value],
) -> list[ir.Node]:
    """Nodes that rebuild ``sign(W) * alpha`` from packed bits with standard ops.

    ``Unsqueeze(bits, [1]) >> [7..0] mod 2 -> Reshape(-1) -> Slice(0, n) -> Cast -> *2 - 1 ->
    Reshape(W.shape) * alpha``, alpha stored as float16 and widened by a Cast; every input is an
    initializer, so runtimes fold it at load. The flattening Reshape and the Slice are left out
    where W's size is a multiple of 8 (no padding bits), and the small constants every layer uses
    the same way live once in ``shared``. The last Mul carries the metadata
    ``slimgraph.binary_weight`` = ``axis=A`` for backends.
    """
    weight = w.const_value.numpy()
    packed, alpha = binary_weight(weight, axis)
    shape = [1] * weight.ndim
    shape[axis] = -1
    common_consts = {
        "shifts": BIT_SHIFTS,
        "two_u8": np.array(2, np.uint8),
        "axes": np.array([1], np.int64),
        "two": np.array(2, np.float32),
        "one": np.array(1, np.float32),
    }
    padded = weight.size % 8 != 0
    if padded:
        common_consts |= {"flat": np.array([-1], np.int64), "start": np.array([0], np.int64)}
    for k, a in common_consts.items():
        if k not in shared:
            shared[k] = add_initializer(graph, namer, f"binary_decode_{k}", a)
    v = dict(shared)
    own = {"bits": packed, "shape": np.array(weight.shape, np.int64)}
    if padded:
        own["stop"] = np.array([weight.size], np.int64)
    v |= {k: add_initializer(graph, namer, f"{w.name}_binary_{k}", a) for k, a in own.items()}
    half = alpha.reshape(shape).astype(np.float16)
    v["alpha"] = (add_stored_as(graph, namer, f"{w.name}_binary_alpha", half.astype(np.float32), np.float16)
                  if np.isfinite(half).all() and (half > 0).all() == (alpha > 0).all()
                  else add_initializer(graph, namer, f"{w.name}_binary_alpha", alpha.reshape(shape)))
    steps = [
        ("Unsqueeze", [v["bits"], v["axes"]], {}, ir.DataType.UINT8),
        ("BitShift", [None, v["shifts"]], {"direction": "RIGHT"}, ir.DataType.UINT8),
        ("Mod", [None, v["two_u8"]], {}, ir.DataType.UINT8),
        *([("Reshape", [None, v["flat"]], {}, ir.DataType.UINT8),
           ("Slice", [None, v["start"], v["stop"]], {}, ir.DataType.UINT8)] if padded else []),
        ("Cast", [None], {"to": FLOAT}, FLOAT),
        ("Mul", [None, v["two"]], {}, FLOAT),
        ("Sub", [None, v["one"]], {}, FLOAT),
        ("Reshape", [None, v["shape"]], {}, FLOAT),
        ("Mul", [None, v["alpha"]], {}, FLOAT),
    ]
    nodes: list[ir.Node] = []
    for op, inputs, attrs, dtype in steps:
        if nodes:
            inputs = [nodes[-1].outputs[0], *inputs[1:]]
        n = ir.node(op, inputs, attrs, name=namer(f"{w.name}_binary_{op}"))
        n.outputs[0].name, n.outputs[0].dtype = namer(f"{w.name}_binary_{op.lower()}"), dtype
        nodes.append(n)
    nodes[-1].outputs[0].shape = w.shape
    nodes[-1].metadata_props[BINARY_WEIGHT_TAG] = f"axis={axis}"
    return nodes


def _half_bias(graph: ir.Graph, namer: Namer, node: ir.Node) -> None:
    """A binary layer's float bias, stored as float16 and widened by a Cast (folded at load)."""
    b = node.inputs[2] if len(node.inputs) > 2 else None
    if b is None or b.const_value is None or b.const_value.dtype != FLOAT:
        return
    half = b.const_value.numpy().astype(np.float16)
    if np.isfinite(half).all():
        node.replace_input_with(2, add_stored_as(graph, namer, b.name, half.astype(np.float32),
                                                 np.float16))


def _weight_only_axis(node: ir.Node, mode: str) -> int | None:
    """int4: the axis holding K (blocks run along the reduction); binary: the output channels."""
    if mode == "binary":
        return weight_axis(node)
    if node.op_type == "Conv":
        return None
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return 1
    return 0


def _gemm_to_matmul(graph: ir.Graph, namer: Namer, node: ir.Node) -> ir.Node:
    """Rewrite ``Gemm(x, W, C)`` as ``MatMul(x, alpha * op(W)) [+ beta * C]``; returns the MatMul.

    onnxruntime (1.32) fuses a blocked int4 DequantizeLinear into MatMulNBits only in front of a
    MatMul with the blocks along axis 0; in front of a Gemm it dequantizes on every run.
    """
    w = node.inputs[1].const_value.numpy()
    if node.attributes.get_int("transB", 0):
        w = w.T
    w = (w * np.float32(node.attributes.get_float("alpha", 1.0))).astype(np.float32)
    base = node.name or "Gemm"
    weight = add_initializer(graph, namer, f"{node.inputs[1].name}_kn", np.ascontiguousarray(w))
    matmul = ir.node("MatMul", [node.inputs[0], weight], name=namer(f"{base}_MatMul"))
    matmul.outputs[0].name, matmul.outputs[0].dtype = namer(f"{base}_matmul"), FLOAT
    replace_gemm(graph, namer, node, base, [matmul], matmul.outputs[0])
    return matmul


def matmul_nbits(graph: ir.Graph, namer: Namer, node: ir.Node, block: int) -> ir.Node:
    """Replace ``MatMul(x, W[K, N])`` by com.microsoft MatMulNBits with the same int4 blocks.

    MatMulNBits stores 4-bit values unsigned with zero point 8 (``q + 8``), two per byte with the
    even element in the low nibble, column by column: B[N, K / block, block / 2] and one scale per
    (column, block). ``accuracy_level`` 0 keeps the activations float.
    """
    w = node.inputs[1].const_value.numpy()
    q, scales = quantize_int4_blocks(w, 0, block)
    (k, n), blocks = w.shape, scales.shape[0]
    unsigned = np.full((blocks * block, n), 8, np.uint8)  # padding decodes to 0
    unsigned[:k] = q.astype(np.int16) + 8
    columns = unsigned.T.reshape(n, blocks, block)
    packed = (columns[..., 0::2] | (columns[..., 1::2] << 4)).astype(np.uint8)
    name = node.inputs[1].name
    b = add_initializer(graph, namer, f"{name}_nbits", packed)
    s = add_initializer(graph, namer, f"{name}_nbits_scale", np.ascontiguousarray(scales.T).ravel())
    nbits = ir.node("MatMulNBits", [node.inputs[0], b, s],
                    {"K": k, "N": n, "bits": 4, "block_size": block, "accuracy_level": 0},
                    domain="com.microsoft", name=namer(f"{node.name or 'MatMul'}_nbits"))
    nbits.outputs[0].dtype = FLOAT
    nbits.outputs[0].name = namer(f"{node.outputs[0].name}_nbits")
    replace_node(graph, node, [nbits], nbits.outputs[0])
    return nbits


def apply_weight_only(model: ir.Model, mode: str, block: int, keep_float: set[str],
                      nbits: bool = False, binary_acts: bool = False) -> Counts:
    """Replace each layer's float weight by a decode from int4 blocks or packed sign bits.

    With ``nbits`` int4 MatMuls become com.microsoft MatMulNBits nodes instead.
    """
    graph = model.graph
    ids = layer_ids(graph)
    namer = Namer(graph)
    counts = Counts()
    decoded: dict[tuple[ir.Value, int], ir.Value] = {}
    shared: dict[str, ir.Value] = {}  # decode constants every binary layer uses
    for node in list(graph):
        if (
            node.op_type not in LAYER_OPS or node.domain not in ("", "ai.onnx")
            or ids[node] in keep_float or constant_weight(node) is None
        ):
            continue
        axis = _weight_only_axis(node, mode)
        if axis is None:
            continue
        if mode == "int4" and node.op_type == "Gemm":
            node, axis = _gemm_to_matmul(graph, namer, node), 0
        if nbits and mode == "int4":
            matmul_nbits(graph, namer, node, block)
            counts.layers += 1
            continue
        w = node.inputs[1]
        if (w, axis) not in decoded:
            if mode == "binary":
                new_nodes = _binary_decode(graph, namer, node, w, axis, shared)
            else:
                q, scales = quantize_int4_blocks(w.const_value.numpy(), axis, block)
                wq = add_initializer(graph, namer, f"{w.name}_int4", q)
                ws = add_initializer(graph, namer, f"{w.name}_scale", scales)
                dq = ir.node("DequantizeLinear", [wq, ws], {"axis": axis, "block_size": block},
                             name=namer(f"{w.name}_DequantizeLinear"))
                dq.outputs[0].name = namer(f"{w.name}_dequantized")
                dq.outputs[0].dtype, dq.outputs[0].shape = FLOAT, w.shape
                new_nodes = [dq]
            graph.insert_before(node, new_nodes)
            decoded[(w, axis)] = new_nodes[-1].outputs[0]
        node.replace_input_with(1, decoded[(w, axis)])
        if mode == "binary":
            _half_bias(graph, namer, node)
        if binary_acts:
            sign = ir.node("Sign", [node.inputs[0]], name=namer(f"{ids[node]}_Sign"))
            sign.outputs[0].name = namer(f"{node.inputs[0].name}_sign")
            sign.outputs[0].dtype, sign.outputs[0].shape = FLOAT, node.inputs[0].shape
            graph.insert_before(node, sign)
            node.replace_input_with(0, sign.outputs[0])
        counts.layers += 1
    if nbits and counts.layers:
        model.opset_imports.setdefault("com.microsoft", 1)
    common.RemoveUnusedNodesPass()(model)
    return counts

