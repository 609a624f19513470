"""The LSTM unroll (backends/tvm/lstm.py) against onnxruntime's LSTM kernel, then through TVM."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from onnx_ir.passes.common import RemoveUnusedNodesPass

from slimgraph.backends.ort import session_for
from slimgraph.backends.tvm import lstm

STEPS, BATCH, FEATURES, HIDDEN = 5, 3, 4, 6


def make_lstm(direction: str = "forward", bias: bool = True, peephole: bool = False,
              initial: bool = False, outputs: int = 3,
              **attributes: object) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One LSTM node with random weights, and feeds for its graph inputs."""
    rng = np.random.default_rng(0)
    d = 2 if direction == "bidirectional" else 1

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return helper.make_tensor(name, TensorProto.FLOAT, shape, rng.standard_normal(shape).ravel())

    initializers = [weight("w", d, 4 * HIDDEN, FEATURES), weight("r", d, 4 * HIDDEN, HIDDEN)]
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [STEPS, "N", FEATURES])]
    feeds = {"x": rng.standard_normal((STEPS, BATCH, FEATURES)).astype(np.float32)}
    names = ["x", "w", "r", "b" if bias else "", ""]
    if bias:
        initializers.append(weight("b", d, 8 * HIDDEN))
    if initial:
        for name in ("h0", "c0"):
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                              [d, "N", HIDDEN]))
            feeds[name] = rng.standard_normal((d, BATCH, HIDDEN)).astype(np.float32)
    names += ["h0", "c0"] if initial else ["", ""]
    if peephole:
        names.append("p")
        initializers.append(weight("p", d, 3 * HIDDEN))
    while not names[-1]:
        names.pop()
    out_names = ["y", "y_h", "y_c"][:outputs]
    node = helper.make_node("LSTM", names, out_names, hidden_size=HIDDEN, direction=direction,
                            **attributes)
    graph = helper.make_graph(
        [node], "lstm", graph_inputs,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in out_names],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), feeds


def _unrolled(proto: onnx.ModelProto) -> tuple[ir.Model, int]:
    model = ir.from_proto(proto)
    count = lstm.rules.apply_to_model(model)
    RemoveUnusedNodesPass()(model)
    return model, count


@pytest.mark.parametrize(("direction", "bias", "peephole", "initial", "outputs"), [
    *itertools.product(["forward", "reverse", "bidirectional"], [True], [False], [False, True],
                       [1, 2, 3]),
    ("forward", False, True, True, 3),
    ("bidirectional", True, True, True, 3),
    ("reverse", False, False, False, 2),
])
def test_unrolled_lstm_matches_onnxruntime(direction: str, bias: bool, peephole: bool,
                                           initial: bool, outputs: int) -> None:
    proto, feeds = make_lstm(direction, bias, peephole, initial, outputs)
    model, count = _unrolled(proto)
    assert count == 1
    assert "LSTM" not in {n.op_type for n in model.graph}
    want = session_for(proto.SerializeToString()).run(None, feeds)
    got = session_for(ir.to_proto(model).SerializeToString()).run(None, feeds)
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("attributes", "reason"), [
    ({"clip": 1.0}, "clip"),
    ({"input_forget": 1}, "input_forget"),
    ({"layout": 1}, "layout=1"),
    ({"activations": ["Relu", "Tanh", "Tanh"]}, "activations"),
])
def test_refused_lstm_is_left_with_a_reason(attributes: dict, reason: str) -> None:
    proto, _ = make_lstm(**attributes)
    model, count = _unrolled(proto)
    assert count == 0
    (node,) = model.graph
    assert reason in lstm.refusal(node)


def test_dynamic_sequence_length_is_refused() -> None:
    proto, _ = make_lstm()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "T"
    model, count = _unrolled(proto)
    assert count == 0 and "sequence length" in lstm.refusal(next(iter(model.graph)))


def test_tvm_runs_the_unrolled_lstm(tmp_path) -> None:
    pytest.importorskip("tvm")
    from slimgraph.backends.tvm import TVM_LLVM

    proto, feeds = make_lstm("bidirectional", peephole=True, initial=True)
    built = TVM_LLVM.build(ir.from_proto(proto), tmp_path, {})
    assert built.options["batch"] is None  # the batch stays dynamic
    got = TVM_LLVM.load(built)(feeds)
    for g, w in zip(got, session_for(proto.SerializeToString()).run(None, feeds), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
