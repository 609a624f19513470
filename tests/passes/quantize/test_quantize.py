"""quantize: int8 static/dynamic QDQ graphs are valid, run in onnxruntime and stay close to float."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import make_tiny_cnn  # noqa: E402
from onnx import TensorProto, helper, numpy_helper

import slimgraph
from slimgraph.calibration import Calibration
from slimgraph.errors import PipelineSpecError
from slimgraph.passes import Pipeline, recipe
from slimgraph.passes.quantize import (
    InsertQDQPass,
    activation_qparams,
    collect_ranges,
    first_divergence,
    int8_target,
    quantize_int4_blocks,
    quantize_weight,
)
from slimgraph.passes.quantize.calibrate import channel_absmax, channel_statistics
from slimgraph.passes.quantize.divergence import tensor_cosines
from slimgraph.passes.quantize.smooth import alpha_factors, search_factors, smooth_layers, smoothing_groups


def _run(model: onnx.ModelProto | ir.Model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norms) if norms else 0.0


def _quantize(proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], **options) -> tuple[
    ir.Model, InsertQDQPass, bool
]:
    qpass = InsertQDQPass(speed_check=False, **options)
    qpass.calibration = Calibration(feeds)
    model = ir.from_proto(proto)
    result = qpass(model)
    checked = ir.to_proto(result.model)
    onnx.checker.check_model(checked, full_check=True)
    return result.model, qpass, result.modified


def _image_feeds(n: int, shape=(1, 3, 16, 16), seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def test_int8_static_tiny_cnn_is_valid_runs_and_stays_close():
    proto = make_tiny_cnn()
    model, qpass, modified = _quantize(proto, _image_feeds(16))
    assert modified
    counts = qpass.report.counts
    assert counts["layers_quantized"] == 2 and counts["relus_folded"] == 1
    assert counts["biases_quantized"] == 1  # the Gemm bias is computed (an Add) until folded
    assert "Relu" not in _ops(model) and "QuantizeLinear" in _ops(model)
    assert qpass.report.weight_bytes_after < qpass.report.weight_bytes_before
    assert any("int8 target" in note for note in qpass.report.notes)
    x = _image_feeds(1, (8, 3, 16, 16), seed=5)[0]
    assert _cosine(_run(proto, x)[0], _run(model, x)[0]) > 0.99


def test_nothing_to_quantize_reports_unmodified():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model, qpass, modified = _quantize(proto, [{"x": np.ones((2, 4), np.float32)}])
    assert not modified and qpass.report.counts == {}


# ---- per-channel weight axes: each output channel has its own magnitude (1e-3 .. 1e3), so
# ---- scales along the wrong axis would wipe out the small channels.


def _channel_scaled(shape: tuple[int, ...], axis: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    mags = np.logspace(-3, 3, shape[axis]).astype(np.float32)
    bshape = [1] * len(shape)
    bshape[axis] = -1
    return w * mags.reshape(bshape)


def _single_layer(op: str, w: np.ndarray, x_shape: list[int], attrs: dict) -> onnx.ModelProto:
    node = helper.make_node(op, ["x", "w"], ["y"], **attrs)
    y_shape = [x_shape[0], w.shape[0], *x_shape[2:]] if op == "Conv" else [x_shape[0], 8]
    graph = helper.make_graph(
        [node], op.lower(), [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("op", "w_shape", "axis", "x_shape", "attrs"),
    [
        ("Conv", (8, 8, 1, 1), 0, [4, 8, 3, 3], {}),
        ("Gemm", (8, 8), 0, [4, 8], {"transB": 1}),
        ("Gemm", (8, 8), 1, [4, 8], {"transB": 0}),
        ("MatMul", (8, 8), 1, [4, 8], {}),
    ],
)
def test_per_channel_scales_sit_on_the_output_channel_axis(op, w_shape, axis, x_shape, attrs):
    w = _channel_scaled(w_shape, axis)
    proto = _single_layer(op, w, x_shape, attrs)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal(x_shape).astype(np.float32)} for _ in range(8)]
    model, qpass, _ = _quantize(proto, feeds, rounding="nearest")  # GPTQ may move a weight further
    qmax = 63 if qpass.target().reduce_range else 127  # 7-bit weights on x86 AVX2 without VNNI
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].is_initializer()
              and n.inputs[0].const_value.dtype == ir.DataType.INT8)
    assert dq.attributes.get_int("axis") == axis
    q = dq.inputs[0].const_value.numpy().astype(np.float32)
    scales = dq.inputs[1].const_value.numpy()
    bshape = [1] * len(w_shape)
    bshape[axis] = -1
    restored = q * scales.reshape(bshape)
    per_channel_err = np.abs(np.moveaxis(restored - w, axis, 0)).reshape(w_shape[axis], -1).max(1)
    per_channel_max = np.abs(np.moveaxis(w, axis, 0)).reshape(w_shape[axis], -1).max(1)
    assert (per_channel_err <= per_channel_max / qmax * 0.5 + 1e-12).all()
    ref, got = _run(proto, feeds[0])[0], _run(model, feeds[0])[0]
    # Every output channel, tiny or huge, survives: compare channel by channel.
    out_axis = 1
    for c in range(ref.shape[out_axis]):
        assert _cosine(np.take(ref, c, out_axis), np.take(got, c, out_axis)) > 0.98


def test_quantize_weight_round_trip_error_is_half_a_step():
    w = _channel_scaled((6, 5), 0)
    q, scales = quantize_weight(w, 0)
    assert q.dtype == np.int8 and np.abs(q).max() <= 127
    assert (np.abs(q * scales[:, None] - w) <= scales[:, None] / 2 + 1e-9).all()
    q7, _ = quantize_weight(w, 0, reduce_range=True)
    assert np.abs(q7).max() <= 63


def test_activation_params_hold_zero_and_fold_relu_exactly():
    relu = activation_qparams(0.0, 5.1, ir.DataType.UINT8)
    assert relu.zero_point == 0
    signed = activation_qparams(0.0, 5.1, ir.DataType.INT8)
    assert signed.zero_point == -128
    positive_only = activation_qparams(2.0, 4.0, ir.DataType.UINT8)
    assert positive_only.zero_point == 0  # the range is widened to hold 0
    mixed = activation_qparams(-1.0, 3.0, ir.DataType.UINT8)
    assert abs(mixed.zero_point * mixed.scale - 1.0) < mixed.scale


def test_int8_target_follows_the_cpu_flags():
    assert int8_target({"avx2", "avx512f", "avx512_vnni"}).activations == ir.DataType.UINT8
    assert not int8_target({"avx2", "avx_vnni"}).reduce_range
    old = int8_target({"avx2", "fma"})
    assert old.activations == ir.DataType.UINT8 and old.reduce_range
    assert int8_target(None).activations == ir.DataType.INT8


def test_s8_activations_on_request():
    model, qpass, _ = _quantize(make_tiny_cnn(), _image_feeds(8), activations="s8")
    zps = [n.inputs[2].const_value.dtype for n in model.graph if n.op_type == "QuantizeLinear"]
    assert zps and set(zps) == {ir.DataType.INT8}
    assert "as asked" in qpass.report.notes[0]


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_clipping_calibrators_narrow_the_range(method):
    proto = make_tiny_cnn()
    model = ir.from_proto(proto)
    feeds = _image_feeds(8)
    wide = collect_ranges(model, ["image", "c"], feeds, "minmax")
    narrow = collect_ranges(model, ["image", "c"], feeds, method)
    for name in ("image", "c"):
        assert wide[name][0] <= narrow[name][0] <= narrow[name][1] <= wide[name][1]
    quantized, _, _ = _quantize(proto, feeds, calib=method)
    x = _image_feeds(1, (4, 3, 16, 16), seed=7)[0]
    assert _cosine(_run(proto, x)[0], _run(quantized, x)[0]) > 0.98


def test_mse_calibration_clips_a_heavy_tail_to_less_squared_error():
    """On Laplace-distributed values with a few far outliers the mse range clips the tail, and
    its uint8 round trip of the very same values has less squared error than min/max's."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.laplace(0, 1, 1_000_000), [-25.0, 30.0]]).astype(np.float32)
    value = ir.Value(name="x")
    value.dtype, value.shape = ir.DataType.FLOAT, ir.Shape([len(x)])
    graph = ir.Graph([value], [value], nodes=[], name="g", opset_imports={"": 17})
    model = ir.Model(graph, ir_version=10)
    feeds = [{"x": x}]
    (wide,) = collect_ranges(model, ["x"], feeds, "minmax").values()
    (clipped,) = collect_ranges(model, ["x"], feeds, "mse").values()
    assert wide[0] < clipped[0] < 0 < clipped[1] < wide[1]

    def round_trip_error(low, high):
        qp = activation_qparams(low, high, ir.DataType.UINT8)
        q = np.clip(np.round(x / qp.scale) + qp.zero_point, 0, 255)
        return float(np.mean(((q - qp.zero_point) * qp.scale - x) ** 2))

    assert round_trip_error(*clipped) < 0.5 * round_trip_error(*wide)


