"""prune-channels: one small graph per coupling rule, planted dead channels, options, export."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import slimgraph
from slimgraph.calibration import Calibration
from slimgraph.cli import main
from slimgraph.errors import PipelineSpecError, UnsupportedOpError
from slimgraph.passes import Pipeline, PruneChannelsPass
from slimgraph.passes.prune.channel_groups import ChannelGroups

RNG = np.random.default_rng(0)


def _w(*shape: int, scale: float = 0.5) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _model(nodes, inits: dict[str, np.ndarray], x_shape=(2, 3, 6, 6), out_shape=None,
           opset: int = 17) -> ir.Model:
    """A graph with one input ``x``, one output ``y`` and the given initializers."""
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 9
    if out_shape is None:
        inferred = onnx.shape_inference.infer_shapes(proto)
        proto.graph.output[0].CopyFrom(inferred.graph.output[0])
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.to_proto(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _prune(model: ir.Model, x_shape=(2, 3, 6, 6), exact: bool = True, **options):
    """Run the pass; check the graph, the output shape and (exact) the values; return the pass."""
    x = RNG.standard_normal(x_shape).astype(np.float32)
    ref = _run(model, x)
    p = PruneChannelsPass(**options)
    result = p(model)
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    out = _run(result.model, x)
    assert out.shape == ref.shape
    if exact:
        assert np.abs(out - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    return p, result


def _shape(model: ir.Model, name: str) -> tuple[int, ...]:
    for node in model.graph:
        if node.name == name:
            return tuple(node.inputs[1].const_value.shape.numpy())
    raise KeyError(name)


def _conv(name, x, y, pads=1, group=1, bias=True):
    inputs = [x, f"{name}_w"] + ([f"{name}_b"] if bias else [])
    return helper.make_node("Conv", inputs, [y], name=name, pads=[pads] * 4, group=group)


def _head(x: str, channels: int, classes: int = 5) -> tuple[list, dict]:
    """GlobalAveragePool -> Flatten -> Gemm classifier reading ``x``."""
    nodes = [helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1)]
    return nodes, {"fc_w": _w(classes, channels), "fc_b": _w(classes)}


def _chain(dead_bias: float = 0.0, second_pads: int = 1) -> ir.Model:
    """conv1(3->8) -> Relu -> conv2(8->6) -> Relu -> head; conv1 channel 2 has zero weights."""
    w1, b1 = _w(8, 3, 3, 3), _w(8)
    w1[2], b1[2] = 0.0, dead_bias
    k = 3 if second_pads else 1
    head, head_inits = _head("r2", 6)
    nodes = [_conv("conv1", "x", "c1"), helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             _conv("conv2", "r1", "c2", pads=second_pads),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"), *head]
    return _model(nodes, {"conv1_w": w1, "conv1_b": b1, "conv2_w": _w(6, 8, k, k),
                          "conv2_b": _w(6), **head_inits})


# -- dead channels -----------------------------------------------------------------------------

def test_zero_weight_slice_is_removed_exactly():
    model = _chain()
    p, result = _prune(model)
    assert result.modified and p.report.counts["dead_channels"] == 1
    assert _shape(model, "conv1") == (7, 3, 3, 3)
    assert _shape(model, "conv2") == (6, 7, 3, 3)
    assert p.report.counts["macs_after"] < p.report.counts["macs_before"]
    assert any("conv1: 8 -> 7" in n for n in p.report.notes)


def test_nothing_dead_means_not_modified():
    w1 = _w(8, 3, 3, 3)
    head, inits = _head("r", 8)
    model = _model([_conv("conv1", "x", "c"), helper.make_node("Relu", ["c"], ["r"]), *head],
                   {"conv1_w": w1, "conv1_b": _w(8), **inits})
    p, result = _prune(model)
    assert not result.modified and p.report.counts["dead_channels"] == 0


def test_constant_channel_before_padded_conv_stays():
    # Relu(1.0) is a constant 1 inside the image but conv2 sees zero padding at the border.
    p, result = _prune(_chain(dead_bias=1.0, second_pads=1))
    assert not result.modified


def test_constant_channel_is_folded_into_unpadded_conv_bias():
    model = _chain(dead_bias=1.0, second_pads=0)
    p, result = _prune(model)
    assert result.modified and _shape(model, "conv2") == (6, 7, 1, 1)


def test_constant_channel_is_folded_into_gemm_bias():
    w1, b1 = _w(8, 3, 3, 3), _w(8)
    w1[5], b1[5] = 0.0, 0.7
    head, inits = _head("r", 8)
    model = _model([_conv("conv1", "x", "c"), helper.make_node("Relu", ["c"], ["r"]), *head],
                   {"conv1_w": w1, "conv1_b": b1, **inits})
    p, result = _prune(model, protect=[])
    assert result.modified and _shape(model, "fc") == (5, 7)


def test_zero_batchnorm_scale_is_removed():
    scale, beta = np.abs(_w(8)) + 0.5, _w(8)
    scale[[1, 4]], beta[[1, 4]] = 0.0, -0.5  # Relu(-0.5) = 0: exact even before a padded conv
    head, inits = _head("r2", 6)
    nodes = [_conv("conv1", "x", "c1", bias=False),
             helper.make_node("BatchNormalization", ["c1", "s", "b", "m", "v"], ["n1"], name="bn"),
             helper.make_node("Relu", ["n1"], ["r1"]), _conv("conv2", "r1", "c2"),
             helper.make_node("Relu", ["c2"], ["r2"]), *head]
    model = _model(nodes, {"conv1_w": _w(8, 3, 3, 3), "s": scale, "b": beta, "m": _w(8),
                           "v": np.abs(_w(8)) + 0.1, "conv2_w": _w(6, 8, 3, 3), "conv2_b": _w(6),
                           **inits})
    p, result = _prune(model)
    assert p.report.counts["dead_channels"] == 2
    assert _shape(model, "conv1") == (6, 3, 3, 3) and _shape(model, "conv2") == (6, 6, 3, 3)
    bn = next(n for n in model.graph if n.op_type == "BatchNormalization")
    assert all(v.const_value.shape.numpy() == (6,) for v in bn.inputs[1:])


def test_dead_relu_under_calibration():
    w1, b1 = _w(8, 3, 3, 3), _w(8)
    b1[3] = -100.0  # never positive on normal inputs
    head, inits = _head("r", 8)
    nodes = [_conv("conv1", "x", "c"), helper.make_node("Relu", ["c"], ["r"], name="relu"), *head]
    model = _model(nodes, {"conv1_w": w1, "conv1_b": b1, **inits})
    assert not PruneChannelsPass(protect=[])(model).modified
    p = PruneChannelsPass(active=True, protect=[])
    assert p.needs_calibration
    p.calibration = Calibration({"x": RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)}
                                for _ in range(4))
    x = RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)
    ref = _run(model, x)
    assert p(model).modified and _shape(model, "conv1") == (7, 3, 3, 3)
    np.testing.assert_allclose(_run(model, x), ref, rtol=1e-5, atol=1e-5)


def test_active_without_calibration_is_a_clear_error():
    with pytest.raises(PipelineSpecError, match="calibration"):
        PruneChannelsPass(active=True)(_chain())


# -- coupling rules ----------------------------------------------------------------------------

def _residual(dead_in: tuple[str, ...]) -> ir.Model:
    """conv_a and conv_b (3->8) added, Relu, conv_c (8->6), head; channel 3 zeroed in ``dead_in``."""
    inits = {f"{n}_{k}": v for n in ("conv_a", "conv_b") for k, v in (("w", _w(8, 3, 3, 3)),
                                                                      ("b", _w(8)))}
    for name in dead_in:
        inits[f"{name}_w"][3], inits[f"{name}_b"][3] = 0.0, 0.0
    head, head_inits = _head("r2", 6)
    nodes = [_conv("conv_a", "x", "a"), _conv("conv_b", "x", "b"),
             helper.make_node("Add", ["a", "b"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["r"]), _conv("conv_c", "r", "c"),
             helper.make_node("Relu", ["c"], ["r2"]), *head]
    return _model(nodes, {**inits, "conv_c_w": _w(6, 8, 3, 3), "conv_c_b": _w(6), **head_inits})


def test_residual_add_couples_both_sides():
    assert not _prune(_residual(("conv_a",)), protect=[])[1].modified
    model = _residual(("conv_a", "conv_b"))
    p, result = _prune(model, protect=[])
    assert result.modified
    assert _shape(model, "conv_a")[0] == _shape(model, "conv_b")[0] == 7
    groups = ChannelGroups(_residual(()))
    assert ["conv_a", "conv_b"] in [g.layers for g in groups.groups()]


def test_residual_importance_pruning_keeps_sides_equal():
    model = _residual(())
    p, _ = _prune(model, exact=False, ratio=0.5, protect=[])
    assert _shape(model, "conv_a")[0] == _shape(model, "conv_b")[0] == 4
    assert _shape(model, "conv_c") == (3, 4, 3, 3)


def test_concat_maps_offsets():
    wa, wb = _w(4, 3, 3, 3), _w(6, 3, 3, 3)
    bb = _w(6)
    wb[1], bb[1] = 0.0, 0.0  # concat channel 4 + 1 = 5
    wc = _w(6, 10, 3, 3)
    head, inits = _head("c", 6)
    nodes = [_conv("conv_a", "x", "a"), _conv("conv_b", "x", "b"),
             helper.make_node("Concat", ["a", "b"], ["cat"], axis=1, name="cat"),
             _conv("conv_c", "cat", "c"), *head]
    model = _model(nodes, {"conv_a_w": wa, "conv_a_b": _w(4), "conv_b_w": wb, "conv_b_b": bb,
                           "conv_c_w": wc, "conv_c_b": _w(6), **inits})
    _prune(model, protect=[])
    new_wc = next(n for n in model.graph if n.name == "conv_c").inputs[1].const_value.numpy()
    np.testing.assert_array_equal(new_wc, np.delete(wc, 5, axis=1))


def test_concat_with_unprunable_input_prunes_the_rest():
    head, inits = _head("c", 6)
    nodes = [_conv("conv_a", "x", "a"),
             helper.make_node("Concat", ["a", "x"], ["cat"], axis=1, name="cat"),
             _conv("conv_c", "cat", "c"), *head]
    model = _model(nodes, {"conv_a_w": _w(8, 3, 3, 3), "conv_a_b": _w(8),
                           "conv_c_w": _w(6, 11, 3, 3), "conv_c_b": _w(6), **inits})
    _prune(model, exact=False, ratio=0.5, protect=[])
    assert _shape(model, "conv_a")[0] == 4 and _shape(model, "conv_c")[1] == 7


def test_depthwise_conv_shrinks_its_groups():
    w1, b1 = _w(8, 3, 3, 3), _w(8)
    w1[6], b1[6] = 0.0, 0.0
    head, inits = _head("p", 5)
    nodes = [_conv("conv1", "x", "c1"), helper.make_node("Relu", ["c1"], ["r1"]),
             _conv("dw", "r1", "d", group=8), helper.make_node("Relu", ["d"], ["r2"]),
             _conv("pw", "r2", "p", pads=0), *head]
    # dw's bias makes its dead group a constant, which folds into the 1x1 pointwise conv.
    model = _model(nodes, {"conv1_w": w1, "conv1_b": b1, "dw_w": _w(8, 1, 3, 3), "dw_b": _w(8),
                           "pw_w": _w(5, 8, 1, 1), "pw_b": _w(5), **inits})
    p, result = _prune(model, protect=[])
    assert result.modified and _shape(model, "dw") == (7, 1, 3, 3)
    assert next(n for n in model.graph if n.name == "dw").attributes.get_int("group") == 7


def test_grouped_conv_prunes_whole_groups():
    head, inits = _head("g", 12)
    nodes = [_conv("conv1", "x", "c1"), helper.make_node("Relu", ["c1"], ["r1"]),
             _conv("grouped", "r1", "g", group=4), *head]
    model = _model(nodes, {"conv1_w": _w(8, 3, 3, 3), "conv1_b": _w(8),
                           "grouped_w": _w(12, 2, 3, 3), "grouped_b": _w(12), **inits})
    _prune(model, exact=False, ratio=0.5, protect=[])
    grouped = next(n for n in model.graph if n.name == "grouped")
    assert grouped.attributes.get_int("group") == 2
    assert _shape(model, "grouped") == (6, 2, 3, 3) and _shape(model, "conv1")[0] == 4


def _flatten_head(reshape: bool) -> ir.Model:
    """conv (3->4) -> Relu -> Flatten or Reshape [N, 4*6*6] -> Gemm; channel 2 dead."""
    w, b = _w(4, 3, 3, 3), _w(4)
    w[2], b[2] = 0.0, 0.0
    flatten = (helper.make_node("Reshape", ["r", "shape"], ["f"], name="reshape") if reshape
               else helper.make_node("Flatten", ["r"], ["f"], name="flatten"))
    nodes = [_conv("conv", "x", "c"), helper.make_node("Relu", ["c"], ["r"]), flatten,
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1)]
    inits = {"conv_w": w, "conv_b": b, "fc_w": _w(5, 144), "fc_b": _w(5)}
    if reshape:
        inits["shape"] = np.array([-1, 144], np.int64)
    return _model(nodes, inits)


@pytest.mark.parametrize("reshape", [False, True])
def test_flatten_into_gemm_removes_feature_blocks(reshape):
    model = _flatten_head(reshape)
    fc_w = model.graph.initializers["fc_w"].const_value.numpy()
    _prune(model, protect=[])
    new = next(n for n in model.graph if n.name == "fc").inputs[1].const_value.numpy()
    np.testing.assert_array_equal(new, np.delete(fc_w, np.s_[72:108], axis=1))
    _prune(_flatten_head(reshape), exact=False, ratio=0.5, protect=[])


def test_split_sizes_follow():
    w, b = _w(8, 3, 3, 3), _w(8)
    w[[0, 5]], b[[0, 5]] = 0.0, 0.0
    nodes = [_conv("conv", "x", "c"),
             helper.make_node("Split", ["c", "sizes"], ["s1", "s2"], axis=1, name="split"),
             _conv("conv_p", "s1", "p"), _conv("conv_q", "s2", "q"),
             helper.make_node("Concat", ["p", "q"], ["pq"], axis=1), *_head("pq", 8)[0]]
    model = _model(nodes, {"conv_w": w, "conv_b": b, "sizes": np.array([3, 5], np.int64),
                           "conv_p_w": _w(4, 3, 3, 3), "conv_p_b": _w(4),
                           "conv_q_w": _w(4, 5, 3, 3), "conv_q_b": _w(4), **_head("pq", 8)[1]})
    _prune(model, protect=[])
    assert _shape(model, "conv_p") == (4, 2, 3, 3) and _shape(model, "conv_q") == (4, 4, 3, 3)
    _prune(model, exact=False, ratio=0.5, protect=[])


def test_slice_bounds_follow():
    w, b = _w(8, 3, 3, 3), _w(8)
    w[[1, 3]], b[[1, 3]] = 0.0, 0.0  # channel 1 is outside the slice 2:6, channel 3 inside
    nodes = [_conv("conv", "x", "c"),
             helper.make_node("Slice", ["c", "st", "en", "ax"], ["s"], name="slice"),
             _conv("conv_s", "s", "cs"), *_head("cs", 4)[0]]
    model = _model(nodes, {"conv_w": w, "conv_b": b, "st": np.array([2], np.int64),
                           "en": np.array([6], np.int64), "ax": np.array([1], np.int64),
                           "conv_s_w": _w(4, 4, 3, 3), "conv_s_b": _w(4), **_head("cs", 4)[1]})
    # Channels outside the slice are read by nobody; channel 3 reaches conv_s as zeros.
    _prune(model, protect=[])
    assert _shape(model, "conv") == (3, 3, 3, 3) and _shape(model, "conv_s") == (4, 3, 3, 3)
    _prune(model, exact=False, ratio=0.5, protect=[])


def test_pad_pool_resize_pass_channels_through():
    w, b = _w(8, 3, 3, 3), _w(8)
    w[4], b[4] = 0.0, 0.0
    nodes = [_conv("conv", "x", "c"), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Pad", ["r", "pads"], ["pd"], name="pad"),
             helper.make_node("MaxPool", ["pd"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Resize", ["mp", "", "scales"], ["rs"], mode="nearest"),
             _conv("conv2", "rs", "c2"), *_head("c2", 6)[0]]
    model = _model(nodes, {"conv_w": w, "conv_b": b,
                           "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
                           "scales": np.array([1, 1, 2, 2], np.float32),
                           "conv2_w": _w(6, 8, 3, 3), "conv2_b": _w(6), **_head("c2", 6)[1]})
    _prune(model, protect=[])
    assert _shape(model, "conv2") == (6, 7, 3, 3)


def test_padding_the_channel_axis_blocks():
    w, b = _w(8, 3, 3, 3), _w(8)
    w[4], b[4] = 0.0, 0.0
    nodes = [_conv("conv", "x", "c"),
             helper.make_node("Pad", ["c", "pads"], ["pd"], name="pad"),
             _conv("conv2", "pd", "c2"), *_head("c2", 6)[0]]
    model = _model(nodes, {"conv_w": w, "conv_b": b,
                           "pads": np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64),
                           "conv2_w": _w(6, 10, 3, 3), "conv2_b": _w(6), **_head("c2", 6)[1]})
    assert not _prune(model, protect=[])[1].modified


def test_softmax_over_channels_blocks():
    w, b = _w(8, 3, 3, 3), _w(8)
    w[4], b[4] = 0.0, 0.0
    nodes = [_conv("conv", "x", "c"), helper.make_node("Softmax", ["c"], ["sm"], axis=1),
             _conv("conv2", "sm", "c2"), *_head("c2", 6)[0]]
    model = _model(nodes, {"conv_w": w, "conv_b": b, "conv2_w": _w(6, 8, 3, 3),
                           "conv2_b": _w(6), **_head("c2", 6)[1]})
    assert not _prune(model, protect=[])[1].modified
    groups = ChannelGroups(model).groups()
    assert any("normalises over channels" in r for g in groups for r in g.reasons)


def test_graph_output_blocks():
    w, b = _w(8, 3, 3, 3), _w(8)
    w[4], b[4] = 0.0, 0.0
    model = _model([_conv("conv", "x", "y")], {"conv_w": w, "conv_b": b})
    assert not _prune(model, ratio=0.5, protect=[])[1].modified


def test_matmul_mlp_and_transpose_free_bias_add():
    w1, b1 = _w(16, 32), _w(32)
    w1[:, 7], b1[7] = 0.0, -1.0  # Relu(-1) = 0
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("Relu", ["hb"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    model = _model(nodes, {"w1": w1, "b1": b1, "w2": _w(32, 4)}, x_shape=(2, 5, 16))
    p, result = _prune(model, x_shape=(2, 5, 16), protect=[])
    assert _shape(model, "fc1") == (16, 31) and _shape(model, "fc2") == (31, 4)
    _prune(model, x_shape=(2, 5, 16), exact=False, ratio=0.5, round_to=8, protect=[])
    assert _shape(model, "fc1") == (16, 16)


def test_reduce_sum_of_a_constant_channel_is_not_that_constant():
    # Relu(1.0) is 1 everywhere, but ReduceSum over 6x6 makes it 36: folding 1.0 would be wrong.
    w1, b1 = _w(8, 3, 3, 3), _w(8)
    w1[2], b1[2] = 0.0, 1.0
    nodes = [_conv("conv1", "x", "c"), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("ReduceSum", ["r", "axes"], ["s"], keepdims=0, name="sum"),
             helper.make_node("Gemm", ["s", "fc_w", "fc_b"], ["y"], name="fc", transB=1)]
    model = _model(nodes, {"conv1_w": w1, "conv1_b": b1, "axes": np.array([2, 3], np.int64),
                           "fc_w": _w(5, 8), "fc_b": _w(5)})
    assert not _prune(model, protect=[])[1].modified


# -- attention heads ---------------------------------------------------------------------------

SEQ, HEADS, HEAD_DIM = 5, 4, 8
EMBED = HEADS * HEAD_DIM
SCALE = np.float32(1 / np.sqrt(HEAD_DIM))


def _attention(masked: bool = True, **planted: int) -> ir.Model:
    """A BERT layer as exported by torch: Q/K/V MatMul+Add, Reshape to heads, Transpose, scaled
    QK^T with an additive (causal) mask, Softmax, @V, merge, output projection, residual; then a Gelu FFN.

    ``planted``: ``zero_v``/``zero_q``/``zero_out`` zero one head's V columns (and bias), Q columns
    (and bias) or output-projection rows; ``dead_ffn`` zeroes one FFN neuron.
    """
    inits = {f"{n}_{k}": v for n in "qkv" for k, v in (("w", _w(EMBED, EMBED)), ("b", _w(EMBED)))}
    inits.update(o_w=_w(EMBED, EMBED), o_b=_w(EMBED), f1_w=_w(EMBED, 64), f1_b=_w(64),
                 f2_w=_w(64, EMBED), f2_b=_w(EMBED), scale=SCALE,
                 mask=np.triu(np.full((1, 1, SEQ, SEQ), -1e4, np.float32), 1),
                 split=np.array([-1, SEQ, HEADS, HEAD_DIM], np.int64),
                 merge=np.array([-1, SEQ, EMBED], np.int64))
    for key, proj in (("zero_v", "v"), ("zero_q", "q")):
        if key in planted:
            cols = np.s_[planted[key] * HEAD_DIM:(planted[key] + 1) * HEAD_DIM]
            inits[f"{proj}_w"][:, cols], inits[f"{proj}_b"][cols] = 0.0, 0.0
    if "zero_out" in planted:
        inits["o_w"][planted["zero_out"] * HEAD_DIM:(planted["zero_out"] + 1) * HEAD_DIM] = 0.0
    if "dead_ffn" in planted:
        inits["f1_w"][:, planted["dead_ffn"]], inits["f1_b"][planted["dead_ffn"]] = 0.0, 0.0
    node = helper.make_node
    nodes = []
    for n in "qkv":
        nodes += [node("MatMul", ["x", f"{n}_w"], [f"{n}_mm"], name=f"{n}_proj"),
                  node("Add", [f"{n}_mm", f"{n}_b"], [f"{n}_lin"]),
                  node("Reshape", [f"{n}_lin", "split"], [f"{n}_heads"], name=f"{n}_split")]
    nodes += [node("Transpose", ["q_heads"], ["q_t"], perm=[0, 2, 1, 3]),
              node("Transpose", ["k_heads"], ["k_t"], perm=[0, 2, 3, 1]),
              node("Transpose", ["v_heads"], ["v_t"], perm=[0, 2, 1, 3]),
              node("MatMul", ["q_t", "k_t"], ["scores"], name="qk"),
              node("Mul", ["scores", "scale"], ["scaled"], name="scale"),
              node("Add", ["scaled", "mask"], ["masked"]) if masked
              else node("Identity", ["scaled"], ["masked"]),
              node("Softmax", ["masked"], ["probs"], axis=-1),
              node("MatMul", ["probs", "v_t"], ["ctx"], name="pv"),
              node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
              node("Reshape", ["ctx_t", "merge"], ["ctx_m"], name="merge"),
              node("MatMul", ["ctx_m", "o_w"], ["o_mm"], name="o_proj"),
              node("Add", ["o_mm", "o_b"], ["o_lin"]),
              node("Add", ["o_lin", "x"], ["h"]),
              node("MatMul", ["h", "f1_w"], ["f1_mm"], name="ffn1"),
              node("Add", ["f1_mm", "f1_b"], ["f1_lin"]),
              node("Gelu", ["f1_lin"], ["f1_act"]),
              node("MatMul", ["f1_act", "f2_w"], ["f2_mm"], name="ffn2"),
              node("Add", ["f2_mm", "f2_b"], ["f2_lin"]),
              node("Add", ["f2_lin", "h"], ["y"])]
    return _model(nodes, inits, x_shape=(2, SEQ, EMBED), opset=20)


ATTN_X = (2, SEQ, EMBED)


def _kept_heads(model: ir.Model) -> int:
    split = next(n for n in model.graph if n.name == "v_split").inputs[1].const_value.numpy()
    return int(split[2])


def test_attention_heads_form_one_group():
    groups = ChannelGroups(_attention()).groups()
    heads = [g for g in groups if g.heads]
    assert [g.layers for g in heads] == [["q_proj", "k_proj", "v_proj"]]
    assert len(heads[0].units) == HEADS and heads[0].prunable
    assert next(g for g in groups if g.layers == ["ffn1"]).heads is False


def test_zero_value_head_is_removed_exactly():
    model = _attention(zero_v=2, dead_ffn=5)
    p, result = _prune(model, x_shape=ATTN_X, protect=[])
    assert result.modified and p.report.counts["heads_removed"] == 1
    assert p.report.counts["dead_channels"] == 3 * HEAD_DIM + 1
    for name in ("q_proj", "k_proj", "v_proj"):
        assert _shape(model, name) == (EMBED, EMBED - HEAD_DIM)
    assert _shape(model, "o_proj") == (EMBED - HEAD_DIM, EMBED)
    assert _shape(model, "ffn1") == (EMBED, 63) and _kept_heads(model) == HEADS - 1
    merge = next(n for n in model.graph if n.name == "merge").inputs[1].const_value.numpy()
    assert merge.tolist() == [-1, SEQ, EMBED - HEAD_DIM]
    scale = next(n for n in model.graph if n.name == "scale").inputs[1].const_value.numpy()
    assert scale == SCALE


def test_zero_output_rows_remove_their_head_exactly():
    model = _attention(zero_out=0)
    p, result = _prune(model, x_shape=ATTN_X, protect=[])
    assert result.modified and _kept_heads(model) == HEADS - 1


def test_zero_query_head_is_not_dead():
    # Zero queries give uniform attention (Softmax of zeros), not a zero output.
    assert not _prune(_attention(masked=False, zero_q=1), x_shape=ATTN_X, protect=[])[1].modified


def test_head_importance_pruning():
    model = _attention()
    v_w = model.graph.initializers["v_w"].const_value.numpy().copy()
    p, _ = _prune(model, x_shape=ATTN_X, exact=False, ratio=0.5, protect=[])
    assert _kept_heads(model) == 2 and _shape(model, "ffn1") == (EMBED, 32)
    assert p.report.counts["heads_removed"] == 2
    new_v = next(n for n in model.graph if n.name == "v_proj").inputs[1].const_value.numpy()
    kept = [h for h in range(HEADS) if any(np.array_equal(new_v[:, i * HEAD_DIM:(i + 1) * HEAD_DIM],
                                                          v_w[:, h * HEAD_DIM:(h + 1) * HEAD_DIM])
                                           for i in range(2))]
    assert len(kept) == 2  # whole heads survive, not a mix of columns


@pytest.mark.parametrize("options, heads, ffn", [
    ({"heads": 0.5}, 2, 64),
    ({"ratio": 0.5, "heads": 0.0}, HEADS, 32),
    ({"ratio": 0.25, "heads": 0.75, "round_to": 8}, 1, 48),
    ({"ratio": 0.5, "heads": 0.5, "scope": "global"}, 2, 32),
])
def test_heads_option(options, heads, ffn):
    model = _attention()
    _prune(model, x_shape=ATTN_X, exact=False, protect=[], **options)
    assert _kept_heads(model) == heads and _shape(model, "ffn1")[1] == ffn


# -- importance pruning and options ------------------------------------------------------------

def test_ratio_keeps_the_largest_channels_and_protects_the_first_conv():
    model = _chain()
    w2 = model.graph.initializers["conv2_w"].const_value.numpy().copy()
    p, _ = _prune(model, exact=False, ratio=0.5)
    assert _shape(model, "conv1") == (7, 3, 3, 3)  # protected by default: only its dead channel goes
    assert _shape(model, "conv2")[0] == 3
    assert p.report.counts["pruned_channels"] == 3
    fc_w = model.graph.initializers.get("fc_w")
    assert fc_w is None or not fc_w.uses()  # the head was sliced into a new initializer
    scores = (w2**2).sum(axis=(1, 2, 3))
    assert scores.argmin() not in np.argsort(scores)[-3:]


def test_macs_target_is_met():
    model = _residual(())
    p, _ = _prune(model, exact=False, macs=0.5, protect=[])
    assert p.report.counts["macs_after"] <= 0.5 * p.report.counts["macs_before"]


def test_global_scope_and_bn_importance_run():
    _prune(_residual(()), exact=False, ratio=0.4, scope="global", importance="l1", protect=[])
    p, _ = _prune(_residual(()), exact=False, ratio=0.4, importance="bn", protect=[])
    assert any("importance=bn" in n for n in p.report.notes)


@pytest.mark.parametrize("spec, message", [
    ("prune-channels:ratio=1.5", "ratio must be in"),
    ("prune-channels:ratio=0", "ratio must be in"),
    ("prune-channels:ratio=0.5,macs=0.5", "not both"),
    ("prune-channels:importance=l3", "importance must be one of"),
    ("prune-channels:scope=local", "scope must be one of"),
    ("prune-channels:round_to=0", "round_to"),
    ("prune-channels:heads=1", "heads"),
    ("prune-channels:heads=-0.5", "heads"),
    ("prune-channels:rate=0.5", "unknown option"),
])
def test_bad_options(spec, message):
    with pytest.raises(PipelineSpecError, match=message):
        Pipeline.parse(spec)


def test_unknown_protected_layer():
    with pytest.raises(PipelineSpecError, match="unknown layer 'nope'.*conv1"):
        PruneChannelsPass(ratio=0.5, protect=["nope"])(_chain())


def test_spec_round_trip_and_lossy_tolerance():
    pipeline = Pipeline.parse("prune-channels:ratio=0.5,protect=conv1+fc,round_to=4")
    p = pipeline.passes[0]
    assert p.protect == ["conv1", "fc"] and p.round_to == 4
    assert Pipeline.parse(pipeline.spec()).spec() == pipeline.spec()
    assert pipeline.tolerance.min_cosine < 0.99
    assert Pipeline.parse("prune-channels").tolerance == PruneChannelsPass.tolerance


def test_quantized_graph_is_refused():
    nodes = [helper.make_node("QuantizeLinear", ["x", "sc", "zp"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "sc", "zp"], ["dq"], name="dq"),
             _conv("conv", "dq", "c"), *_head("c", 8)[0]]
    model = _model(nodes, {"sc": np.float32(0.1), "zp": np.int8(0), "conv_w": _w(8, 3, 3, 3),
                           "conv_b": _w(8), **_head("c", 8)[1]})
    with pytest.raises(UnsupportedOpError, match="prune before quantizing"):
        PruneChannelsPass(ratio=0.5)(model)


# -- end to end --------------------------------------------------------------------------------

def test_export_with_planted_dead_channels(tmp_path, tiny_cnn_path):
    proto = onnx.load(tiny_cnn_path)
    weights = {t.name: numpy_helper.to_array(t).copy() for t in proto.graph.initializer}
    weights["conv_w"][[1, 6]] = 0.0
    weights["conv_b"][[1, 6]] = -0.25  # Relu -> 0; GlobalAveragePool -> 0; nothing to fold
    proto.graph.ClearField("initializer")
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    path = tmp_path / "planted.onnx"
    onnx.save(proto, path)
    result = slimgraph.export(path, tmp_path / "out", passes="prune-channels:protect=")
    assert result.passed
    report = result.manifest["passes"][0]
    assert report["modified"] and report["counts"]["dead_channels"] == 2
    assert report["counts"]["params_after"] < report["counts"]["params_before"]


@pytest.mark.slow
def test_resnet_tiny_dead_and_ratio(tmp_path):
    result = slimgraph.export("resnet-tiny", tmp_path / "a", passes="prune-channels")
    assert result.passed and not result.manifest["passes"][0]["modified"]
    result = slimgraph.export("resnet-tiny", tmp_path / "b",
                              passes="prune-channels:ratio=0.5,protect=fc")
    counts = result.manifest["passes"][0]["counts"]
    assert result.passed and counts["macs_after"] < 0.3 * counts["macs_before"]


def test_inspect_groups(tiny_cnn_path, capsys):
    assert main(["inspect", str(tiny_cnn_path), "--groups", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert groups == [{"layers": ["conv [conv_w]"], "channels": 8, "heads": False, "prunable": 8,
                       "blocked_by": []}]


@pytest.mark.slow
def test_planted_dead_channels_in_resnet_tiny(tmp_path):
    """A zeroed conv slice, a zero BN scale and a Relu that never fires: all found, exact."""
    import torch

    from slimgraph.frontend.builtin import get_builtin

    builtin = get_builtin("resnet-tiny")
    module = builtin.module
    with torch.no_grad():
        block0, block2, block4 = module.blocks[0], module.blocks[2], module.blocks[4]
        block0.bn1.weight[3] = 0.0  # zero BN scale; beta < 0 so the Relu outputs 0
        block0.bn1.bias[3] = -0.5
        block2.conv1.weight[5] = 0.0  # zeroed slice; BN maps 0 to a negative constant
        block2.bn1.running_mean[5], block2.bn1.bias[5] = 0.0, -0.5
        block4.bn1.bias[7] = -100.0  # never positive on any image
    result = slimgraph.export(module, tmp_path / "out", passes="prune-channels:active=true",
                              inputs={"image": (2, 3, 32, 32)},
                              calibration=builtin.calibration(16))
    assert result.passed
    report = result.manifest["passes"][0]
    assert report["counts"]["dead_channels"] == 3
    for verification in result.verifications:
        for output in verification.outputs:
            assert output.max_rel_err <= 1e-5


# -- planted dead channels in every built-in model -----------------------------------------------

def _zero(value: ir.Value, index, fill: float = 0.0) -> None:
    """Overwrite ``array[index]`` of a constant input with ``fill``."""
    array = value.const_value.numpy().copy()
    array[index] = fill
    value.const_value = ir.tensor(array, name=value.name)


def _node(model: ir.Model, op: str, reads: str) -> ir.Node:
    """The ``op`` node that reads the value named ``reads``."""
    return next(n for n in model.graph
                if n.op_type == op and reads in [v.name for v in n.inputs if v is not None])


def _plant_and_prune(name: str, plant, **options) -> PruneChannelsPass:
    """Load a built-in, plant dead channels, prune; outputs must equal the planted model's."""
    from slimgraph.backends.ort import session_for

    loaded = slimgraph.load(name)
    model = loaded.model
    plant(model)
    feeds = loaded.verification_feeds

    def outputs(m: ir.Model) -> list[np.ndarray]:
        session = session_for(ir.to_proto(m).SerializeToString())
        return [session.run(None, feed)[0] for feed in feeds]

    ref = outputs(model)
    p = PruneChannelsPass(**options)
    p.calibration = loaded.calibration
    p(model)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    for out, expected in zip(outputs(model), ref, strict=True):
        assert np.abs(out - expected).max() <= 1e-5 * np.abs(expected).max()
    return p


