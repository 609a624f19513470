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