# ---- dynamic int8


def _mlp(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((10, 32)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1, beta=0.5, name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_dynamic_int8_uses_matmulinteger_and_stays_close():
    proto = _mlp()
    x = {"x": np.random.default_rng(3).standard_normal((8, 16)).astype(np.float32)}
    model, qpass, modified = _quantize(proto, [], dynamic=True)
    assert modified and qpass.report.counts["layers_quantized"] == 2
    ops = _ops(model)
    assert ops.count("DynamicQuantizeLinear") == 2 and ops.count("MatMulInteger") == 2
    assert "Gemm" not in ops and "MatMul" not in ops
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert _cosine(_run(proto, x)[0], _run(model, x)[0]) > 0.99


def test_dynamic_leaves_conv_float_and_says_why():
    model, qpass, _ = _quantize(make_tiny_cnn(), [], dynamic=True)
    assert "Conv" in _ops(model) and "MatMulInteger" in _ops(model)
    assert any("ConvInteger" in note for note in qpass.report.notes)


# ---- the accuracy guard


def _outlier_mlp() -> onnx.ModelProto:
    """Three MatMuls; input feature 0 is ~1000x the others and fc_a damps it back by 1e-3.

    Quantizing fc_a's input per tensor rounds every other feature to 0: fc_a is the planted
    outlier layer. fc_b and fc_c see ordinary activations.
    """
    rng = np.random.default_rng(0)
    wa = rng.standard_normal((16, 16)).astype(np.float32)
    wa[0] *= 1e-3
    inits = [
        numpy_helper.from_array(wa, "wa"),
        numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "wb"),
        numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "wc"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["a"], name="fc_a"),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("MatMul", ["ra", "wb"], ["b"], name="fc_b"),
        helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
        helper.make_node("MatMul", ["rb", "wc"], ["y"], name="fc_c"),
    ]
    graph = helper.make_graph(
        nodes, "outlier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _outlier_feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        x = rng.standard_normal((4, 16)).astype(np.float32)
        x[:, 0] *= 1000
        feeds.append({"x": x})
    return feeds


def test_accuracy_guard_keeps_the_outlier_layer_float():
    proto = _outlier_mlp()
    feeds, fresh = _outlier_feeds(32, 0), _outlier_feeds(1, 99)[0]
    unguarded, _, _ = _quantize(proto, feeds, guard=False)
    assert _cosine(_run(proto, fresh)[0], _run(unguarded, fresh)[0]) < 0.99  # the plant works

    guarded, qpass, _ = _quantize(proto, feeds, tolerance=0.99)
    assert qpass.report.counts["layers_float"] == 1
    assert qpass.report.counts["layers_quantized"] == 2
    assert any("kept float fc_a" in note and "holds" in note for note in qpass.report.notes)
    assert qpass.tolerance.min_cosine == 0.99
    fc_a = next(n for n in guarded.graph if n.name == "fc_a")
    assert fc_a.inputs[1].name == "wa"  # float weight, float input
    assert _cosine(_run(proto, fresh)[0], _run(guarded, fresh)[0]) >= 0.99


def test_guard_that_cannot_hold_names_the_first_diverging_tensor():
    proto = _outlier_mlp()
    model, qpass, _ = _quantize(proto, _outlier_feeds(32, 0), tolerance=0.99, max_float=0)
    notes = qpass.report.notes
    assert any("kept float nothing" in n and "STILL MISSED" in n and "max_float=0" in n for n in notes)
    # fc_a's input loses every feature but the planted one: its output is where the damage starts.
    (first,) = [n for n in notes if "first diverging tensor" in n]
    assert "first diverging tensor: a (output of MatMul fc_a)" in first
    assert qpass.report.counts["layers_float"] == 0


def test_export_surfaces_a_missed_guard_as_a_warning(tmp_path: Path):
    path = tmp_path / "outlier.onnx"
    onnx.save(_outlier_mlp(), path)
    result = slimgraph.export(path, tmp_path / "out", passes="quantize:int8,tolerance=0.99,max_float=0",
                              calibration=_outlier_feeds(32, 0), allow_mismatch=True)
    (warning,) = [w for w in result.warnings if "accuracy guard" in w]
    assert warning.startswith("quantize: accuracy guard: tolerance cosine >= 0.99, max rel err <= 0.25 "
                              "missed (output 'y': ")
    assert "first diverging tensor: a (output of MatMul fc_a)" in warning


def test_first_divergence_finds_a_perturbed_layer_and_not_before():
    proto = _outlier_mlp()
    changed = onnx.ModelProto()
    changed.CopyFrom(proto)
    wb = changed.graph.initializer[1]
    assert wb.name == "wb"
    wb.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(wb), "wb"))  # fc_b flipped
    reference, candidate = ir.from_proto(proto), ir.from_proto(changed)
    feeds = _outlier_feeds(4, 1)
    dtypes = {v: ir.DataType.FLOAT for v in ("a", "ra", "b", "rb", "y")}
    cosines = {d.tensor: d.cosine for d in tensor_cosines(reference, candidate, feeds, dtypes)}
    assert list(cosines) == ["a", "ra", "b", "rb", "y"]
    assert cosines["a"] == pytest.approx(1.0) and cosines["ra"] == pytest.approx(1.0)
    assert cosines["b"] == pytest.approx(-1.0)
    found = first_divergence(reference, candidate, feeds, dtypes, 0.99)
    assert found is not None and (found.tensor, found.node, found.op_type) == ("b", "fc_b", "MatMul")
    assert first_divergence(reference, reference, feeds, dtypes, 0.99) is None


