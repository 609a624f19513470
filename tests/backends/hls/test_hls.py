"""hls: the emitted C++ project, compiled by g++ and run, against the graph it came from."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimgraph.backends import parse_backend_spec
from slimgraph.backends.hls import HLS, find_ap_types, reference
from slimgraph.backends.hls.lower import lower, multiplier
from slimgraph.backends.ort import session_for
from slimgraph.calibration import Calibration
from slimgraph.errors import BackendError, UnsupportedOpError
from slimgraph.frontend.builtin import get_builtin
from slimgraph.model_stats import layer_macs
from slimgraph.passes.quantize import InsertQDQPass

pytestmark = pytest.mark.skipif(shutil.which("g++") is None or shutil.which("make") is None,
                                reason="the C simulation needs g++ and make")
CLI = [sys.executable, "-m", "slimgraph.cli"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, check=False)


def _held_out(name: str) -> tuple[str, np.ndarray, np.ndarray]:
    builtin = get_builtin(name)
    data = builtin.evaluation()
    key = builtin.input_names[0]
    return key, np.concatenate([f[key] for f in data.feeds]), np.concatenate(data.labels)


def test_rounding_shift_is_round_half_even() -> None:
    values = np.array([-9, -7, -6, -5, -3, -2, -1, 0, 1, 2, 3, 5, 6, 7, 9, 2**40 + 3], np.int64)
    for shift in (0, 1, 2, 3):
        want = [round(Fraction(int(v), 2**shift)) for v in values]  # Python rounds half to even
        assert reference.rounding_shift(values, np.int64(shift)).tolist() == want


def test_multiplier_has_31_significant_bits() -> None:
    reals = np.array([1e-6, 0.0123, 0.5, 0.99999999, 1.0, 3.75, 1000.0])
    m, shift = multiplier(reals, acc_bits=24)
    assert (m < 2**31).all() and (m >= 2**30).all()
    np.testing.assert_allclose(m / 2.0**shift, reals, rtol=2**-30)


def test_registered_with_options() -> None:
    backend, options = parse_backend_spec("hls:io=stream,reuse=4,precision=ap_fixed<16,6>")
    assert backend is HLS and options == {"io": "stream", "reuse": 4,
                                          "precision": "ap_fixed<16,6>"}
    assert HLS.available() and HLS.buildable()


def test_digits_cnn_int8_project_csim_bit_exact(tmp_path: Path) -> None:
    out = tmp_path / "art"
    run = _cli("export", "digits-cnn", "-o", str(out), "--passes", "fold-constants,quantize:int8",
               "--backend", "hls", "--quiet")
    assert run.returncode == 0, run.stderr
    project = out / "hls"
    for name in ("firmware/model.cpp", "firmware/model.h", "firmware/sg/sg_layers.h",
                 "tb/tb_model.cpp", "Makefile", "build.tcl", "estimate.json", "tb_data/inputs.txt"):
        assert (project / name).is_file(), name
    assert "#pragma HLS PIPELINE" in (project / "firmware/sg/sg_layers.h").read_text()
    assert "set_part {xcvu13p-flga2577-2-e}" in (project / "build.tcl").read_text()

    # The project's own Makefile builds and runs the C simulation (as a user would).
    (project / "tb_data/csim_outputs.txt").unlink()
    make = subprocess.run(["make", "-C", str(project), "csim"], capture_output=True, text=True,
                          check=False)
    assert make.returncode == 0, make.stderr[-3000:]
    csim = np.loadtxt(project / "tb_data/csim_outputs.txt", dtype=np.int64, ndmin=2)

    # ... and equals the NumPy integer reference of the graph on the same raw inputs.
    model = ir.load(out / "model.onnx")
    lowered = lower(model)
    raw = np.loadtxt(project / "tb_data/inputs.txt", dtype=np.int64, ndmin=2)
    want = reference.outputs(lowered, [raw.reshape(len(raw), 1, 8, 8)])[0]
    assert csim.shape == (256, 10)
    np.testing.assert_array_equal(csim, want)

    # MACs per layer equal `slimgraph inspect`'s.
    estimate = json.loads((project / "estimate.json").read_text())
    inspect = {row.node: row.macs for row in layer_macs(model) if row.macs}
    ours = {row["layer"]: row["macs"] for row in estimate["layers"] if row["macs"]}
    assert ours == inspect and estimate["total"]["macs"] == sum(inspect.values())
    assert estimate["total"]["dsp"] > 0 and estimate["total"]["latency_cycles"] > 0

    # Test accuracy of the C simulation equals the int8 ONNX model's on the held-out split.
    key, images, labels = _held_out("digits-cnn")
    runner = HLS.load(_built(out))
    logits = runner({key: images})[0]
    onnx_logits = session_for(str(out / "model.onnx")).run(None, {key: images})[0]
    assert (logits.argmax(1) == labels).mean() == (onnx_logits.argmax(1) == labels).mean()
    assert (logits.argmax(1) == onnx_logits.argmax(1)).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backends"]["hls"]["details"]["csim"]["vs_integer_reference"]["bit_exact"]
    assert "## hls" in (out / "report.md").read_text()


def _built(out: Path):
    from slimgraph.backends.base import BuiltArtifact

    return BuiltArtifact("hls", out, [], {}, "hls/io.json")


def _mixed_model() -> onnx.ModelProto:
    """Conv -> Clip(0, 6) -> depthwise stride-2 Conv -> Relu -> two 1x1 Convs -> Concat -> Add
    (skip) -> Relu -> AveragePool -> MaxPool -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(3)

    def weight(name, *shape):
        return numpy_helper.from_array((0.4 * rng.standard_normal(shape)).astype(np.float32), name)

    inits = [weight("w0", 8, 3, 3, 3), weight("b0", 8), weight("wd", 8, 1, 3, 3), weight("bd", 8),
             weight("wa", 4, 8, 1, 1), weight("wb", 4, 8, 1, 1), weight("wf", 5, 8),
             weight("bf", 5), numpy_helper.from_array(np.float32(0), "lo"),
             numpy_helper.from_array(np.float32(6), "hi")]
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
        node("Clip", ["c0", "lo", "hi"], ["r0"], name="relu6"),
        node("Conv", ["r0", "wd", "bd"], ["cd"], pads=[1, 1, 1, 1], strides=[2, 2], group=8,
             name="depthwise"),
        node("Relu", ["cd"], ["d"], name="relu_d"),
        node("Conv", ["d", "wa"], ["a"], name="branch_a"),
        node("Conv", ["d", "wb"], ["b"], name="branch_b"),
        node("Concat", ["a", "b"], ["cat"], axis=1, name="concat"),
        node("Add", ["cat", "d"], ["sum"], name="skip"),
        node("Relu", ["sum"], ["s"], name="relu_s"),
        node("AveragePool", ["s"], ["ap"], kernel_shape=[2, 2], strides=[2, 2], name="avg"),
        node("MaxPool", ["ap"], ["mp"], kernel_shape=[2, 2], pads=[0, 0, 1, 1], name="max"),
        node("GlobalAveragePool", ["mp"], ["gp"], name="gap"),
        node("Flatten", ["gp"], ["f"], name="flatten"),
        node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _images(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 12, 12)).astype(np.float32)


