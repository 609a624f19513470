"""Shared fixtures: tiny models built here, so no test depends on a download."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def make_tiny_cnn(seed: int = 0) -> onnx.ModelProto:
    """Conv(3->8, 3x3, pad 1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(8->10).

    A constant Add feeds the Gemm bias and an Identity sits before Flatten, so constant folding
    and identity removal have work to do. Batch is symbolic.
    """
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "conv_b"),
        numpy_helper.from_array(rng.standard_normal((10, 8)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fc_b0"),
        numpy_helper.from_array(np.full(10, 0.5, np.float32), "fc_b1"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1],
                         name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Identity", ["p"], ["p_id"], name="identity"),
        helper.make_node("Flatten", ["p_id"], ["f"], name="flatten"),
        helper.make_node("Add", ["fc_b0", "fc_b1"], ["fc_b"], name="bias_add"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def tiny_cnn_path(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "tiny_cnn.onnx"
    path.parent.mkdir()
    onnx.save_model(make_tiny_cnn(), path)
    return path


TORCH_MODULE_SOURCE = textwrap.dedent(
    """
    import torch


    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10),
        ).eval()


    def build_with_inputs():
        return build(), (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)),)


    def not_a_module():
        return 42
    """
)


@pytest.fixture
def torch_models_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user package on the path (the current directory), as `package.module:callable` sees it."""
    name = f"user_models_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(TORCH_MODULE_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):  # the run tests (tests/parallel)
    """The mlp exported, its 360 test images as IN.npz, and one session's outputs on them."""
    import onnx_ir as ir
    import onnxruntime as ort

    import slimgraph
    from slimgraph.frontend.builtin import get_builtin

    root = tmp_path_factory.mktemp("run")
    slimgraph.export("mlp", root / "art", passes="fold-constants")
    x = np.concatenate([f["features"] for f in get_builtin("mlp").evaluation().feeds])
    np.savez(root / "in.npz", features=x)
    model = ir.load(root / "art" / "model.onnx")
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return root, session.run(None, {"features": x})[0]