def test_exclude_keeps_named_layers_float():
    model, qpass, _ = _quantize(_outlier_mlp(), _outlier_feeds(8, 0), exclude=["fc_a", "nope"])
    assert qpass.report.counts["layers_float"] == 1
    assert any("nope" in note for note in qpass.report.notes)


# ---- options and the pipeline


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("quantize:int3", "unknown mode 'int3'"),
        ("quantize:int8,calib=kl", "unknown calib 'kl'"),
        ("quantize:int8,tolerance=1.5", "minimum cosine in (0, 1]"),
        ("quantize:int8,activations=u16", "unknown activations"),
        ("quantize:int8,dynamic=maybe", "not a valid bool"),
        ("quantize:int8,bits=3", "unknown option 'bits'"),
    ],
)
def test_bad_options_name_what_is_wrong(spec, message):
    with pytest.raises(PipelineSpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Pipeline.parse(spec)


def test_spec_options_reach_the_pass():
    (qpass,) = Pipeline.parse("quantize:int8,calib=entropy,tolerance=0.995,exclude=a+b").passes
    assert qpass.calib == "entropy" and qpass.exclude == ["a", "b"]
    assert qpass.options()["tolerance"] == 0.995 and qpass.tolerance.min_cosine == 0.99
    assert Pipeline.parse("quantize:int8,dynamic=true").passes[0].needs_calibration is False


def test_speed_guard_reports_a_verdict():
    qpass = InsertQDQPass()
    qpass.calibration = Calibration(_image_feeds(4))
    qpass(ir.from_proto(make_tiny_cnn()))
    assert any("speed guard" in note for note in qpass.report.notes)


def _matmul_chain(depth: int) -> ir.Model:
    w = numpy_helper.from_array(np.eye(256, dtype=np.float32), "w")
    names = ["x", *[f"h{i}" for i in range(depth)]]
    nodes = [helper.make_node("MatMul", [a, "w"], [b]) for a, b in zip(names, names[1:], strict=False)]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 256])],
        [helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, [64, 256])], [w])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_speed_guard_warns_when_the_quantized_model_is_slower():
    # not a timing threshold: one model does 16x the other's work, timed in the same rounds
    feed = {"x": np.ones((64, 256), np.float32)}
    light, heavy = _matmul_chain(1), _matmul_chain(16)
    slower = InsertQDQPass()
    slower._speed_guard(light, heavy, [feed])
    (warning,) = [note for note in slower.report.notes if "NOT faster" in note]
    # it says where the time goes: the 16 MatMuls' kernels against the one's
    int8_side, float_side = re.search(r"per run: (.*) \(int8\) vs (.*) \(fp32\)", warning).groups()
    us = [float(re.search(r"MatMul (\d+) us", side).group(1)) for side in (int8_side, float_side)]
    assert us[0] > 4 * us[1]
    faster = InsertQDQPass()
    faster._speed_guard(heavy, light, [feed])
    (note,) = faster.report.notes
    assert note.startswith("speed guard: int8/fp32 latency 0.")