@pytest.fixture(scope="module")
def mixed_int8() -> ir.Model:
    qpass = InsertQDQPass(speed_check=False, guard=False)
    qpass.calibration = Calibration([{"x": _images(1, seed)} for seed in range(16)])
    return qpass(ir.from_proto(_mixed_model())).model


@pytest.mark.parametrize("io", ["parallel", "stream"])
def test_mixed_ops_int8_bit_exact_and_close_to_onnxruntime(mixed_int8: ir.Model, io: str,
                                                           tmp_path: Path) -> None:
    feeds = [{"x": _images(8, seed)} for seed in (100, 101)]
    built = HLS.build(mixed_int8, tmp_path, {"io": io}, feeds=feeds)
    kinds = {layer["kind"] for layer in built.details["estimate"] and json.loads(
        (tmp_path / "hls/estimate.json").read_text())["layers"]}
    assert {"conv", "add", "concat", "avgpool", "maxpool", "dense"} <= kinds
    csim = built.details["csim"]
    assert csim["vs_integer_reference"]["bit_exact"]
    assert csim["vs_onnxruntime"]["fraction_within_one_step"] >= 0.999
    per_layer = csim["vs_onnxruntime"]["per_layer"]
    assert per_layer["layers"] >= 8 and per_layer["fraction_within_one_step"] >= 0.999
    x = np.concatenate([f["x"] for f in feeds])
    got = HLS.load(built)({"x": x})[0]
    want = session_for(ir.to_proto(mixed_int8).SerializeToString()).run(None, {"x": x})[0]
    assert (got.argmax(1) == want.argmax(1)).all()
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def test_parallel_and_stream_compute_the_same_integers(mixed_int8: ir.Model,
                                                       tmp_path: Path) -> None:
    x = _images(6, 7)
    outs = [HLS.load(HLS.build(mixed_int8, tmp_path / io, {"io": io, "csim": False}))({"x": x})[0]
            for io in ("parallel", "stream")]
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("acts", ["float", "binary"])
def test_binary_mlp_bit_exact(acts: str, tmp_path: Path) -> None:
    key, features, labels = _held_out("mlp")
    builtin = get_builtin("mlp")
    from slimgraph.frontend import load

    loaded = load("mlp")
    qpass = InsertQDQPass(mode="binary", acts=acts, speed_check=False, guard=False)
    qpass.calibration = Calibration(builtin.calibration(8))
    model = qpass(loaded.model.clone()).model
    feeds = [{key: features[:64]}]
    built = HLS.build(model, tmp_path, {}, feeds=feeds)
    assert built.details["csim"]["vs_integer_reference"]["bit_exact"]
    layers = json.loads((tmp_path / "hls/estimate.json").read_text())["layers"]
    assert [r["weights"] for r in layers if r["macs"]] == ["binary"] * 3
    assert all(r["multipliers"] == 0 for r in layers)
    header = (tmp_path / "hls/firmware/model.h").read_text()
    assert ("kind = 2" in header) == (acts == "binary")  # XNOR-popcount with sign inputs
    got = HLS.load(built)({key: features})[0]
    want = session_for(ir.to_proto(model).SerializeToString()).run(None, {key: features})[0]
    # ap_fixed<16,6> activations: within a few 2^-10 steps of the float execution. With sign
    # activations a value within 2^-11 of zero rounds to 0 (Sign 0) and moves one output by alpha.
    err = np.abs(got - want)
    assert np.quantile(err, 0.9 if acts == "binary" else 1.0) <= 0.01 * np.abs(want).max()
    assert (got.argmax(1) == want.argmax(1)).mean() >= (0.97 if acts == "binary" else 0.99)


