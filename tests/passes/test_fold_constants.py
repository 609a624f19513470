"""fold-constants: each rewrite checked against the unmodified model under onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimgraph.passes import FoldConstantsPass

RNG = np.random.default_rng(0)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _fold(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldConstantsPass, bool]:
    """Fold a copy of ``model``; the folded proto (checked in full), the pass and ``modified``."""
    onnx.checker.check_model(model, full_check=True)
    fold = FoldConstantsPass()
    model_ir = ir.serde.deserialize_model(model)
    result = fold(model_ir)
    folded = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(folded, full_check=True)
    return folded, fold, result.modified


def _assert_same_outputs(
    original: onnx.ModelProto, folded: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> None:
    for want, got in zip(_run(original, feeds), _run(folded, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def _op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _bn_params(channels: int, prefix: str = "bn") -> list[TensorProto]:
    return [
        _init(f"{prefix}_scale", RNG.uniform(0.5, 2.0, channels)),
        _init(f"{prefix}_bias", RNG.normal(size=channels)),
        _init(f"{prefix}_mean", RNG.normal(size=channels)),
        _init(f"{prefix}_var", RNG.uniform(0.1, 2.0, channels)),
    ]


def _bn(x: str, y: str, prefix: str = "bn", **attrs) -> onnx.NodeProto:
    params = [f"{prefix}_{p}" for p in ("scale", "bias", "mean", "var")]
    return helper.make_node("BatchNormalization", [x, *params], [y], epsilon=1e-3, **attrs)


def _vinfo(name: str, shape: list[int], dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("group", [1, 2])
def test_conv_batchnorm_is_folded(with_bias: bool, group: int) -> None:
    inits = [_init("w", RNG.normal(size=(4, 4 // group, 3, 3))), *_bn_params(4)]
    conv_inputs = ["x", "w"]
    if with_bias:
        inits.append(_init("b", RNG.normal(size=4)))
        conv_inputs.append("b")
    model = _model(
        [
            helper.make_node("Conv", conv_inputs, ["c"], pads=[1, 1, 1, 1], group=group),
            _bn("c", "y"),
        ],
        [_vinfo("x", [2, 4, 5, 5])],
        [_vinfo("y", [2, 4, 5, 5])],
        inits,
    )
    folded, fold, modified = _fold(model)
    assert modified
    assert _op_types(folded) == ["Conv"]
    assert fold.report.counts["batchnorms_folded"] == 1
    assert fold.report.counts["nodes_removed"] == 1
    assert fold.report.modified
    _assert_same_outputs(model, folded, {"x": RNG.normal(size=(2, 4, 5, 5)).astype(np.float32)})


def test_conv_transpose_batchnorm_is_folded() -> None:
    # Grouped: W is (C_in, C_out / group, k, k) and output channels are laid out group-major.
    inits = [_init("w", RNG.normal(size=(4, 3, 2, 2))), _init("b", RNG.normal(size=6))]
    model = _model(
        [
            helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], group=2, strides=[2, 2]),
            _bn("c", "y"),
        ],
        [_vinfo("x", [1, 4, 3, 3])],
        [_vinfo("y", [1, 6, 6, 6])],
        [*inits, *_bn_params(6)],
    )
    folded, fold, _ = _fold(model)
    assert _op_types(folded) == ["ConvTranspose"]
    assert fold.report.counts["batchnorms_folded"] == 1
    _assert_same_outputs(model, folded, {"x": RNG.normal(size=(1, 4, 3, 3)).astype(np.float32)})


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_batchnorm_is_folded_with_alpha_and_beta(trans_b: int) -> None:
    w = RNG.normal(size=(5, 3) if trans_b else (3, 5))
    model = _model(
        [
            helper.make_node("Gemm", ["x", "w", "c"], ["g"], alpha=0.5, beta=2.0, transB=trans_b),
            _bn("g", "y"),
        ],
        [_vinfo("x", [4, 3])],
        [_vinfo("y", [4, 5])],
        [_init("w", w), _init("c", RNG.normal(size=(1, 5))), *_bn_params(5)],
    )
    folded, fold, _ = _fold(model)
    assert _op_types(folded) == ["Gemm"]
    assert fold.report.counts["batchnorms_folded"] == 1
    _assert_same_outputs(model, folded, {"x": RNG.normal(size=(4, 3)).astype(np.float32)})


@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_add_batchnorm_is_folded(bias_first: bool) -> None:
    add_inputs = ["b", "m"] if bias_first else ["m", "b"]
    model = _model(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Add", add_inputs, ["a"]),
            _bn("a", "y"),
        ],
        [_vinfo("x", [4, 3])],
        [_vinfo("y", [4, 5])],
        [_init("w", RNG.normal(size=(3, 5))), _init("b", RNG.normal(size=5)), *_bn_params(5)],
    )
    folded, fold, _ = _fold(model)
    assert _op_types(folded) == ["MatMul", "Add"]
    assert fold.report.counts["batchnorms_folded"] == 1
    _assert_same_outputs(model, folded, {"x": RNG.normal(size=(4, 3)).astype(np.float32)})


def test_matmul_batchnorm_is_folded() -> None:
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), _bn("m", "y")],
        [_vinfo("x", [4, 3])],
        [_vinfo("y", [4, 5])],
        [_init("w", RNG.normal(size=(3, 5))), *_bn_params(5)],
    )
    folded, fold, _ = _fold(model)
    assert _op_types(folded) == ["MatMul", "Add"]
    assert fold.report.counts["batchnorms_folded"] == 1
    _assert_same_outputs(model, folded, {"x": RNG.normal(size=(4, 3)).astype(np.float32)})


def test_batchnorm_after_3d_matmul_is_kept() -> None:
    # BN normalises axis 1 (the sequence axis here), not the matmul's output columns.
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), _bn("m", "y")],
        [_vinfo("x", [2, 4, 3])],
        [_vinfo("y", [2, 4, 5])],
        [_init("w", RNG.normal(size=(3, 5))), *_bn_params(4)],
    )
    folded, fold, modified = _fold(model)
    assert _op_types(folded) == ["MatMul", "BatchNormalization"]
    assert fold.report.counts["batchnorms_folded"] == 0
    assert not modified


def test_conv_with_another_consumer_is_not_folded() -> None:
    model = _model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            _bn("c", "y"),
            helper.make_node("Relu", ["c"], ["r"]),
        ],
        [_vinfo("x", [1, 2, 4, 4])],
        [_vinfo("y", [1, 3, 4, 4]), _vinfo("r", [1, 3, 4, 4])],
        [_init("w", RNG.normal(size=(3, 2, 1, 1))), *_bn_params(3)],
    )
    folded, fold, modified = _fold(model)
    assert _op_types(folded) == ["Conv", "BatchNormalization", "Relu"]
    assert fold.report.counts["batchnorms_folded"] == 0
    assert not modified
    _assert_same_outputs(model, folded, {"x": RNG.normal(size=(1, 2, 4, 4)).astype(np.float32)})


def test_shared_weight_and_training_mode_are_not_folded() -> None:
    # Two Convs share W (folding one would need a copy); the second BN runs in training mode.
    model = _model(
        [
            helper.make_node("Conv", ["x", "w"], ["c1"]),
            _bn("c1", "y1"),
            helper.make_node("Conv", ["x", "w"], ["c2"]),
            helper.make_node(
                "BatchNormalization",
                ["c2", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
                ["y2", "running_mean", "running_var"],
                training_mode=1,
            ),
        ],
        [_vinfo("x", [1, 2, 4, 4])],
        [_vinfo("y1", [1, 3, 4, 4]), _vinfo("y2", [1, 3, 4, 4])],
        [_init("w", RNG.normal(size=(3, 2, 1, 1))), *_bn_params(3)],
        opset=15,
    )
    folded, fold, modified = _fold(model)
    assert _op_types(folded).count("BatchNormalization") == 2
    assert fold.report.counts["batchnorms_folded"] == 0
    assert not modified


def test_constant_chain_is_folded_into_one_initializer() -> None:
    # y = x + ((c1 * c2) - Constant) : three constant nodes fold into one initializer.
    const = helper.make_node(
        "Constant", [], ["k"], value=numpy_helper.from_array(np.float32([1.0, 2.0, 3.0]))
    )
    model = _model(
        [
            const,
            helper.make_node("Mul", ["c1", "c2"], ["p"]),
            helper.make_node("Sub", ["p", "k"], ["s"]),
            helper.make_node("Add", ["x", "s"], ["y"]),
        ],
        [_vinfo("x", [2, 3])],
        [_vinfo("y", [2, 3])],
        [_init("c1", RNG.normal(size=3)), _init("c2", RNG.normal(size=3))],
    )
    folded, fold, modified = _fold(model)
    assert modified
    assert _op_types(folded) == ["Add"]
    assert len(folded.graph.initializer) == 1
    assert fold.report.counts["constants_folded"] == 2  # Mul and Sub (Constant is a source)
    assert fold.report.counts["nodes_removed"] == 3
    assert fold.report.counts["initializers_removed"] == 1  # c1, c2 gone; the folded one added
    _assert_same_outputs(model, folded, {"x": RNG.normal(size=(2, 3)).astype(np.float32)})


def test_identity_chain_and_dead_nodes_are_removed() -> None:
    model = _model(
        [
            helper.make_node("Identity", ["x"], ["i1"]),
            helper.make_node("Identity", ["i1"], ["i2"]),
            helper.make_node("Relu", ["i2"], ["r"]),
            helper.make_node("Identity", ["r"], ["y"]),
            helper.make_node("Sigmoid", ["x"], ["dead"]),
        ],
        [_vinfo("x", [3, 4])],
        [_vinfo("y", [3, 4])],
        [_init("unused", RNG.normal(size=7))],
    )
    folded, fold, modified = _fold(model)
    assert modified
    assert _op_types(folded) == ["Relu"]
    assert [o.name for o in folded.graph.output] == ["y"]
    assert len(folded.graph.initializer) == 0
    assert fold.report.counts["identities_removed"] == 3
    assert fold.report.counts["nodes_removed"] == 4
    assert fold.report.counts["initializers_removed"] == 1
    _assert_same_outputs(model, folded, {"x": RNG.normal(size=(3, 4)).astype(np.float32)})


def test_nothing_to_do_reports_unmodified() -> None:
    model = _model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        [_vinfo("x", [1, 2, 4, 4])],
        [_vinfo("y", [1, 3, 4, 4])],
        [_init("w", RNG.normal(size=(3, 2, 1, 1)))],
    )
    folded, fold, modified = _fold(model)
    assert not modified
    assert not fold.report.modified
    assert _op_types(folded) == ["Conv", "Relu"]
    assert all(v == 0 for v in fold.report.counts.values())
    _assert_same_outputs(model, folded, {"x": RNG.normal(size=(1, 2, 4, 4)).astype(np.float32)})


def test_castlike_keeps_saturate_when_rewritten_to_cast() -> None:
    # onnxscript 0.7.2 drops saturate=0 here, turning out-of-range values into +-448 not NaN.
    model = _model(
        [helper.make_node("CastLike", ["x", "like"], ["y"], saturate=0)],
        [_vinfo("x", [4]), _vinfo("like", [1], TensorProto.FLOAT8E4M3FN)],
        [_vinfo("y", [4], TensorProto.FLOAT8E4M3FN)],
        opset=19,
    )
    folded, _, modified = _fold(model)
    assert modified
    (cast,) = folded.graph.node
    assert cast.op_type == "Cast"
    assert {a.name: helper.get_attribute_value(a) for a in cast.attribute} == {
        "to": TensorProto.FLOAT8E4M3FN,
        "saturate": 0,
    }


def test_failing_partial_evaluator_leaves_the_node_and_notes_it() -> None:
    # SplitToSequence with a scalar `split` graph input crashes onnxscript 0.7.2's folder.
    model = _model(
        [helper.make_node("SplitToSequence", ["x", "split"], ["seq"], axis=1)],
        [_vinfo("x", [3, 6]), helper.make_tensor_value_info("split", TensorProto.INT64, [])],
        [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)],
    )
    folded, fold, modified = _fold(model)
    assert not modified
    assert _op_types(folded) == ["SplitToSequence"]
    assert fold.report.counts["fold_failures"] == 1
    assert "SplitToSequence" in fold.report.notes[0]


def test_torch_conv_bn_export_is_folded() -> None:
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 1, bias=False),
        torch.nn.BatchNorm2d(4),
    ).eval()
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.normal_()
    x = torch.randn(2, 3, 8, 8)
    program = torch.onnx.export(net, (x,), dynamo=True, optimize=False)
    model = program.model_proto
    folded, fold, modified = _fold(model)
    assert modified
    assert "BatchNormalization" not in _op_types(folded)
    assert fold.report.counts["batchnorms_folded"] == 2
    _assert_same_outputs(model, folded, {model.graph.input[0].name: x.numpy()})


def test_identity_between_two_graph_outputs_is_kept() -> None:
    # Removing it would merge two graph outputs into one value (and one name).
    model = _model(
        [helper.make_node("Relu", ["x"], ["y1"]), helper.make_node("Identity", ["y1"], ["y2"])],
        [_vinfo("x", [3])],
        [_vinfo("y1", [3]), _vinfo("y2", [3])],
    )
    folded, fold, modified = _fold(model)
    assert not modified
    assert [o.name for o in folded.graph.output] == ["y1", "y2"]
    assert fold.report.counts["identities_removed"] == 0
    _assert_same_outputs(model, folded, {"x": RNG.normal(size=3).astype(np.float32)})


def test_reference_evaluator_failure_is_one_note_not_warnings(caplog):
    # onnx 1.23's reference GatherElements fails on these shapes (MiniLM's position ids):
    # the node stays, onnxruntime still runs it, and the report says so once
    data = np.arange(512, dtype=np.int64).reshape(1, 512)
    graph = helper.make_graph(
        [helper.make_node("GatherElements", ["data", "idx"], ["g"], axis=1, name="positions"),
         helper.make_node("Add", ["x", "g"], ["y"])],
        "gather_elements", [helper.make_tensor_value_info("x", TensorProto.INT64, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 64])],
        [numpy_helper.from_array(data, "data"),
         numpy_helper.from_array(np.arange(64, dtype=np.int64).reshape(1, 64), "idx")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    fold = FoldConstantsPass()
    with caplog.at_level("WARNING"):
        fold(model)
    assert not [r for r in caplog.records if "Evaluation failed" in r.getMessage()]
    assert fold.report.counts["fold_failures"] == 1
    (note,) = fold.report.notes
    assert note.startswith("GatherElements node 'positions' left unfolded")
    x = np.ones((1, 64), np.int64)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x + np.arange(64))