def test_export_int8_passes_verification(tiny_cnn_path: Path, tmp_path: Path):
    feeds = _image_feeds(16, (2, 3, 16, 16))
    result = slimgraph.export(tiny_cnn_path, tmp_path / "out", passes="fold-constants,quantize:int8",
                              calibration=feeds)
    assert result.passed
    (report,) = [p for p in result.manifest["passes"] if p["name"] == "quantize"]
    assert report["counts"]["layers_quantized"] == 2
    assert result.manifest["tolerance"]["min_cosine"] == 0.99


@pytest.mark.slow
def test_export_torch_module_int8(torch_models_module: str, tmp_path: Path):
    feeds = _image_feeds(16, (2, 3, 16, 16))
    result = slimgraph.export(f"{torch_models_module}:build_with_inputs", tmp_path / "out",
                              passes=recipe("int8"),
                              calibration=feeds, inputs={"image": (2, 3, 16, 16)})
    assert result.passed


# ---- weight-only modes


@pytest.mark.parametrize("transB", [0, 1])
def test_binary_decode_in_onnx_is_sign_times_channel_mean(transB):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((12, 12)).astype(np.float32) * np.logspace(-1, 1, 12, dtype=np.float32)
    proto = _single_layer("Gemm", w, [12, 12], {"transB": transB})
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 12
    model, qpass, modified = _quantize(proto, [], mode="binary")
    # 144 weights: 18 bytes of bits, the rest is alpha and the decode constants.
    assert modified and qpass.report.weight_bytes_after < qpass.report.weight_bytes_before / 4
    tagged = [n for n in model.graph if "slimgraph.binary_weight" in n.metadata_props]
    axis = 0 if transB else 1
    assert [n.metadata_props["slimgraph.binary_weight"] for n in tagged] == [f"axis={axis}"]
    decoded = _run(model, {"x": np.eye(12, dtype=np.float32)})[0]  # I @ op(W) = op(W)
    alpha = np.abs(w.astype(np.float64)).mean(axis=1 - axis, keepdims=True).astype(np.float32)
    alpha = alpha.astype(np.float16).astype(np.float32)  # stored as float16
    expected = np.where(w >= 0, 1.0, -1.0).astype(np.float32) * alpha
    np.testing.assert_array_equal(decoded, expected.T if transB else expected)


def test_binary_layers_share_decode_constants_and_unpack_padded_bits():
    # 7x5 = 35 weights: the last byte holds 5 padding bits the decode must drop
    rng = np.random.default_rng(6)
    w1, w2 = rng.standard_normal((7, 5)).astype(np.float32), rng.standard_normal((5, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])],
        "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model, _, _ = _quantize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), [],
                            mode="binary")
    shared = [name for name in model.graph.initializers if name.startswith("binary_decode_")]
    assert len(shared) == len(set(shared)) == 7  # each once, with the padded layer's Slice inputs
    assert sum(n.op_type == "Slice" for n in model.graph) == 1  # only w1 (35 bits) is padded

    def binarised(w):
        alpha = np.abs(w).mean(axis=0, keepdims=True).astype(np.float16).astype(np.float32)
        return np.where(w >= 0, 1.0, -1.0).astype(np.float32) * alpha

    x = rng.standard_normal((3, 7)).astype(np.float32)
    np.testing.assert_allclose(_run(model, {"x": x})[0], x @ binarised(w1) @ binarised(w2), rtol=1e-5,
                               atol=1e-5)


