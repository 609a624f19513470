"""partition: the cut search on hand-made costs, the live values at each cut of a graph with a skip
connection, stages that are valid models whose chained outputs equal the whole model's, the weight
cap, and bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimgraph.cli import main
from slimgraph.parallel.cuts import GraphCuts, best_cuts, fewest_stages


def test_best_cuts_minimise_the_slowest_stage():
    cost = np.array([1.0, 1, 1, 1, 4])
    assert best_cuts(cost, np.zeros(6), 2) == [4]  # [1,1,1,1] | [4]: both 4
    three = best_cuts(cost, np.zeros(6), 3)
    assert len(three) == 2 and three[1] == 4 and three[0] in (1, 2, 3)  # the 4 alone, max 4
    # Shipping what crosses a cut costs: the cut moves to where little crosses.
    assert best_cuts(np.ones(4), np.zeros(5), 2) == [2]
    assert best_cuts(np.ones(4), np.array([0, 5, 5, 0, 0.0]), 2) == [3]
    # One stage: no cut. A weight cap that no 2-stage plan meets: None.
    assert best_cuts(cost, np.zeros(6), 1) == []
    weights = np.array([5.0, 5, 5, 5, 5])
    assert best_cuts(cost, np.zeros(6), 2, weights, max_bytes=10) is None
    cuts = best_cuts(cost, np.zeros(6), 3, weights, max_bytes=10)
    bounds = [0, *cuts, 5]
    assert all(weights[a:b].sum() <= 10 for a, b in zip(bounds, bounds[1:], strict=False))


def test_fewest_stages_under_a_cap():
    assert fewest_stages(np.array([3.0, 3, 3]), 6) == 2
    assert fewest_stages(np.array([3.0, 3, 3]), 9) == 1
    assert fewest_stages(np.array([3.0, 3, 3]), 3) == 3
    assert fewest_stages(np.array([3.0, 7, 3]), 6) is None


def _skip_graph() -> ir.Model:
    """x -> A=Relu -> B=Neg -> C=Add(A, B) -> D=Mul(C, w) -> y."""
    w = numpy_helper.from_array(np.full((1, 4), 2.0, np.float32), "w")
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="A"),
             helper.make_node("Neg", ["a"], ["b"], name="B"),
             helper.make_node("Add", ["a", "b"], ["c"], name="C"),
             helper.make_node("Mul", ["c", "w"], ["y"], name="D")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              initializer=[w])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_crossing_values_at_each_cut():
    cuts = GraphCuts(_skip_graph(), {"x": np.ones((1, 4), np.float32)})
    assert cuts.crossing(1) == ["a"]
    assert cuts.crossing(2) == ["a", "b"]  # the skip value and the branch
    assert cuts.crossing(3) == ["c"]
    assert cuts.crossing_bytes().tolist() == [16, 16, 32, 16, 16]  # x is "made" before node 0
    stage = cuts.stage(1, 3, np.ones(4), batch=1)
    assert stage.inputs == ["a"] and stage.outputs == ["c"] and stage.forward == []
    first = cuts.stage(0, 2, np.ones(4), batch=1)
    assert first.outputs == ["a", "b"] and first.weight_bytes == 0
    assert cuts.stage(3, 4, np.ones(4), batch=1).weight_bytes == 16


def _stage_outputs(out, feed):
    """Run the written stages by pipeline.json alone, forwarding values as it says."""
    pipeline = json.loads((out / "pipeline.json").read_text())
    env = dict(feed)
    for s in pipeline["stages"]:
        proto = onnx.load(out / s["file"])
        onnx.checker.check_model(proto, full_check=True)
        session = ort.InferenceSession(proto.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        got = session.run(s["outputs"], {k: env[k] for k in s["inputs"]})
        env = {k: env[k] for k in s["forward"]} | dict(zip(s["outputs"], got, strict=True))
    return pipeline, [env[name] for name in pipeline["outputs"]]


@pytest.mark.slow
def test_partition_resnet_tiny_into_stages_that_chain_to_the_whole(tmp_path):
    import slimgraph

    out = tmp_path / "p"
    assert main(["partition", "resnet-tiny", "--stages", "3", "--batch", "4", "-o", str(out),
                 "--quiet"]) == 0
    loaded = slimgraph.load("resnet-tiny")
    whole = ort.InferenceSession(ir.to_proto(loaded.model).SerializeToString(),
                                 providers=["CPUExecutionProvider"])
    feed = loaded.verification_feeds[0]
    pipeline, got = _stage_outputs(out, feed)
    want = whole.run(None, feed)
    assert len(pipeline["stages"]) == 3
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5)
    bounds = [(s["start"], s["end"]) for s in pipeline["stages"]]
    assert bounds[0][0] == 0 and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    assert all(s["measured_ms"] > 0 for s in pipeline["stages"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["passed"] and manifest["stages"] == 3
    assert {"pipeline.json", "report.md", "stage_times.png", "stages/stage2.onnx"} <= set(
        manifest["files"])


@pytest.mark.slow
def test_max_stage_bytes_gives_stages_that_each_fit(tmp_path):
    import slimgraph

    loaded = slimgraph.load("mlp")
    sizes = [v.const_value.nbytes for v in loaded.model.graph.initializers.values()]
    cap = max(sizes) + 20_000  # the 256x256 layer and a little: below the 340 KB of all weights
    assert cap < sum(sizes)
    out = tmp_path / "p"
    assert main(["partition", "mlp", "--max-stage-bytes", str(cap), "-o", str(out),
                 "--quiet"]) == 0
    pipeline = json.loads((out / "pipeline.json").read_text())
    assert len(pipeline["stages"]) >= 2
    for s in pipeline["stages"]:
        proto = onnx.load(out / s["file"])
        held = sum(numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)
        assert held <= cap and held == s["weight_bytes"]
    _, got = _stage_outputs(out, loaded.verification_feeds[0])
    want = ort.InferenceSession(ir.to_proto(loaded.model).SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(
        None, loaded.verification_feeds[0])
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("args,message", [
    (["--stages", "500"], "more than the"),
    (["--max-stage-bytes", "1000"], "smaller than the initializer"),
    (["--stages", "2", "--balance", "speed"], "must be one of"),
    (["--stages", "0"], "must be >= 1"),
    ([], "give --stages"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "p"
    assert main(["partition", "mlp", "-o", str(out), "--quiet", *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
