"""onnxruntime backends: the session file, its options, and CUDA availability without a GPU."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

import slimgraph
from slimgraph.backends import get_backend, parse_backend_spec
from slimgraph.backends.ort import ORT_CUDA
from slimgraph.errors import BackendError


def test_session_json_records_options_and_reloads(tiny_cnn_path, tmp_path):
    out = tmp_path / "out"
    slimgraph.export(tiny_cnn_path, out, backends=["ort-cpu:intra_op_num_threads=1"])
    config = json.loads((out / "ort-cpu" / "session.json").read_text())
    assert config["intra_op_num_threads"] == 1
    assert config["providers"] == ["CPUExecutionProvider"]
    assert config["model"] == "../model.onnx"
    backend, _ = parse_backend_spec("ort-cpu")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backends"]["ort-cpu"]["options"]["intra_op_num_threads"] == 1

    from slimgraph.backends.base import BuiltArtifact

    run = backend.load(BuiltArtifact("ort-cpu", out, [], config, "ort-cpu/session.json"))
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    want = ort.InferenceSession(str(tiny_cnn_path)).run(None, {"image": x})
    np.testing.assert_allclose(run({"image": x})[0], want[0], rtol=1e-5, atol=1e-6)


def test_backend_spec_parsing():
    backend, options = parse_backend_spec("ort-cpu:intra_op_num_threads=2,allow_spinning=false")
    assert backend.name == "ort-cpu"
    assert options == {"intra_op_num_threads": 2, "allow_spinning": False}
    with pytest.raises(BackendError, match="needs key=value"):
        parse_backend_spec("ort-cpu:fast")
    with pytest.raises(BackendError, match="valid backends: ort-cpu, ort-cuda"):
        get_backend("tensorrt")


def _has_cuda() -> bool:
    return ORT_CUDA.available()


def test_cuda_unavailable_is_reported_not_raised(tiny_cnn_path, tmp_path):
    if _has_cuda():
        pytest.skip("this machine has a CUDA GPU")
    assert ORT_CUDA.unavailable_reason()
    with pytest.raises(slimgraph.SlimgraphError, match="'ort-cuda' is unavailable here"):
        slimgraph.export(tiny_cnn_path, tmp_path / "out", backends=["ort-cuda"])
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs onnxruntime-gpu and a CUDA GPU")
def test_cuda_export_verifies(tiny_cnn_path, tmp_path):
    result = slimgraph.export(tiny_cnn_path, tmp_path / "out", backends=["ort-cpu", "ort-cuda"])
    assert [v.backend for v in result.verifications] == ["ort-cpu", "ort-cuda"]
    assert all(v.passed for v in result.verifications)



RESIDUAL_LN_WEIGHTS = {n: np.random.default_rng(i).standard_normal(32).astype(np.float32)
                       for i, n in enumerate(("bias", "gamma", "beta"))}


def _residual_layernorm_model() -> bytes:
    """``LayerNorm((x + bias) + skip)``: the pattern onnxruntime fuses into SkipLayerNormalization."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["s"]), helper.make_node("Add", ["s", "skip"], ["t"]),
         helper.make_node("LayerNormalization", ["t", "gamma", "beta"], ["y"], axis=-1)],
        "residual_ln",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 8, 32]) for n in ("x", "skip")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 32])],
        [numpy_helper.from_array(a, n) for n, a in RESIDUAL_LN_WEIGHTS.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_cpu_sessions_skip_the_slow_skip_layernorm_fusion(tmp_path, monkeypatch):
    import onnx

    from slimgraph.backends import ort as ort_backend

    model = _residual_layernorm_model()

    def optimized_ops(disabled) -> set[str]:
        options = ort_backend.session_options({})
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=disabled)
        return {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}

    # the transformer's name is right: onnxruntime fuses without it and does not with it
    assert "SkipLayerNormalization" in optimized_ops(None)
    assert "SkipLayerNormalization" not in optimized_ops(list(ort_backend.CPU_DISABLED_OPTIMIZERS))

    asked = []
    real = ort.InferenceSession
    monkeypatch.setattr(ort_backend.ort, "InferenceSession",
                        lambda *a, **k: asked.append(k.get("disabled_optimizers")) or real(*a, **k))
    session = ort_backend.session_for(model)
    ort_backend.session_for(model, {"disabled_optimizers": []})  # a user turns it back on
    assert asked == [["SkipLayerNormFusion"], None]
    assert get_backend("ort-cpu").default_options()["disabled_optimizers"] == ["SkipLayerNormFusion"]
    assert ORT_CUDA.default_options()["disabled_optimizers"] == []  # the CUDA kernel is fast

    rng = np.random.default_rng(1)
    x, skip = (rng.standard_normal((2, 8, 32)).astype(np.float32) for _ in range(2))
    t = x + RESIDUAL_LN_WEIGHTS["bias"] + skip
    want = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-5)
    want = want * RESIDUAL_LN_WEIGHTS["gamma"] + RESIDUAL_LN_WEIGHTS["beta"]
    np.testing.assert_allclose(session.run(None, {"x": x, "skip": skip})[0], want, rtol=1e-4, atol=1e-4)


def _relu_neg_graph():
    import onnx_ir as ir

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([3]))
    bias = ir.Value(name="bias", const_value=ir.tensor(np.array([1, 1, 1], np.float32), name="bias"),
                    type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([3]))
    add = ir.node("Add", [x, bias], name="add")
    relu = ir.node("Relu", [add.outputs[0]], name="relu")
    neg = ir.node("Neg", [relu.outputs[0]], name="neg")
    add.outputs[0].name, relu.outputs[0].name, neg.outputs[0].name = "a", "r", "y"
    neg.outputs[0].dtype = ir.DataType.FLOAT
    graph = ir.Graph([x], [neg.outputs[0]], nodes=[add, relu, neg], initializers=[bias],
                     opset_imports={"": 20})
    return ir.Model(graph, ir_version=10)


def test_probe_session_returns_inner_values_and_leaves_the_model_alone():
    from slimgraph.backends.ort import probe_session

    model = _relu_neg_graph()
    session, names = probe_session(model, ["r", "missing", "bias", "y", "x", "a"])
    assert names == ["r", "y", "x", "a"]  # unknown names and initializers are left out
    x = np.array([-3.0, 0.5, 2.0], np.float32)
    r, y, x_back, a = session.run(names, {"x": x})
    np.testing.assert_array_equal(a, [-2.0, 1.5, 3.0])
    np.testing.assert_array_equal(r, [0.0, 1.5, 3.0])
    np.testing.assert_array_equal(y, [-0.0, -1.5, -3.0])
    np.testing.assert_array_equal(x_back, x)
    assert [v.name for v in model.graph.outputs] == ["y"]