def test_int4_blocked_weights_on_opset_21():
    w = np.random.default_rng(4).standard_normal((64, 8)).astype(np.float32)
    proto = _single_layer("MatMul", w, [4, 64], {})
    x = {"x": np.random.default_rng(5).standard_normal((4, 64)).astype(np.float32)}
    model, qpass, _ = _quantize(proto, [], mode="int4", block=32)
    assert model.opset_imports[""] >= 21
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    assert dq.inputs[0].const_value.dtype == ir.DataType.INT4
    assert dq.attributes.get_int("block_size") == 32 and dq.attributes.get_int("axis") == 0
    assert list(dq.inputs[1].const_value.shape) == [2, 8]
    q, scales = quantize_int4_blocks(w, 0, 32)
    restored = q.astype(np.float32) * np.repeat(scales, 32, axis=0)
    # per block, no worse than rounding with the plain scale max|block| / 7, and better overall
    plain_steps = np.repeat(np.abs(w.reshape(2, 32, 8)).max(axis=1) / 7, 32, axis=0)
    plain = np.clip(np.round(w / plain_steps), -8, 7) * plain_steps
    block_error = lambda r: ((r - w) ** 2).reshape(2, 32, 8).sum(axis=1)  # noqa: E731
    assert (block_error(restored) <= block_error(plain) + 1e-9).all()
    assert block_error(restored).sum() < 0.9 * block_error(plain).sum()
    assert _cosine(_run(proto, x)[0], _run(model, x)[0]) > 0.98
    assert qpass.tolerance.min_cosine < 0.99


def test_weight_only_modes_reject_int8_options():
    with pytest.raises(PipelineSpecError, match="weight-only"):
        Pipeline.parse("quantize:binary,dynamic=true")
    with pytest.raises(PipelineSpecError, match="block must be one of"):
        Pipeline.parse("quantize:int4,block=48")


# ---- SmoothQuant


