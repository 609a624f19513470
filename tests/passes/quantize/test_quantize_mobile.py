"""int8 on mobile-CNN structure: ReLU6 (Clip) folded into ranges, dead channels keep an int32 bias,
and what onnxruntime fuses leaves nothing in float between the convolutions."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimgraph.calibration import Calibration
from slimgraph.passes.quantize import InsertQDQPass
from slimgraph.passes.quantize.int8 import BIAS_LIMIT, bias_scale_floor


def _mobile_block(clip_min: float = 0.0, clip_max: float = 6.0, dead: bool = True,
                  seed: int = 0) -> onnx.ModelProto:
    """Conv 3->16 -> Clip -> depthwise 3x3 (channel 5 dead, with a bias) -> Clip -> Conv 16->8."""
    rng = np.random.default_rng(seed)
    dw = rng.standard_normal((16, 1, 3, 3)).astype(np.float32)
    if dead:
        dw[5] *= 1e-9  # what BatchNorm folding leaves of a channel whose gamma is ~0
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 3, 1, 1)).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b0"),
        numpy_helper.from_array(dw, "w1"),
        numpy_helper.from_array((rng.standard_normal(16) + 2).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((8, 16, 1, 1)) * 0.3).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(clip_min, np.float32), "lo"),
        numpy_helper.from_array(np.array(clip_max, np.float32), "hi"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w0", "b0"], ["c0"], name="expand"),
        helper.make_node("Clip", ["c0", "lo", "hi"], ["r0"], name="relu6_0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], group=16, pads=[1, 1, 1, 1],
                         name="depthwise"),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], name="relu6_1"),
        helper.make_node("Conv", ["r1", "w2"], ["out"], name="project"),
    ]
    graph = helper.make_graph(
        nodes, "mobile_block",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8, 12, 12])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"image": (rng.standard_normal((1, 3, 12, 12)) * 2).astype(np.float32)} for _ in range(n)]


def _quantized(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, InsertQDQPass]:
    qpass = InsertQDQPass(speed_check=False, calib="minmax")
    qpass.calibration = Calibration(_feeds(32, 0))
    model = ir.from_proto(proto)
    qpass(model)
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    return out, qpass


def _session(proto: onnx.ModelProto, optimized: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _relative_error(proto: onnx.ModelProto, quantized: onnx.ModelProto) -> float:
    x = np.concatenate([f["image"] for f in _feeds(16, 1)])
    ref = _session(proto).run(None, {"image": x})[0]
    got = _session(quantized).run(None, {"image": x})[0]
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def test_relu6_is_folded_and_onnxruntime_leaves_nothing_float_between_convs(tmp_path):
    proto = _mobile_block()
    quantized, qpass = _quantized(proto)
    assert qpass.report.counts["relus_folded"] == 2
    assert not any(n.op_type == "Clip" for n in quantized.graph.node)
    assert qpass.report.counts["biases_quantized"] == 2  # the dead channel's bias fits int32 too
    assert _relative_error(proto, quantized) < 0.02

    optimized = tmp_path / "optimized.onnx"
    _session(quantized, str(optimized))
    ops = collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)
    # One QuantizeLinear at the entry, then int8 kernels only; the last Conv writes the float
    # graph output, so it runs as DequantizeLinear -> Conv (layout Transposes are onnxruntime's).
    assert ops["QLinearConv"] == 2 and ops["QuantizeLinear"] == 1 and ops["Conv"] == 1
    assert set(ops) <= {"QLinearConv", "QuantizeLinear", "DequantizeLinear", "Conv", "Transpose"}


def test_clip_quantized_at_its_bounds_equals_the_float_clip():
    """The folded Clip's saturation is the Clip: at a [0, 6] range the int8 model holds the
    float one to within rounding even where half the pre-activations are out of range."""
    proto = _mobile_block(dead=False)
    quantized, _ = _quantized(proto)
    assert _relative_error(proto, quantized) < 0.02


def test_clip_that_excludes_zero_stays_float():
    """Clip(1, 6) cannot be a QuantizeLinear's saturation (its floor is not the zero point)."""
    proto = _mobile_block(clip_min=1.0)
    quantized, qpass = _quantized(proto)
    assert qpass.report.counts["relus_folded"] == 0
    assert sum(n.op_type == "Clip" for n in quantized.graph.node) == 2
    assert _relative_error(proto, quantized) < 0.02


def test_dead_channel_weight_scale_is_raised_so_the_bias_fits_int32():
    proto = _mobile_block()
    quantized, qpass = _quantized(proto)
    qmax = 63 if qpass.target().reduce_range else 127  # 7-bit weights on x86 AVX2 without VNNI
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    producers = {o: n for n in quantized.graph.node for o in n.output}
    depthwise = next(n for n in quantized.graph.node if n.name == "depthwise")
    w_dq = producers[depthwise.input[1]]
    x_dq = producers[depthwise.input[0]]
    w_scales = inits[w_dq.input[1]].astype(np.float64)
    x_scale = float(inits[x_dq.input[1]])
    bias = numpy_helper.to_array(proto.graph.initializer[3]).astype(np.float64)
    assert np.all(np.abs(bias) / (x_scale * w_scales) <= BIAS_LIMIT * (1 + 1e-3))
    live = np.abs(numpy_helper.to_array(proto.graph.initializer[2])).reshape(16, -1).max(axis=1)
    np.testing.assert_allclose(np.delete(w_scales, 5), np.delete(live, 5) / qmax, rtol=1e-3)
    assert w_scales[5] > live[5] / qmax * 100  # raised: its int8 weights are all 0


