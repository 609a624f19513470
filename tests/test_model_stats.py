"""model_stats.infer_shapes: best-effort shape inference that reports why it failed, quietly."""

import logging

import onnx_ir as ir

from slimgraph.model_stats import infer_shapes


def _add(shape_a, shape_b) -> ir.Model:
    a = ir.Value(name="a", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape_a))
    b = ir.Value(name="b", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape_b))
    add = ir.node("Add", [a, b], name="add")
    relu = ir.node("Relu", [add.outputs[0]], name="relu")
    add.outputs[0].name, relu.outputs[0].name = "s", "y"
    graph = ir.Graph([a, b], [relu.outputs[0]], nodes=[add, relu], opset_imports={"": 20})
    return ir.Model(graph, ir_version=10)


def test_infers_shapes_and_types():
    model = _add([2, 3], [3])
    assert infer_shapes(model) is None
    s = model.graph.node("add").outputs[0]
    assert s.dtype == ir.DataType.FLOAT and list(s.shape) == [2, 3]


def test_a_graph_onnx_rejects_is_left_as_declared_with_one_line_and_no_log(capsys, caplog):
    model = _add([2], [3])  # not broadcastable: onnx's strict inference raises
    with caplog.at_level(logging.DEBUG):
        cause = infer_shapes(model)
    assert cause and "\n" not in cause
    assert model.graph.node("add").outputs[0].shape is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert capsys.readouterr().err == ""