def _attention_like(seed: int = 0) -> onnx.ModelProto:
    """x -> three MatMuls sharing x (q, k, v), a Gemm (transB) on x, and a residual Add on x.

    Input channels 0 and 5 are ~50x the rest: the activation outliers SmoothQuant moves away.
    """
    rng = np.random.default_rng(seed)
    names = ("wq", "wk", "wv")
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), n) for n in names]
    inits.append(numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "wg"))
    inits.append(numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "bg"))
    nodes = [helper.make_node("MatMul", ["x", w], [w[1]], name=f"fc_{w[1]}") for w in names]
    nodes += [
        helper.make_node("Gemm", ["x", "wg", "bg"], ["g"], transB=1, name="fc_g"),
        helper.make_node("Add", ["q", "k"], ["qk"], name="add_qk"),
        helper.make_node("Add", ["qk", "v"], ["qkv"], name="add_v"),
        helper.make_node("Add", ["qkv", "g"], ["s"], name="add_g"),
        helper.make_node("Add", ["s", "x"], ["y"], name="residual"),
    ]
    graph = helper.make_graph(
        nodes, "attention_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _outlier_channel_feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    scale = np.ones(16, np.float32)
    scale[[0, 5]] = 50.0
    return [{"x": (rng.standard_normal((8, 16)) * scale).astype(np.float32)} for _ in range(n)]


def test_smoothing_is_exact_in_float_and_shares_one_mul_per_input():
    proto = _attention_like()
    model = ir.from_proto(proto)
    feeds = _outlier_channel_feeds(8, 0)
    groups = smoothing_groups(model.graph, {"fc_q", "fc_k", "fc_v", "fc_g"})
    assert [[n.name for n in g] for g in groups.values()] == [["fc_q", "fc_k", "fc_v", "fc_g"]]
    absmax = channel_absmax(model, ["x"], feeds)
    assert absmax["x"].shape == (16,) and absmax["x"][0] > 10 * np.median(absmax["x"])
    assert smooth_layers(model, groups, alpha_factors(groups, absmax, 0.75)) == 4
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    (mul,) = [n for n in model.graph if n.op_type == "Mul"]
    users = {n.name for n, _ in mul.outputs[0].uses()}
    assert users == {"fc_q", "fc_k", "fc_v", "fc_g"}
    residual = next(n for n in model.graph if n.name == "residual")
    assert residual.inputs[1].name == "x"  # the residual still reads the unsmoothed x
    inverse = mul.inputs[1].const_value.numpy()
    assert inverse[0] < inverse[1] and inverse[5] < inverse[1]  # outlier channels shrink most
    fresh = _outlier_channel_feeds(1, 9)[0]
    np.testing.assert_allclose(_run(model, fresh)[0], _run(proto, fresh)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dynamic", [True, False])
def test_smooth_makes_int8_closer_on_outlier_channels(dynamic):
    proto = _attention_like()
    feeds, fresh = _outlier_channel_feeds(16, 0), _outlier_channel_feeds(1, 9)[0]
    # 8-bit weights as on a VNNI CPU (AVX2 without VNNI gets 7-bit ones, whose own error is
    # larger than what smoothing moves): the test is of smoothing, not of the CPU
    plain, _, _ = _quantize(proto, feeds, dynamic=dynamic, reduce_range=False)
    smoothed, qpass, _ = _quantize(proto, feeds, dynamic=dynamic, smooth=0.75, reduce_range=False)
    assert qpass.report.counts["layers_smoothed"] == 4 and qpass.report.counts["layers_quantized"] == 4
    assert any("smooth: alpha 0.75" in note for note in qpass.report.notes)
    # Compare the quantized branch only: the residual x would hide the error.
    ref = _run(proto, fresh)[0] - fresh["x"]
    err_plain = np.abs(_run(plain, fresh)[0] - fresh["x"] - ref).max()
    err_smooth = np.abs(_run(smoothed, fresh)[0] - fresh["x"] - ref).max()
    assert err_smooth < 0.7 * err_plain


def test_smooth_with_int4_protects_the_rows_that_meet_outliers():
    proto = _attention_like()
    feeds, fresh = _outlier_channel_feeds(16, 0), _outlier_channel_feeds(1, 9)[0]
    plain, _, _ = _quantize(proto, feeds, mode="int4")
    smoothed, qpass, _ = _quantize(proto, feeds, mode="int4", smooth=0.5)
    assert qpass.report.counts["layers_smoothed"] == 4
    ref = _run(proto, fresh)[0]
    error_plain = 1 - _cosine(ref, _run(plain, fresh)[0])
    error_smooth = 1 - _cosine(ref, _run(smoothed, fresh)[0])
    assert error_smooth < 0.6 * error_plain


def test_smooth_auto_rivals_the_best_fixed_strength_on_int4_outliers():
    proto = _attention_like()
    feeds, fresh = _outlier_channel_feeds(16, 0), _outlier_channel_feeds(1, 9)[0]
    ref = _run(proto, fresh)[0]
    errors = {}
    for smooth in (None, 0.25, 0.5, 0.75, "auto"):
        model, qpass, _ = _quantize(proto, feeds, mode="int4", smooth=smooth)
        errors[smooth] = 1 - _cosine(ref, _run(model, fresh)[0])
    assert errors["auto"] < 0.5 * errors[None]
    fixed = [errors[a] for a in (0.25, 0.5, 0.75)]
    # without being told a strength: near the best one, better than the average one
    assert errors["auto"] <= 1.25 * min(fixed) and errors["auto"] < np.mean(fixed)
    assert any(note.startswith("smooth: auto (") for note in qpass.report.notes)


def test_smooth_on_a_graph_without_groups_changes_nothing():
    # a Conv-only model: no MatMul/Gemm to smooth, so no probe outputs and no factors (asking
    # onnxruntime for no outputs would return all of them)
    w = np.random.default_rng(0).standard_normal((8, 8, 1, 1)).astype(np.float32)
    proto = _single_layer("Conv", w, [4, 8, 3, 3], {})
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((4, 8, 3, 3)).astype(np.float32)} for _ in range(8)]
    assert channel_statistics(ir.from_proto(proto), [], feeds, sample_rows=8) == ({}, {})
    for smooth in (0.5, "auto"):
        _, qpass, _ = _quantize(proto, feeds, smooth=smooth)
        assert qpass.report.counts["layers_smoothed"] == 0 and qpass.report.counts["layers_quantized"] == 1


def test_smooth_auto_keeps_weights_that_quantize_exactly():
    # int8-exact weights (integers, 127 at the top of every column) read by outlier inputs: any
    # smoothing would only add rounding error, so the search picks no factors and adds no Mul
    rng = np.random.default_rng(3)
    w = rng.integers(-127, 128, (16, 8)).astype(np.float32)
    w[0] = 127.0
    proto = _single_layer("MatMul", w, ["N", 16], {})
    model = ir.from_proto(proto)
    groups = smoothing_groups(model.graph, {"MatMul_0"})
    absmax, samples = channel_statistics(model, ["x"], _outlier_channel_feeds(8, 1), sample_rows=64)
    assert samples["x"].shape == (64, 16)

    def int8_per_column(weight):
        q, scales = quantize_weight(weight, 1)
        return q * scales[None, :].astype(np.float64)

    factors, chosen = search_factors(groups, absmax, samples, int8_per_column, quantize_inputs=False)
    assert chosen == {"x": "none"}
    assert smooth_layers(model, groups, factors) == 0 and "Mul" not in _ops(model)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("quantize:int8,smooth=1.5", "smooth is the SmoothQuant migration strength"),
        ("quantize:int8,smooth=most", "or auto, got 'most'"),
        ("quantize:binary,smooth=0.5", "smooth applies to int8 and int4"),
        ("quantize:int8,max_float=-1", "max_float is a number of layers"),
    ],
)
def test_bad_smooth_and_guard_options(spec, message):
    with pytest.raises(PipelineSpecError, match=message):
        Pipeline.parse(spec)


