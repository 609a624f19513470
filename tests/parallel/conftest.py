"""Fixtures shared by the run tests."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import slimgraph
from slimgraph.frontend.builtin import get_builtin


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """The mlp exported, its 360 test images as IN.npz, and one session's outputs on them."""
    root = tmp_path_factory.mktemp("run")
    slimgraph.export("mlp", root / "art", passes="fold-constants")
    x = np.concatenate([f["features"] for f in get_builtin("mlp").evaluation().feeds])
    np.savez(root / "in.npz", features=x)
    model = ir.load(root / "art" / "model.onnx")
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return root, session.run(None, {"features": x})[0]
