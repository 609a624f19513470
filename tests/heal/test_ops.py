"""The heal interpreter's op table on tiny graphs: dispatch by opset version, attributes as keywords
with ONNX's defaults, and a refusal (before anything runs) of what it does not implement.

Expected values are written out or computed with numpy from the ONNX operator definitions."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from slimgraph.errors import UnsupportedOpError
from slimgraph.heal.module import GraphModule, unsupported_nodes
from slimgraph.heal.ops import resolve

X = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 10


def _model(node, opset: int, inits=(), outputs=1, out_shape=None) -> ir.Model:
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(X.shape))],
        [helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, out_shape)
         for k in range(outputs)],
        initializer=[numpy_helper.from_array(a, n) for n, a in inits])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ir.from_proto(proto)


def _run(model: ir.Model) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.numpy() for t in GraphModule(model)(x=torch.from_numpy(X))]


def _ys(n: int) -> list[str]:
    return [f"y{k}" for k in range(n)]


def test_resolve_picks_the_newest_version_at_or_below_the_opset():
    assert resolve("ReduceSum", opset=12) is not resolve("ReduceSum", opset=13)
    assert resolve("ReduceSum", opset=13) is resolve("ReduceSum", opset=21)
    assert resolve("ReduceSum", "ai.onnx", 13) is resolve("ReduceSum", "", 13)
    assert resolve("Gelu", opset=19) is None  # Gelu arrived in opset 20
    assert resolve("NoSuchOp", opset=21) is None
    assert resolve("Relu", "com.microsoft", 1) is None


def test_reduce_sum_reads_axes_from_the_attribute_before_13_and_the_input_from_13():
    want = X.sum(axis=1, keepdims=True)
    old = _model(helper.make_node("ReduceSum", ["x"], ["y0"], axes=[1]), 12)
    new = _model(helper.make_node("ReduceSum", ["x", "axes"], ["y0"]), 13,
                 [("axes", np.array([1], np.int64))])
    np.testing.assert_allclose(_run(old)[0], want, rtol=1e-6)
    np.testing.assert_allclose(_run(new)[0], want, rtol=1e-6)
    # Opset 13 has no axes attribute: the node is refused, not run with the attribute ignored.
    wrong = _model(helper.make_node("ReduceSum", ["x"], ["y0"], axes=[1]), 13)
    with pytest.raises(UnsupportedOpError, match="attribute.*axes"):
        GraphModule(wrong)


def test_softmax_before_13_flattens_to_2d_at_the_axis():
    old = _model(helper.make_node("Softmax", ["x"], ["y0"], axis=1), 11)
    new = _model(helper.make_node("Softmax", ["x"], ["y0"], axis=1), 13)
    flat = X.reshape(2, 12)
    want_old = (np.exp(flat) / np.exp(flat).sum(axis=1, keepdims=True)).reshape(X.shape)
    want_new = np.exp(X) / np.exp(X).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(_run(old)[0], want_old, rtol=1e-5)
    np.testing.assert_allclose(_run(new)[0], want_new, rtol=1e-5)
    assert not np.allclose(want_old, want_new)


@pytest.mark.parametrize("opset, make, inits", [
    (11, lambda: helper.make_node("Split", ["x"], _ys(2), axis=2, split=[1, 3]), ()),
    (13, lambda: helper.make_node("Split", ["x", "s"], _ys(2), axis=2), [("s", np.array([1, 3]))]),
    (18, lambda: helper.make_node("Split", ["x", "s"], _ys(2), axis=2), [("s", np.array([1, 3]))]),
])
def test_split_sizes_by_attribute_or_input(opset, make, inits):
    got = _run(_model(make(), opset, inits, outputs=2))
    np.testing.assert_array_equal(got[0], X[:, :, :1])
    np.testing.assert_array_equal(got[1], X[:, :, 1:])


@pytest.mark.parametrize("opset, attrs", [(11, {}), (13, {}), (18, {"num_outputs": 2})])
def test_split_into_equal_parts(opset, attrs):
    got = _run(_model(helper.make_node("Split", ["x"], _ys(2), axis=2, **attrs), opset, outputs=2))
    np.testing.assert_array_equal(got[0], X[:, :, :2])
    np.testing.assert_array_equal(got[1], X[:, :, 2:])


@pytest.mark.parametrize("exclusive, reverse", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_cumsum_exclusive_and_reverse(exclusive, reverse):
    node = helper.make_node("CumSum", ["x", "axis"], ["y0"], exclusive=exclusive, reverse=reverse)
    got = _run(_model(node, 14, [("axis", np.array(2, np.int64))]))[0]
    a = X[..., ::-1] if reverse else X
    want = np.cumsum(a, axis=2) - (a if exclusive else 0)
    np.testing.assert_allclose(got, want[..., ::-1] if reverse else want, rtol=1e-6, atol=1e-6)


def test_attributes_take_onnx_defaults():
    leaky = _model(helper.make_node("LeakyRelu", ["x"], ["y0"]), 16)
    x = X - 1
    with torch.no_grad():
        got = GraphModule(leaky)(x=torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(got, np.where(x >= 0, x, 0.01 * x), rtol=1e-6)


def test_an_attribute_the_op_does_not_implement_is_named_before_anything_runs():
    model = _model(helper.make_node("Relu", ["x"], ["y0"], name="act", note=3), 21)
    assert unsupported_nodes(model) == ["Relu (act: attribute(s) note not supported)"]
    with pytest.raises(UnsupportedOpError, match=r"Relu \(act: attribute\(s\) note"):
        GraphModule(model)


def test_an_op_newer_than_the_opset_is_refused():
    model = _model(helper.make_node("Gelu", ["x"], ["y0"], name="g"), 19)
    assert unsupported_nodes(model) == ["Gelu (g)"]


@pytest.mark.parametrize("to", [TensorProto.FLOAT8E4M3FN, TensorProto.INT4, TensorProto.STRING])
def test_cast_to_a_type_torch_cannot_hold_exactly_is_refused(to):
    model = _model(helper.make_node("Cast", ["x"], ["y0"], to=to, name="c"), 21)
    with pytest.raises(UnsupportedOpError, match="Cast to"):
        _run(model)


def test_cast_targets_come_from_onnx_ir():
    model = _model(helper.make_node("Cast", ["x"], ["y0"], to=TensorProto.INT32), 21)
    got = _run(model)[0]
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, X.astype(np.int32))