def test_float_graph_needs_precision(tmp_path: Path) -> None:
    from slimgraph.frontend import load

    model = load("mlp").model
    with pytest.raises(UnsupportedOpError, match="quantize .*precision=ap_fixed"):
        HLS.build(model, tmp_path / "a", {})
    assert not (tmp_path / "a").exists()
    key, features, _ = _held_out("mlp")
    built = HLS.build(model, tmp_path / "b", {"precision": "ap_fixed<18,8>"},
                      feeds=[{key: features[:32]}])
    assert built.details["csim"]["vs_integer_reference"]["bit_exact"]
    got = HLS.load(built)({key: features})[0]
    want = session_for(ir.to_proto(model).SerializeToString()).run(None, {key: features})[0]
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99


def test_unsupported_nodes_listed_with_the_pass_that_removes_them(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(np.ones(4, np.float32), n) for n in ("g", "b", "m", "v")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn"),
         helper.make_node("Tanh", ["n"], ["y"], name="tanh")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])], initializer=inits)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(UnsupportedOpError) as info:
        HLS.build(model, tmp_path, {})
    message = str(info.value)
    assert "bn (BatchNormalization): fold-constants" in message and "tanh (Tanh)" in message
    assert not (tmp_path / "hls").exists()


@pytest.mark.parametrize("spec, message", [
    ("hls:io=wide", "io='wide'"), ("hls:reuse=0", "reuse=0"),
    ("hls:precision=int8", "ap_fixed<W,I>"), ("hls:colour=red", "unknown option"),
])
def test_bad_options_exit_2_and_write_nothing(spec: str, message: str, tmp_path: Path) -> None:
    run = _cli("export", "mlp", "-o", str(tmp_path / "o"), "--passes", "quantize:int8",
               "--backend", spec, "--quiet")
    assert run.returncode == 2 and message in run.stderr
    assert not (tmp_path / "o").exists()


