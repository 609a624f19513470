"""Quantized graphs on tvm-llvm: each quantize mode against the same graph on onnxruntime."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("tvm")

from conftest import make_tiny_cnn  # noqa: E402

from slimgraph.backends.ort import session_for  # noqa: E402
from slimgraph.backends.tvm import TVM_LLVM  # noqa: E402
from slimgraph.backends.tvm.quantized import dequantize  # noqa: E402
from slimgraph.calibration import Calibration  # noqa: E402
from slimgraph.errors import UnsupportedOpError  # noqa: E402
from slimgraph.passes.quantize import InsertQDQPass  # noqa: E402


def _images(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 16, 16)).astype(np.float32)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("options", [
    {"mode": "int8", "weight_scales": "channel"},
    {"mode": "int8", "weight_scales": "tensor"},
    {"mode": "int8", "dynamic": True},
    {"mode": "int4"},
    {"mode": "binary"},
], ids=["int8-channel", "int8-tensor", "int8-dynamic", "int4", "binary"])
def test_quantized_tiny_cnn_matches_onnxruntime(options: dict, tmp_path: Path) -> None:
    qpass = InsertQDQPass(speed_check=False, **options)
    qpass.calibration = Calibration([{"image": _images(1, seed)} for seed in range(8)])
    model = qpass(ir.from_proto(make_tiny_cnn())).model
    assert {n.op_type for n in model.graph} & {"DequantizeLinear", "MatMulInteger", "BitShift"}
    feeds = {"image": _images(16, seed=99)}
    want = session_for(ir.to_proto(model).SerializeToString()).run(None, feeds)[0]
    got = TVM_LLVM.load(TVM_LLVM.build(model, tmp_path, {}))(feeds)[0]
    assert _cosine(got, want) >= 0.999
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.parametrize(("dtype", "block", "zero_point"), [
    (ml_dtypes.int4, 4, False), (ml_dtypes.uint4, 4, True), (ml_dtypes.int4, 0, True),
])
def test_dequantize_equals_onnxruntime(dtype, block: int, zero_point: bool) -> None:
    """Blocked (with a partial last block) and per-axis, bit for bit."""
    rng = np.random.default_rng(0)
    lo, hi = (-8, 7) if dtype == ml_dtypes.int4 else (0, 15)
    x = rng.integers(lo, hi + 1, (6, 10)).astype(dtype)
    scale_shape = (6, 3) if block else (6,)
    scale = rng.uniform(0.01, 1, scale_shape).astype(np.float32)
    zp = rng.integers(lo, hi + 1, scale_shape).astype(dtype) if zero_point else None
    attributes = {"axis": 0} | ({"axis": 1, "block_size": block} if block else {})
    names = ["x", "s", *(["zp"] if zero_point else [])]
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", names, ["y"], **attributes)], "dq", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(a, n) for a, n in ((x, "x"), (scale, "s"), (zp, "zp"))
                     if a is not None],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    (want,) = session_for(proto.SerializeToString()).run(None, {})
    got = dequantize(x, scale, zp, attributes["axis"], block)
    np.testing.assert_array_equal(got, want)


def test_four_bit_tensor_that_is_not_a_constant_is_named(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["x", "s"], ["y"], name="dq_input")], "dq",
        [helper.make_tensor_value_info("x", TensorProto.INT4, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[numpy_helper.from_array(np.float32(0.5), "s")],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    with pytest.raises(UnsupportedOpError, match="DequantizeLinear node 'dq_input'.*4-bit"):
        TVM_LLVM.build(model, tmp_path, {})