def test_smooth_needs_calibration():
    qpass = InsertQDQPass(dynamic=True, smooth=0.5, speed_check=False)
    assert qpass.needs_calibration
    with pytest.raises(ValueError, match="smooth= needs calibration"):
        qpass(ir.from_proto(_attention_like()))


@pytest.mark.slow
def test_smoothing_minilm_is_exact_in_float():
    loaded = slimgraph.load("minilm")
    model = loaded.model
    feeds = list(loaded.calibration)[:8]
    layers = {n.name for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None}
    reference = model.clone()
    groups = smoothing_groups(model.graph, layers)
    absmax = channel_absmax(model, [x.name for x in groups], feeds)
    assert smooth_layers(model, groups, alpha_factors(groups, absmax, 0.75)) == 36
    batch = loaded.evaluation.feeds[0]
    np.testing.assert_allclose(_run(model, batch)[0], _run(reference, batch)[0], rtol=1e-5, atol=1e-5)


def test_int4_gemm_becomes_matmul_that_onnxruntime_runs_as_matmulnbits(tmp_path: Path):
    proto = _mlp()  # fc1 MatMul, fc2 Gemm(transB=1, beta=0.5) with a bias
    for gemm in proto.graph.node:
        if gemm.op_type == "Gemm":
            gemm.attribute.append(helper.make_attribute("alpha", 2.0))
    w1 = np.random.default_rng(1).standard_normal((16, 32)).astype(np.float32)
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "w1"))
    model, qpass, _ = _quantize(proto, [], mode="int4", block=32)
    assert qpass.report.counts["layers_quantized"] == 2
    ops = _ops(model)
    assert "Gemm" not in ops and ops.count("MatMul") == 2 and ops.count("DequantizeLinear") == 2
    assert [v.name for v in model.graph.outputs] == ["y"]
    x = {"x": np.random.default_rng(3).standard_normal((8, 16)).astype(np.float32)}
    assert _cosine(_run(proto, x)[0], _run(model, x)[0]) > 0.98
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(ir.to_proto(model).SerializeToString(), options,
                         providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node]
    # fc2, the former Gemm, is fused; a DQ in front of a Gemm would be dequantized on every run.
    assert "MatMulNBits" in fused and "Gemm" not in fused


def test_int4_nbits_format_matches_the_qdq_form_in_onnxruntime():
    proto = _mlp()
    x = {"x": np.random.default_rng(3).standard_normal((8, 16)).astype(np.float32)}
    qdq, _, _ = _quantize(proto, [], mode="int4", block=32)
    nbits, qpass, modified = _quantize(proto, [], mode="int4", block=32, format="nbits")
    assert modified and qpass.report.counts["layers_quantized"] == 2
    nodes = [n for n in nbits.graph if n.op_type == "MatMulNBits"]
    assert [n.domain for n in nodes] == ["com.microsoft"] * 2 and "MatMul" not in _ops(nbits)
    assert nbits.opset_imports["com.microsoft"] == 1
    fc1 = nodes[0]
    assert {k: fc1.attributes.get_int(k) for k in ("K", "N", "bits", "block_size")} == {
        "K": 16, "N": 32, "bits": 4, "block_size": 32}
    assert fc1.inputs[1].const_value.numpy().shape == (32, 1, 16)  # [N, K blocks, block / 2]
    assert [v.name for v in nbits.graph.outputs] == ["y"]
    # onnxruntime fuses the QDQ form into MatMulNBits with int8 activations (accuracy_level 4);
    # unoptimised, it decodes the same int4 weights exactly and multiplies in float.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(ir.to_proto(qdq).SerializeToString(), options,
                                 providers=["CPUExecutionProvider"])
    reference, decoded = _run(proto, x)[0], plain.run(None, x)[0]
    np.testing.assert_allclose(_run(nbits, x)[0], decoded, rtol=1e-4, atol=1e-4)
    assert _cosine(reference, _run(nbits, x)[0]) > 0.98
    assert qpass.report.weight_bytes_after < qpass.report.weight_bytes_before / 3
    assert not any("opset" in note for note in qpass.report.notes)  # MatMulNBits needs no opset 21


def test_nbits_format_is_for_int4_only():
    with pytest.raises(PipelineSpecError, match="applies to int4 only"):
        Pipeline.parse("quantize:int8,format=nbits")
    with pytest.raises(PipelineSpecError, match="unknown format 'gguf'"):
        Pipeline.parse("quantize:int4,format=gguf")


def test_per_tensor_scale_only_where_per_channel_gains_nothing():
    from slimgraph.passes.quantize.int8 import per_tensor_suffices

    rng = np.random.default_rng(0)
    even = rng.uniform(-1.0, 1.0, (16, 32)).astype(np.float32)
    outlier = even.copy()
    outlier[3] *= 50.0  # one channel 50x larger: a shared scale would flatten the others
    assert per_tensor_suffices(even, 0)
    assert not per_tensor_suffices(outlier, 0)