@pytest.mark.slow
def test_planted_dead_channels_in_digits_cnn():
    def plant(model: ir.Model) -> None:
        init = model.graph.initializers
        _zero(init["features.0.weight"], 3)  # BatchNorm is folded: a zero BN scale looks like this
        _zero(init["features.0.bias"], 3, -0.3)  # Relu -> 0
        _zero(init["features.4.weight"], 7)
        _zero(init["features.4.bias"], 7, 0.5)  # Relu -> 0.5, MaxPool -> 0.5, folded into the Gemm
        _zero(init["classifier.1.weight"], 11)  # Relu(bias) is a constant: folded into the last Gemm

    p = _plant_and_prune("digits-cnn", plant, protect=[])
    assert p.report.counts["dead_channels"] == 3


@pytest.mark.slow
def test_planted_dead_channels_in_mlp():
    def plant(model: ir.Model) -> None:
        init = model.graph.initializers
        _zero(init["0.weight"], 10)
        _zero(init["0.bias"], 10, -1.0)
        _zero(init["2.weight"], 20)
        _zero(init["2.bias"], 20, 0.7)  # Relu -> 0.7, folded into the last Gemm's bias
        _zero(init["2.weight"], np.s_[:, 30])  # nobody reads neuron 30 of the first layer

    assert _plant_and_prune("mlp", plant).report.counts["dead_channels"] == 3