def test_unroll_limit(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="wide")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(rng.standard_normal((2, 5000)).astype(np.float32), "w")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(BackendError, match="use reuse >= 2"):
        HLS.build(model, tmp_path, {"precision": "ap_fixed<16,6>"})
    HLS.build(model, tmp_path, {"precision": "ap_fixed<16,6>", "reuse": 2})


@pytest.mark.slow
def test_resnet_tiny_int8_stream(tmp_path: Path) -> None:
    run = _cli("export", "resnet-tiny", "-o", str(tmp_path / "r"), "--passes",
               "fold-constants,quantize:int8", "--backend", "hls:io=stream", "--quiet")
    assert run.returncode == 0, run.stderr
    csim = json.loads((tmp_path / "r/hls/csim.json").read_text())
    assert csim["vs_integer_reference"]["bit_exact"] and csim["samples"] > 0
    assert csim["vs_onnxruntime"]["fraction_within_one_step"] >= 0.999
    model_cpp = (tmp_path / "r/hls/firmware/model.cpp").read_text()
    assert "#pragma HLS DATAFLOW" in model_cpp and "sg::clone_stream" in model_cpp


@pytest.mark.parametrize("head", ["Sigmoid", "Softmax"])
@pytest.mark.parametrize("mode", ["int8", "fixed"])
def test_sigmoid_and_softmax_by_lookup_table(head: str, mode: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["z"], transB=1, name="fc"),
         helper.make_node(head, ["z"], ["y"], name="head")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        initializer=[numpy_helper.from_array(rng.standard_normal((6, 12)).astype(np.float32), "w"),
                     numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = rng.standard_normal((64, 12)).astype(np.float32)
    options = {"precision": "ap_fixed<16,6>"}
    if mode == "int8":
        qpass = InsertQDQPass(speed_check=False, guard=False)
        qpass.calibration = Calibration([{"x": x[i:i + 1]} for i in range(32)])
        model = qpass(model).model
        options = {}
    built = HLS.build(model, tmp_path, options, feeds=[{"x": x[:16]}])
    assert built.details["csim"]["vs_integer_reference"]["bit_exact"]
    got = HLS.load(built)({"x": x})[0]
    want = session_for(ir.to_proto(model).SerializeToString()).run(None, {"x": x})[0]
    assert np.abs(got - want).max() <= 0.03
    if head == "Softmax":
        assert np.abs(got.sum(axis=1) - 1).max() <= 0.01


def test_same_input_same_files(mixed_int8: ir.Model, tmp_path: Path) -> None:
    feeds = [{"x": _images(4, 11)}]
    for name in ("a", "b"):
        HLS.build(mixed_int8, tmp_path / name, {"io": "stream"}, feeds=feeds)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 10
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_agreement_with_onnxruntime_is_enforced(mixed_int8: ir.Model, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    feeds = [{"x": _images(4, 12)}]
    built = HLS.build(mixed_int8, tmp_path / "b", {"agreement": 1.0}, feeds=feeds)
    assert built.details["csim"]["vs_onnxruntime"]["fraction_within_one_step"] >= 0.999
    # values two steps off onnxruntime must fail the export
    import slimgraph.backends.hls.csim_check as csim_check

    counts = csim_check._agreement
    monkeypatch.setattr(csim_check, "_agreement", lambda pairs: counts((m + 2, t) for m, t in pairs))
    with pytest.raises(BackendError, match="within one step of onnxruntime"):
        HLS.build(mixed_int8, tmp_path / "a", {"agreement": 0.999}, feeds=feeds)


def test_runner_answers_the_recorded_inputs_as_a_fresh_simulation_does(mixed_int8: ir.Model,
                                                                        tmp_path: Path) -> None:
    feeds = [{"x": _images(3, 21)}, {"x": _images(2, 22)}]
    built = HLS.build(mixed_int8, tmp_path, {}, feeds=feeds)
    recorded, fresh = HLS.load(built), HLS.load(built)
    fresh.recorded = None
    for feed in feeds:
        np.testing.assert_array_equal(recorded(feed)[0], fresh(feed)[0])
    assert recorded.offset == 5
    other = {"x": _images(2, 23)}  # not what tb_data holds: simulated
    np.testing.assert_array_equal(recorded(other)[0], fresh(other)[0])


def _ap_types() -> Path:
    """Vitis's ap_int.h / hls_stream.h: $XILINX_HLS/include, or the copy in hls4ml's wheel (the
    dev extra installs hls4ml for it)."""
    try:
        return find_ap_types("auto")
    except BackendError as exc:
        pytest.skip(str(exc))


def _binary_acts_mlp() -> tuple[ir.Model, str, np.ndarray]:
    from slimgraph.frontend import load

    key, features, _ = _held_out("mlp")
    qpass = InsertQDQPass(mode="binary", acts="binary", speed_check=False, guard=False)
    qpass.calibration = Calibration(get_builtin("mlp").calibration(8))
    return qpass(load("mlp").model.clone()).model, key, features[:16]


@pytest.mark.parametrize("case", ["mixed int8 parallel", "mixed int8 stream", "binary mlp"])
def test_built_with_vitis_types_it_computes_what_the_plain_build_does(
        case: str, mixed_int8: ir.Model, tmp_path: Path) -> None:
    # The design as Vitis compiles it: ap_int accumulators and 2-bit sign activations,
    # hls::stream from Vitis's header, none of the plain build's stand-ins.
    ap = _ap_types()
    if case == "binary mlp":
        model, key, x = _binary_acts_mlp()
        options: dict = {}
        classes = 10
    else:
        model, key, x = mixed_int8, "x", _images(8, 100)
        options = {"io": case.split()[-1]}
        classes = 5
    built = HLS.build(model, tmp_path, options | {"ap_types": str(ap)}, feeds=[{key: x}])
    plain = np.loadtxt(tmp_path / "hls/tb_data/csim_outputs.txt", dtype=np.int64, ndmin=2)
    vitis = np.loadtxt(tmp_path / "hls/tb_data/csim_ap_outputs.txt", dtype=np.int64, ndmin=2)
    assert plain.shape == vitis.shape == (len(x), classes)
    np.testing.assert_array_equal(vitis, plain)
    assert built.details["csim"]["vitis_types"] == {
        "headers": str(ap), "elements": plain.size, "mismatches": 0, "identical": True}
    assert "make csim-ap" in (tmp_path / "hls/Makefile").read_text()


def test_ap_types_that_are_not_there_fail_before_writing(mixed_int8: ir.Model,
                                                         tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="no ap_int.h and hls_stream.h found .*XILINX_HLS"):
        HLS.build(mixed_int8, tmp_path / "out", {"ap_types": str(tmp_path)},
                  feeds=[{"x": _images(2, 1)}])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("groups, bits", [(1, 8), (2, 8), (8, 8), (1, 40)])
def test_reference_products_are_exact_integers(groups: int, bits: int) -> None:
    """The integer reference's conv (float64 BLAS where exact, int64 past 2^53) against int64
    einsum, with grouped, depthwise and too-wide-for-float64 weights."""
    from slimgraph.backends.hls.reference import _conv, _grouped_products

    rng = np.random.default_rng(groups + bits)
    top = 2 ** (bits - 1)
    windows = rng.integers(-255, 256, (3, 8, 5, 4, 3, 3), dtype=np.int64)
    weight = rng.integers(-top, top, (8, 8 // groups, 3, 3), dtype=np.int64)
    w = weight.reshape(groups, -1, 8 // groups, 3, 3)
    win = windows.reshape(3, groups, 8 // groups, 5, 4, 3, 3)
    want = np.einsum("bgchwij,gocij->bgohw", win, w).reshape(3, -1, 5, 4)
    got = _conv(windows, weight, groups)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    x, dense = rng.integers(-255, 256, (6, 50)), rng.integers(-top, top, (7, 50))
    np.testing.assert_array_equal(_grouped_products(x[None], dense[None])[0], x @ dense.T)