@pytest.mark.parametrize("bias", [None, np.array([1.0, -3.0], np.float32)])
def test_bias_scale_floor(bias):
    x_scale = ir.Value(name="s", const_value=ir.tensor(np.array(0.5, np.float32)))
    inputs = [ir.Value(name="x"), ir.Value(name="w")]
    if bias is not None:
        inputs.append(ir.Value(name="b", const_value=ir.tensor(bias)))
    node = ir.node("Conv", inputs)
    floor = bias_scale_floor(node, x_scale)
    if bias is None:
        assert floor is None
    else:
        np.testing.assert_allclose(floor, np.abs(bias) / (0.5 * 2**30))


def test_layer_kept_float_reads_a_float_input():
    """exclude=depthwise: the depthwise Conv and its input stay float, so the ReLU6 before it
    stays a Clip and nothing quantizes the expand Conv's output for it."""
    proto = _mobile_block(dead=False)
    qpass = InsertQDQPass(speed_check=False, calib="minmax", exclude=["depthwise"], guard=False)
    qpass.calibration = Calibration(_feeds(32, 0))
    model = ir.from_proto(proto)
    qpass(model)
    quantized = [n.inputs[0].name for n in model.graph if n.op_type == "QuantizeLinear"]
    assert "c0" not in quantized and "r0" not in quantized
    clip = next(n for n in model.graph if n.name == "relu6_0")
    assert clip.inputs[0].producer().name == "expand"  # the float output, no DequantizeLinear
    depthwise = next(n for n in model.graph if n.name == "depthwise")
    assert depthwise.inputs[0] is clip.outputs[0] and depthwise.inputs[1].name == "w1"
    # The ReLU6 after the float depthwise stays a Clip too: its producer is not int8.
    assert qpass.report.counts["relus_folded"] == 0 and qpass.report.counts["layers_quantized"] == 2
    assert _relative_error(proto, ir.to_proto(model)) < 0.02


def test_guard_runs_by_default_at_the_declared_tolerance():
    """Without options the int8 guard checks the held-out samples; guard=false skips it."""
    proto = _mobile_block()
    _, guarded = _quantized(proto)
    assert any(n.startswith("accuracy guard: all layers int8 -> cosine") and
               "held-out calibration samples" in n for n in guarded.report.notes)
    assert guarded.guard_tolerance().min_cosine == 0.99
    qpass = InsertQDQPass(speed_check=False, guard=False)
    qpass.calibration = Calibration(_feeds(8, 0))
    qpass(ir.from_proto(proto))
    assert not any("accuracy guard" in n for n in qpass.report.notes)


def test_export_judges_the_guard_on_the_verification_data(tmp_path):
    """export binds its verification feeds (and top-1 for classifiers) to the int8 guard."""
    import slimgraph

    result = slimgraph.export("digits-cnn", tmp_path / "out", passes="int8")
    (report,) = [r for r in result.manifest["passes"] if r["name"] == "quantize"]
    (first,) = [n for n in report["notes"] if n.startswith("accuracy guard: all layers int8")]
    assert "top-1" in first and "samples (the verification data)" in first
    assert result.verifications[0].passed


@pytest.mark.slow
def test_int8_recipe_passes_its_own_verification_on_a_real_pretrained_mobile_cnn(tmp_path):
    """EfficientNet-Lite1 with its ImageNet weights, crops of real photographs: the int8 recipe
    with no options meets its tolerance (top-1 >= 0.97) and onnxruntime runs it as int8 kernels."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("skimage")
    import slimgraph

    result = slimgraph.export("efficientnet-lite1", tmp_path / "out", passes="int8")
    (verification,) = result.verifications
    (logits,) = verification.outputs
    assert verification.passed and logits.top1_agreement >= 0.97 and logits.cosine >= 0.99
    optimized = tmp_path / "optimized.onnx"
    _session(onnx.load(result.out / "model.onnx"), str(optimized))
    ops = collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)
    convs = ops["QLinearConv"] + ops["Conv"] + ops["FusedConv"]
    # On x86 AVX2 without VNNI the weights are 7-bit (onnxruntime's u8s8 kernels would saturate
    # int16 pair sums) and the accuracy guard keeps a few more layers float to meet the tolerance.
    from slimgraph.passes.quantize.int8 import cpu_flags, int8_target

    seven_bit = int8_target(cpu_flags()).reduce_range
    least, adds = (56, 12) if seven_bit else (60, 14)  # the net has 14 residual adds
    assert convs == 64 and ops["QLinearConv"] >= least and ops["QLinearAdd"] >= adds