@pytest.mark.slow
def test_lstm_has_nothing_to_prune():
    # The LSTM op is opaque to the analysis; its only prunable layer feeds the graph output.
    groups = ChannelGroups(slimgraph.load("lstm").model).groups()
    assert not any(g.prunable for g in groups)
    assert _plant_and_prune("lstm", lambda m: None).report.counts["dead_channels"] == 0


@pytest.mark.slow
def test_planted_dead_heads_and_neurons_in_minilm():
    """A zero V head, zero output-projection rows for another head, a zero FFN neuron: exact."""
    prefix = "encoder.encoder.layer"

    def plant(model: ir.Model) -> None:
        init = model.graph.initializers
        v_add = _node(model, "Add", f"{prefix}.0.attention.self.value.bias")
        _zero(v_add.inputs[0].producer().inputs[1], np.s_[:, 96:128])  # head 3 of layer 0
        _zero(init[f"{prefix}.0.attention.self.value.bias"], np.s_[96:128])
        o_add = _node(model, "Add", f"{prefix}.4.attention.output.dense.bias")
        _zero(o_add.inputs[0].producer().inputs[1], np.s_[160:192])  # head 5 of layer 4
        ffn_add = _node(model, "Add", f"{prefix}.2.intermediate.dense.bias")
        _zero(ffn_add.inputs[0].producer().inputs[1], np.s_[:, 100])  # Gelu(0) = 0
        _zero(init[f"{prefix}.2.intermediate.dense.bias"], 100)

    p = _plant_and_prune("minilm", plant)
    assert p.report.counts["heads_removed"] == 2
    assert p.report.counts["dead_channels"] == 2 * 3 * 32 + 1


def test_importance_pruning_writes_the_same_bytes_every_time():
    """Initializers are rewritten in a recorded order (a set of nodes once made it vary)."""
    loaded = slimgraph.load("resnet-tiny")
    outputs = []
    for _ in range(3):
        model, _ = Pipeline.parse("fold-constants,prune-channels:ratio=0.5").run(loaded.model.clone())
        outputs.append(ir.to_proto(model).SerializeToString(deterministic=True))
    assert outputs[0] == outputs[1] == outputs[2]
