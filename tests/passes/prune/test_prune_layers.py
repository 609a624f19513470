"""prune-layers: blocks found on the built-ins, removal checked against the torch module with the
same blocks replaced by the identity, importance, options and `inspect --blocks`."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import slimgraph
from slimgraph.calibration import Calibration
from slimgraph.cli import main
from slimgraph.errors import PipelineSpecError
from slimgraph.frontend.builtin import get_builtin
from slimgraph.passes import Pipeline, PruneLayersPass
from slimgraph.passes.prune.layers import find_units


def _run(model: ir.Model, feed: dict[str, np.ndarray]) -> np.ndarray:
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feed.items() if k in names})[0]


def _folded(name: str) -> ir.Model:
    model, _ = Pipeline.parse("fold-constants").run(slimgraph.load(name).model)
    return model


def _notes(p: PruneLayersPass) -> dict[str, str]:
    return {line.split(" (", 1)[0]: line.rsplit(": ", 1)[1] for line in p.report.notes}


def test_resnet_tiny_blocks_removed_match_torch_without_them():
    model = _folded("resnet-tiny")
    units = find_units(model)
    assert [u.name for u in units] == [f"blocks.{i}" for i in range(6)]
    assert [u.removable for u in units] == [True, True, False, True, False, True]
    assert "projection" in units[2].reason
    p = PruneLayersPass(drop=["blocks.1", "blocks.3"])
    out = p(model).model
    assert p.report.counts["units_removed"] == 2
    assert sum(n.op_type == "Conv" for n in out.graph) == 1 + 6 * 2 + 2 - 2 * 2
    # The reference is independent of the pass: the torch module with those blocks replaced by
    # the identity, run by torch.
    builtin = get_builtin("resnet-tiny")
    module = copy.deepcopy(builtin.module)
    module.blocks[1] = torch.nn.Identity()
    module.blocks[3] = torch.nn.Identity()
    images = np.random.default_rng(5).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(images)).numpy()
        full = builtin.module(torch.from_numpy(images)).numpy()
    got = _run(out, {"image": images})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, full, atol=1e-2)  # the blocks did something


def test_minilm_layers_removed_match_the_transformer_without_them():
    model = _folded("minilm")
    units = find_units(model)
    assert [u.name for u in units] == [f"encoder.encoder.layer.{i}" for i in range(6)]
    assert all(u.kind == "transformer layer" and len(u.blocks) == 2 for u in units)
    p = PruneLayersPass(keep=3, importance="uniform")
    out = p(model).model
    kept = [name for name, state in _notes(p).items() if state == "kept"]
    assert kept == ["encoder.encoder.layer.0", "encoder.encoder.layer.2",
                    "encoder.encoder.layer.5"]
    assert sum(n.op_type == "Softmax" for n in out.graph) == 3
    builtin = get_builtin("minilm")
    module = copy.deepcopy(builtin.module)
    layers = module.encoder.encoder.layer
    module.encoder.encoder.layer = torch.nn.ModuleList([layers[0], layers[2], layers[5]])
    feed = builtin.evaluation().feeds[0]
    with torch.no_grad():
        want = module(*(torch.from_numpy(feed[k]) for k in builtin.input_names)).numpy()
    np.testing.assert_allclose(_run(out, feed), want, rtol=1e-4, atol=1e-4)


def _residual_mlp(scales: tuple[float, ...]) -> ir.Model:
    """x -> [x + W2 relu(W1 x)] per scale -> y: each branch's weights times its scale."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i, scale in enumerate(scales):
        for k in (1, 2):
            w = (rng.standard_normal((8, 8)) * scale).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"b{i}.w{k}"))
        nodes += [helper.make_node("MatMul", [x, f"b{i}.w1"], [f"h{i}"], name=f"b{i}/mm1"),
                  helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"b{i}/relu"),
                  helper.make_node("MatMul", [f"r{i}", f"b{i}.w2"], [f"f{i}"], name=f"b{i}/mm2"),
                  helper.make_node("Add", [x, f"f{i}"], [f"s{i}"], name=f"b{i}/add")]
        x = f"s{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def _calibration(n: int = 32) -> Calibration:
    x = np.random.default_rng(1).standard_normal((n, 8)).astype(np.float32)
    return Calibration({"x": x[i : i + 1]} for i in range(n))