@pytest.mark.parametrize("weight_scales", ["channel", "tensor"])
def test_int8_overheads_are_computed_or_stored_narrow_and_stay_exact(weight_scales):
    proto = make_tiny_cnn()
    feeds = _image_feeds(16)
    model, qpass, _ = _quantize(proto, feeds, weight_scales=weight_scales)
    inits = model.graph.initializers
    # Bias scales are s_x * s_w computed by a Mul; weight scales are float16 widened by a Cast.
    assert not any(name.endswith("bias_scale") for name in inits)
    assert any(v.const_value.dtype == ir.DataType.FLOAT16 for v in inits.values())
    scales = [n.inputs[1].producer().inputs[0].const_value.numpy() for n in model.graph
              if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None
              and n.inputs[0].const_value.dtype == ir.DataType.INT8]
    assert all((s.ndim == 0) == (weight_scales == "tensor") for s in scales)
    # The int8 graph after onnxruntime's folding equals the same graph evaluated naively.
    for feed in feeds[:4]:
        expected = _run(proto, feed)[0]
        actual = _run(model, feed)[0]
        assert _cosine(actual, expected) > 0.99
    assert qpass.report.weight_bytes_after < qpass.report.weight_bytes_before


def test_binary_acts_match_a_numpy_xnor_reference():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    proto = _single_layer("Gemm", w, [3, 8], {})
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 6
    model, _, modified = _quantize(proto, [], mode="binary", acts="binary")
    assert modified and "Sign" in _ops(model)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    alpha = np.abs(w).mean(axis=0).astype(np.float16).astype(np.float32)
    # XNOR-popcount: agreements minus disagreements of the sign bits, times alpha.
    agree = (x[:, :, None] >= 0) == (w[None] >= 0)
    expected = (2 * agree.sum(axis=1) - w.shape[0]) * alpha
    np.testing.assert_allclose(_run(model, {"x": x})[0], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="acts=binary"):
        InsertQDQPass(mode="int8", acts="binary")


# ---- embedding tables


def _embedding_model(vocab: int = 512, dim: int = 64, seed: int = 0) -> onnx.ModelProto:
    """Token ids -> a Gather on a table with a few outlier rows -> MatMul, plus a small table
    (below MIN_TABLE_ELEMENTS) and a Gather with constant indices, which both stay float."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((vocab, dim)).astype(np.float32) * 0.1
    table[::50] *= 20.0  # rows far larger than the rest: one scale per table would crush the others
    inits = [
        numpy_helper.from_array(table, "tokens"),
        numpy_helper.from_array(rng.standard_normal((2, dim)).astype(np.float32), "types"),
        numpy_helper.from_array(np.zeros((1,), np.int64), "type_ids"),
        numpy_helper.from_array(rng.standard_normal((dim, 16)).astype(np.float32), "w"),
    ]
    nodes = [
        helper.make_node("Gather", ["tokens", "ids"], ["emb"], name="token_embedding"),
        helper.make_node("Gather", ["types", "type_ids"], ["type_emb"], name="type_embedding"),
        helper.make_node("Add", ["emb", "type_emb"], ["h"]),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="proj"),
    ]
    graph = helper.make_graph(
        nodes, "embed", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16]),
         helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["N", 8, dim])], initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("options", [{"dynamic": True}, {"dynamic": False}, {"mode": "int4"}])
def test_every_mode_stores_embedding_tables_as_int8_rows(options):
    proto = _embedding_model()
    table = numpy_helper.to_array(proto.graph.initializer[0])
    ids = np.random.default_rng(1).integers(0, table.shape[0], (4, 8)).astype(np.int64)
    ids[0, :3] = [0, 50, 100]  # outlier rows
    feeds = [{"ids": np.random.default_rng(i).integers(0, 512, (2, 8)).astype(np.int64)} for i in range(4)]
    model, qpass, _ = _quantize(proto, feeds, **options)
    assert qpass.report.counts["embeddings_quantized"] == 1
    assert "tokens" not in model.graph.initializers  # the float table is gone
    int8_tables = [v for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.INT8
                   and v.shape == ir.Shape(list(table.shape))]
    assert len(int8_tables) == 1
    assert "types" in model.graph.initializers  # a small table is not worth it
    want = table[ids]
    got_emb = _run(model, {"ids": ids})[1]
    # every row within half a step of its own scale, the outlier rows and the ordinary ones alike
    step = np.abs(table).max(axis=1) / 127
    assert (np.abs(got_emb - want) <= step[ids][..., None] * 0.5 + 1e-7).all()
    assert [v.name for v in model.graph.outputs] == ["y", "emb"]


def test_embeddings_float_and_exclude_leave_the_table():
    proto = _embedding_model()
    for options in ({"embeddings": "float"}, {"exclude": ["token_embedding"]}):
        model, qpass, _ = _quantize(proto, [], dynamic=True, **options)
        assert "embeddings_quantized" not in qpass.report.counts
        assert model.graph.initializers["tokens"].const_value.dtype == ir.DataType.FLOAT
        assert not any("token_embedding" in note for note in qpass.report.notes)  # a known name
    with pytest.raises(PipelineSpecError, match="unknown embeddings 'int4'"):
        Pipeline.parse("quantize:int8,embeddings=int4")
