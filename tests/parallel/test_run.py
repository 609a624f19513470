"""run: local batches in input order, Ray replicas and a Ray pipeline equal to one onnxruntime
session over the whole set, an actor killed mid-run losing and duplicating nothing, and bad input
(data that does not match the inputs, an unreachable Ray address) refused with exit 2."""

from __future__ import annotations

import numpy as np
import pytest

from slimgraph.cli import main
from slimgraph.parallel.run import placeable_share


def test_local_run_keeps_input_order(mlp, tmp_path):
    root, want = mlp
    out = tmp_path / "out.npz"
    assert main(["run", str(root / "art"), "--data", str(root / "in.npz"), "-o", str(out),
                 "--batch", "7", "--quiet"]) == 0  # 360 = 51 x 7 + 3: a short last batch
    with np.load(out) as got:
        assert list(got.files) == ["logits"]
        np.testing.assert_allclose(got["logits"], want, rtol=1e-6, atol=1e-6)
    assert main(["run", str(root / "art"), "--data", str(root / "in.npz"), "-o", str(out),
                 "--quiet"]) == 2  # exists, no --force


@pytest.mark.parametrize("arrays,message", [
    ({"image": np.zeros((4, 64), np.float32)}, "do not match the model's inputs"),
    ({"features": np.zeros((4, 64), np.float32), "extra": np.zeros(4)}, "not inputs ['extra']"),
    ({"features": np.zeros((4, 63), np.float32)}, "has shape [4, 63]"),
    ({"features": np.zeros((4, 64), np.int64)}, "the model takes float32"),
])
def test_data_that_does_not_match_the_inputs(mlp, tmp_path, capsys, arrays, message):
    root, _ = mlp
    data, out = tmp_path / "bad.npz", tmp_path / "out.npz"
    np.savez(data, **arrays)
    assert main(["run", str(root / "art"), "--data", str(data), "-o", str(out), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unreachable_ray_address(mlp, tmp_path, capsys):
    pytest.importorskip("ray")
    root, _ = mlp
    out = tmp_path / "out.npz"
    assert main(["run", str(root / "art"), "--data", str(root / "in.npz"), "-o", str(out),
                 "--ray", "127.0.0.1:9", "--quiet"]) == 2
    assert "cannot reach a Ray cluster at 127.0.0.1:9" in capsys.readouterr().err
    assert not out.exists()



@pytest.mark.parametrize("nodes, actors, share", [
    ([2.0], 2, 1.0), ([2.0], 3, 2 / 3), ([3.0], 2, 1.5), ([8.0, 8.0], 2, 8.0),
    # the cluster's CPUs / actors would be 3 and 2.5, which no node holds: never placed
    ([2.0, 2.0, 2.0], 2, 2.0), ([4.0, 1.0], 2, 2.0),
    ([4.0, 1.0], 3, 4 / 3), ([1.0, 1.0], 4, 0.5)])
def test_each_actor_asks_for_cpus_that_some_node_can_give(nodes, actors, share):
    assert placeable_share(nodes, actors) == pytest.approx(share)

@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_replicas_and_a_killed_actor_lose_and_duplicate_nothing(mlp, ray_local):
    from slimgraph.parallel.run import run

    root, want = mlp
    got = run(root / "art", root / "in.npz", workers=2, batch=8)
    assert got.mode == "ray replicas" and got.actors == 2
    np.testing.assert_allclose(got.outputs["logits"], want, rtol=1e-6, atol=1e-6)

    killed = []

    def kill_one(done, actors):
        if done == 5 and not killed:
            killed.append(ray_local.get(actors[0].pid.remote()))
            ray_local.kill(actors[0], no_restart=False)  # Ray restarts it and retries its calls

    got = run(root / "art", root / "in.npz", workers=2, batch=8, on_result=kill_one)
    assert killed
    assert got.outputs["logits"].shape == want.shape  # 45 batches, each exactly once, in order
    np.testing.assert_allclose(got.outputs["logits"], want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_a_partitioned_artifact_runs_as_a_ray_pipeline(mlp, ray_local, tmp_path):
    from slimgraph.parallel import partition
    from slimgraph.parallel.run import run

    root, want = mlp
    partition(root / "art", tmp_path / "p", stages=3, batch=8)
    got = run(tmp_path / "p", root / "in.npz", batch=8)
    assert got.mode == "ray pipeline" and got.actors == 3
    np.testing.assert_allclose(got.outputs["logits"], want, rtol=1e-5, atol=1e-5)
    local = run(tmp_path / "p", root / "in.npz", batch=8, local=True)
    assert local.mode == "local pipeline"
    np.testing.assert_array_equal(local.outputs["logits"], got.outputs["logits"])