def test_output_importance_keeps_the_block_that_moves_the_outputs():
    model = _residual_mlp((0.01, 1.0, 0.02))
    units = find_units(model)
    assert [u.name for u in units] == ["b0", "b1", "b2"]  # weight-name prefixes, no scopes
    w1, w2 = (model.graph.initializers[k].const_value.numpy() for k in ("b1.w1", "b1.w2"))
    p = PruneLayersPass(keep=1)
    p.calibration = _calibration()
    out = p(model).model
    assert [n.name for n in out.graph if n.op_type == "MatMul"] == ["b1/mm1", "b1/mm2"]
    scores = {u.name: u.score for u in p.units}
    assert scores["b1"] > 10 * max(scores["b0"], scores["b2"])
    x = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    want = x + np.maximum(x @ w1, 0) @ w2
    np.testing.assert_allclose(_run(out, {"x": x}), want, rtol=1e-5, atol=1e-5)


def test_removing_the_block_that_feeds_the_graph_output_keeps_its_name():
    model = _residual_mlp((1.0, 1.0))
    model.graph.outputs[0] = model.graph.node("b1/add").outputs[0]  # y is the last sum itself
    model.graph.remove(model.graph.node("out"), safe=True)
    x = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
    out = PruneLayersPass(drop=["b1"])(model).model
    assert [v.name for v in out.graph.outputs] == ["s1"]
    full = _residual_mlp((1.0,))
    np.testing.assert_allclose(_run(out, {"x": x}), _run(full, {"x": x}), rtol=1e-6)


def test_ratio_and_no_blocks():
    p = PruneLayersPass(ratio=0.5, importance="uniform")
    p(_residual_mlp((1.0, 1.0, 1.0, 1.0)))
    assert p.report.counts["units_removed"] == 2
    digits = PruneLayersPass(keep=0, importance="uniform")
    assert not digits(_folded("digits-cnn")).modified
    assert digits.report.counts["units"] == 0


@pytest.mark.parametrize("spec,message", [
    ("prune-layers", "exactly one of"),
    ("prune-layers:keep=2,ratio=0.5", "exactly one of"),
    ("prune-layers:ratio=1.5", "ratio must be in"),
    ("prune-layers:keep=-1", "keep must be"),
    ("prune-layers:keep=2,importance=l2", "importance must be one of"),
])
def test_bad_options(spec, message):
    with pytest.raises(PipelineSpecError, match=message):
        Pipeline.parse(spec)


def test_unknown_drop_name_lists_the_removable_units():
    with pytest.raises(PipelineSpecError, match="removable units: b0, b1"):
        PruneLayersPass(drop=["b7"])(_residual_mlp((1.0, 1.0)))


def test_output_importance_without_calibration_is_a_clear_error():
    with pytest.raises(PipelineSpecError, match="calibration"):
        Pipeline.parse("prune-layers:keep=1").bind_calibration(None)
    p = PruneLayersPass(keep=1)
    with pytest.raises(PipelineSpecError, match="importance=uniform"):
        p(_residual_mlp((1.0, 1.0)))


def test_spec_round_trip():
    p = Pipeline.parse("prune-layers:drop=b0+b2")
    assert p.spec() == "prune-layers:drop=b0+b2"
    assert Pipeline.parse("prune-layers:keep=3,importance=uniform").spec() == \
        "prune-layers:keep=3,importance=uniform"


def test_inspect_blocks_json(capsys):
    assert main(["inspect", "resnet-tiny", "--blocks", "--json"]) == 0
    blocks = json.loads(capsys.readouterr().out)["blocks"]
    assert [b["removable"] for b in blocks] == [True, True, False, True, False, True]
    assert blocks[0]["macs"] > 0


def test_export_composes_with_heal_channels_and_int8(tmp_path):
    spec = ("fold-constants,prune-layers:keep=2,heal:steps=5,prune-channels:ratio=0.25,"
            "heal:steps=5,quantize:int8")
    result = slimgraph.export("resnet-tiny", tmp_path / "out", passes=spec, backends=["ort-cpu"],
                              allow_mismatch=True)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    reports = {r["name"]: r for r in manifest["passes"]}
    assert reports["prune-layers"]["counts"]["units_removed"] == 2
    assert result.manifest["passes"] == manifest["passes"]
