"""sparsify: exact counts and thresholds per layer and globally, N:M groups along the reduction
axis of Gemm (both layouts), MatMul and Conv, outputs against the unmodified model evaluated with
the same zeros, skip, bad options, and heal keeping the zeros."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import slimgraph
from slimgraph.cli import main
from slimgraph.errors import PipelineSpecError, UnsupportedOpError
from slimgraph.passes import Pipeline, SparsifyPass

RNG = np.random.default_rng(0)


def _graph(trans_b: int = 1) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """x[N,16] -> Gemm(w1, transB) -> Relu -> MatMul(w2 [8,12]) -> Conv-free head -> y[N,12]."""
    w1 = RNG.standard_normal((8, 16) if trans_b else (16, 8)).astype(np.float32)
    b1 = RNG.standard_normal(8).astype(np.float32)
    w2 = RNG.standard_normal((8, 12)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=trans_b, name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12])],
        initializer=[numpy_helper.from_array(a, k) for k, a in
                     (("w1", w1), ("b1", b1), ("w2", w2))])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    return ir.from_proto(proto), {"w1": w1, "b1": b1, "w2": w2}


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _forward(w: dict[str, np.ndarray], x: np.ndarray, trans_b: int) -> np.ndarray:
    h = x @ (w["w1"].T if trans_b else w["w1"]) + w["b1"]
    return np.maximum(h, 0) @ w["w2"]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_layer_scope_zeroes_the_smallest_of_each_layer(trans_b):
    model, before = _graph(trans_b)
    p = SparsifyPass(sparsity=0.75)
    out = p(model).model
    after = _weights(out)
    for key in ("w1", "w2"):
        w, s = before[key], after[key]
        zero = s == 0
        assert zero.sum() == round(0.75 * w.size)
        assert np.array_equal(s[~zero], w[~zero])  # what stays is untouched
        assert np.abs(w[zero]).max() <= np.abs(w[~zero]).min()
    assert np.array_equal(after["b1"], before["b1"])  # biases stay dense
    x = RNG.standard_normal((5, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _forward(after, x, trans_b), rtol=1e-5, atol=1e-5)
    assert p.report.counts["weights_zeroed"] == round(0.75 * 128) + round(0.75 * 96)


def test_global_scope_uses_one_threshold():
    model, before = _graph()
    before["w2"] *= 10  # larger weights: under one threshold this layer loses fewer
    model.graph.initializers["w2"].const_value = ir.tensor(before["w2"], name="w2")
    after = _weights(SparsifyPass(sparsity=0.5, scope="global")(model).model)
    removed = np.concatenate([np.abs(before[k][after[k] == 0]) for k in ("w1", "w2")])
    kept = np.concatenate([np.abs(before[k][after[k] != 0]) for k in ("w1", "w2")])
    assert removed.size == round(0.5 * (128 + 96)) and removed.max() <= kept.min()
    assert (after["w2"] == 0).mean() < 0.5 < (after["w1"] == 0).mean()


def _check_n_of_m(w: np.ndarray, s: np.ndarray, rows: np.ndarray, n: int, m: int) -> None:
    """``rows`` is ``w`` laid out [..., K] along the reduction axis (built by the test itself)."""
    groups_s = rows(s).reshape(-1, m)
    groups_w = rows(w).reshape(-1, m)
    assert ((groups_s != 0).sum(axis=1) <= n).all()
    for gs, gw in zip(groups_s, groups_w, strict=True):
        assert sorted(np.abs(gw))[-n:] == sorted(np.abs(gs[gs != 0]))


@pytest.mark.parametrize("trans_b", [0, 1])
def test_two_of_four_on_gemm_and_matmul(trans_b):
    model, before = _graph(trans_b)
    out = Pipeline.parse("sparsify:pattern=2:4").run(model)[0]
    after = _weights(out)
    gemm_rows = (lambda a: a) if trans_b else (lambda a: a.T)  # [N, K] either way
    _check_n_of_m(before["w1"], after["w1"], gemm_rows, 2, 4)
    _check_n_of_m(before["w2"], after["w2"], lambda a: a.T, 2, 4)  # MatMul [K, N] -> [N, K]
    x = RNG.standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _forward(after, x, trans_b), rtol=1e-5, atol=1e-5)


def test_n_of_m_on_a_real_conv_and_what_stays_dense():
    model, _ = Pipeline.parse("fold-constants").run(slimgraph.load("digits-cnn").model)
    convs = [n for n in model.graph if n.op_type == "Conv"]
    before = {n.name: n.inputs[1].const_value.numpy().copy() for n in convs}
    p = Pipeline.parse("sparsify:pattern=4:8")
    out, (report,) = p.run(model)
    for node in (n for n in out.graph if n.op_type == "Conv"):
        w, s = before[node.name], node.inputs[1].const_value.numpy()
        if w.shape[1] % 8:  # the first conv reads 1 channel: left dense, and said so
            assert np.array_equal(w, s)
            assert any(node.name in note and "left dense" in note for note in report.notes)
        else:  # [O, I, kh, kw] -> [O, kh, kw, I]: groups of 8 input channels
            _check_n_of_m(w, s, lambda a: np.moveaxis(a, 1, -1), 4, 8)


def test_skip_keeps_a_layer_dense_and_unknown_names_are_listed():
    model, before = _graph()
    after = _weights(SparsifyPass(sparsity=0.5, skip=["fc1"])(model).model)
    assert np.array_equal(after["w1"], before["w1"]) and (after["w2"] == 0).sum() == 48
    model, _ = _graph()
    with pytest.raises(PipelineSpecError, match=r"layers with weights: fc1, fc2"):
        SparsifyPass(sparsity=0.5, skip=["fc9"])(model)


@pytest.mark.parametrize("spec,message", [
    ("sparsify:1.5", "sparsity must be in"),
    ("sparsify:0", "sparsity must be in"),
    ("sparsify:0.9,pattern=3:4", "pattern must be one of"),
    ("sparsify:0.9,pattern=2:4", "means sparsity 0.5"),
    ("sparsify:0.5,scope=local", "scope must be one of"),
    ("sparsify", "give the sparsity"),
])
def test_bad_options(spec, message):
    with pytest.raises(PipelineSpecError, match=message):
        Pipeline.parse(spec)


@pytest.mark.parametrize("spec,message", [
    ("sparsify:1.5", "sparsity must be in"),
    ("sparsify:0.5,pattern=1:3", "pattern must be one of"),
    ("sparsify:0.5,skip=nope", "skip names unknown layers"),
    ("share-weights:bits=9", "bits must be in 1..8"),
    ("share-weights:skip=nope", "skip names unknown layers"),
    ("fold-sparse:positions=csr", "positions must be one of"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, spec, message):
    out = tmp_path / "out"
    assert main(["export", "mlp", "-o", str(out), "--passes", spec, "--pack", "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_quantized_graph_is_refused():
    model, _ = Pipeline.parse("fold-constants,quantize:int8,dynamic=true").run(
        slimgraph.load("mlp").model)
    with pytest.raises(UnsupportedOpError, match="sparsify before quantizing"):
        SparsifyPass(sparsity=0.5)(model)


def test_heal_keeps_the_zeros(tmp_path):
    result = slimgraph.export("digits-cnn", tmp_path / "out", backends=["ort-cpu"],
                              passes="fold-constants,sparsify:0.8,heal:steps=30",
                              allow_mismatch=True)
    sparse, _ = Pipeline.parse("fold-constants,sparsify:0.8").run(
        slimgraph.load("digits-cnn").model)
    healed = ir.load(result.out / "model.onnx")
    moved = 0
    for node in (n for n in sparse.graph if n.op_type in ("Conv", "Gemm")):
        want = node.inputs[1].const_value.numpy()
        got = healed.graph.initializers[node.inputs[1].name].const_value.numpy()
        assert np.array_equal(got == 0, want == 0), node.name  # the same zeros, no more, no fewer
        moved += int(np.sum(got != want))
    assert moved > 0  # heal trained the weights that stayed


def test_kmeans_finds_well_separated_clusters():
    from slimgraph.passes.sparse.share import kmeans_1d

    rng = np.random.default_rng(1)
    means = np.array([-2.0, 0.5, 3.0])
    labels = rng.integers(0, 3, 600)
    values = means[labels] + rng.normal(0, 0.05, 600)
    centroids, assign = kmeans_1d(values, 3)
    np.testing.assert_allclose(centroids, [values[labels == i].mean() for i in range(3)],
                               atol=1e-6)
    assert np.array_equal(assign, labels)


def _decoded(model: ir.Model, weight: str) -> np.ndarray:
    """The dense weight the graph computes for ``weight`` (run by onnxruntime, not by the pass)."""
    proto = ir.to_proto(model)
    proto.graph.output.append(helper.make_tensor_value_info(weight, TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([weight], {"x": np.zeros((1, 16), np.float32)})[0]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_share_weights_decodes_to_a_codebook_and_keeps_the_zeros(scope):
    model, before = _graph()
    sparse = Pipeline.parse("sparsify:0.5").run(model)[0]
    zeros = {k: _weights(sparse)[k] == 0 for k in ("w1", "w2")}
    shared = Pipeline.parse(f"share-weights:bits=2,scope={scope}").run(sparse)[0]
    assert "w1" not in shared.graph.initializers  # stored as codebook + uint8 indices now
    codebooks = [k for k in shared.graph.initializers if "codebook" in k]
    assert len(codebooks) == (1 if scope == "global" else 2)
    decoded = {k: _decoded(shared, k) for k in ("w1", "w2")}
    for key in ("w1", "w2"):
        assert np.array_equal(decoded[key] == 0, zeros[key])  # exact zeros, the same ones
        assert len(np.unique(decoded[key][~zeros[key]])) <= 4
        # Each stays near its original value: within the spread of its cluster.
        err = np.abs(decoded[key] - before[key] * ~zeros[key]).max()
        assert err < 0.5 * np.abs(before[key]).max()
    x = RNG.standard_normal((4, 16)).astype(np.float32)
    want = _forward({**decoded, "b1": before["b1"]}, x, 1)
    np.testing.assert_allclose(_run(shared, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,message", [
    ("share-weights:bits=0", "bits must be in 1..8"),
    ("share-weights:bits=9", "bits must be in 1..8"),
    ("share-weights:scope=row", "scope must be one of"),
])
def test_share_weights_bad_options(spec, message):
    with pytest.raises(PipelineSpecError, match=message):
        Pipeline.parse(spec)


def test_heal_trains_the_centroids_and_keeps_assignments_and_zeros(tmp_path):
    spec = "fold-constants,sparsify:0.5,share-weights:bits=1"  # 2 centroids: heal has work
    result = slimgraph.export("mlp", tmp_path / "out", backends=["ort-cpu"],
                              passes=spec + ",heal:steps=100", allow_mismatch=True)
    plain, _ = Pipeline.parse(spec).run(slimgraph.load("mlp").model)
    healed = ir.load(result.out / "model.onnx")
    moved = 0
    for name, value in plain.graph.initializers.items():
        got = healed.graph.initializers[name].const_value.numpy()
        want = value.const_value.numpy()
        if "codebook" in name:
            moved += int(np.sum(got != want))
            assert want[0] == 0 and got[0] == 0  # the zero entry the sparse indices point at
        else:  # indices, masks, biases of a graph heal may not restructure
            if got.dtype == np.uint8:
                assert np.array_equal(got, want), name
    assert moved > 0


def _constant_graph(array: np.ndarray) -> ir.Model:
    """A graph whose output is the initializer ``t`` (through an Identity)."""
    dtype = helper.np_dtype_to_tensor_dtype(array.dtype)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["t"], ["y"], name="out")], "g", [],
        [helper.make_tensor_value_info("y", dtype, list(array.shape))],
        initializer=[numpy_helper.from_array(array, "t")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    return ir.from_proto(proto)


def test_relative_gaps_fill_long_runs():
    from slimgraph.passes.sparse.fold import relative_gaps

    gaps, filler = relative_gaps(np.array([0, 3, 600]))
    assert gaps.tolist() == [1, 3, 255, 255, 87]
    assert filler.tolist() == [False, False, True, True, False]
    assert (np.cumsum(gaps.astype(np.int64)) - 1)[~filler].tolist() == [0, 3, 600]


@pytest.mark.parametrize("zero_fraction,form", [(0.5, "bitmask"), (0.995, "relative"),
                                                (0.9, "auto")])
@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_fold_sparse_decodes_bit_identical(zero_fraction, form, dtype):
    from slimgraph.passes.sparse import FoldSparsePass

    rng = np.random.default_rng(3)
    array = (rng.standard_normal((64, 300)) * 50).astype(dtype)
    array[rng.random(array.shape) < zero_fraction] = 0
    array[array == 0] = 0
    if dtype == np.float32:
        array[0, 1] = -0.0  # a negative zero is a value, and must come back as one
    p = FoldSparsePass(channels=False, positions=form)
    model = p(_constant_graph(array)).model
    assert "t" not in model.graph.initializers
    assert sum(p.report.counts.get(f"tensors_{f}", 0) for f in ("bitmask", "relative")) == 1
    if form != "auto":
        assert p.report.counts[f"tensors_{form}"] == 1
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {})[0]
    assert got.dtype == array.dtype and got.shape == array.shape
    assert got.tobytes() == array.tobytes()
    assert len(proto.SerializeToString()) < array.nbytes


def test_fold_sparse_leaves_dense_and_tiny_tensors():
    from slimgraph.passes.sparse import FoldSparsePass

    dense = np.arange(1, 2001, dtype=np.float32).reshape(40, 50)
    assert not FoldSparsePass(channels=False)(_constant_graph(dense)).modified
    tiny = np.zeros((4, 4), np.float32)
    tiny[0, 0] = 1
    assert not FoldSparsePass(channels=False)(_constant_graph(tiny)).modified


def test_fold_sparse_removes_dead_channels_and_keeps_the_outputs():
    loaded = slimgraph.load("mlp")
    sparse = Pipeline.parse("fold-constants,sparsify:0.95").run(loaded.model)[0]
    feeds = {"features": np.concatenate([f["features"] for f in loaded.calibration][:32])}
    folded, (report,) = Pipeline.parse("fold-sparse").run(ir.from_proto(ir.to_proto(sparse)))
    assert report.counts["dead_channels"] > 0 and report.counts["bytes_saved"] > 0
    runs = []
    for m in (sparse, folded):
        session = ort.InferenceSession(ir.to_proto(m).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        runs.append(session.run(None, feeds)[0])
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5, atol=1e-5)
    assert len(ir.to_proto(folded).SerializeToString()) < len(ir.to_proto(sparse).SerializeToString()) / 5


def test_export_pack_writes_an_xz_that_unpacks_to_the_model(tmp_path):
    import lzma

    out = tmp_path / "out"
    assert main(["export", "mlp", "-o", str(out), "--passes",
                 "fold-constants,sparsify:0.9,fold-sparse", "--pack", "--allow-mismatch",
                 "--quiet"]) == 0
    manifest = __import__("json").loads((out / "manifest.json").read_text())
    facts = manifest["pack"]
    model_bytes = (out / "model.onnx").read_bytes()
    packed = (out / "model.onnx.xz").read_bytes()
    assert lzma.decompress(packed) == model_bytes
    assert facts["model_onnx_bytes"] == len(model_bytes) and facts["packed_bytes"] == len(packed)
    assert facts["dense_fp32_weight_bytes"] == manifest["model"]["before"]["weight_bytes"]
    assert facts["stored_weight_bytes"] + facts["graph_overhead_bytes"] == len(model_bytes)
    assert facts["weight_compression"] == round(
        facts["dense_fp32_weight_bytes"] / facts["packed_weight_bytes"], 2)
    assert facts["weight_compression"] > 10
    assert "model.onnx.xz" in manifest["files"] and "Packed" in (out / "report.md").read_text()
    session = ort.InferenceSession(lzma.decompress(packed), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "features"
    plain = tmp_path / "plain"
    slimgraph.export("mlp", plain, passes="fold-constants")
    assert not (plain / "model.onnx.xz").exists()


def test_fold_sparse_picks_the_form_that_codes_smaller():
    """At 12.5% density the bitmask is smaller raw, but its gaps code to fewer bytes under xz."""
    import lzma

    from slimgraph.passes.sparse import FoldSparsePass
    from slimgraph.passes.sparse.fold import relative_gaps

    rng = np.random.default_rng(5)
    array = np.zeros(8192, np.uint8)
    keep = rng.random(array.size) < 0.125
    array[keep] = rng.integers(1, 16, int(keep.sum()))
    gaps, _ = relative_gaps(np.flatnonzero(keep))
    bits = np.packbits(keep, bitorder="little")
    assert bits.size < gaps.size  # raw, the bitmask would win
    xz = [len(lzma.compress(a.tobytes(), preset=9 | lzma.PRESET_EXTREME)) for a in (bits, gaps)]
    assert xz[1] < xz[0]
    p = FoldSparsePass(channels=False)
    p(_constant_graph(array))
    assert p.report.counts.get("tensors_relative") == 1
