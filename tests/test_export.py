"""export() end to end: artifact layout, hashes, verification, determinism, atomicity."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import slimgraph
from slimgraph.artifact import sha256_file
from slimgraph.errors import OutputExistsError, VerificationError
from slimgraph.passes import PASSES
from slimgraph.passes.base import SlimgraphPass


def _files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_onnx_file_export_layout_and_hashes(tiny_cnn_path, tmp_path):
    out = tmp_path / "out"
    result = slimgraph.export(tiny_cnn_path, out, passes="fold-constants")
    assert result.passed
    files = _files(out)
    assert set(files) == {"manifest.json", "model.onnx", "report.md", "ort-cpu/session.json"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == {k: v for k, v in files.items() if k != "manifest.json"}
    assert manifest["source"] == {"kind": "onnx", "name": str(tiny_cnn_path),
                                  "sha256": sha256_file(tiny_cnn_path)}
    assert manifest["inputs"] == [{"name": "image", "dtype": "FLOAT", "shape": ["N", 3, 16, 16]}]
    assert [p["name"] for p in manifest["passes"]] == ["fold-constants"]
    ver = manifest["backends"]["ort-cpu"]["verification"]
    assert ver["passed"] and ver["outputs"][0]["name"] == "logits"
    assert ver["outputs"][0]["max_rel_err"] <= 1e-4
    for key in ("onnx", "onnxruntime", "onnx-ir", "numpy", "python"):
        assert key in manifest["versions"]
    assert "## Verification" in (out / "report.md").read_text()


def test_exported_model_matches_source_under_onnxruntime(tiny_cnn_path, tmp_path):
    slimgraph.export(tiny_cnn_path, tmp_path / "out", passes="fold-constants")
    x = np.random.default_rng(5).standard_normal((3, 3, 16, 16)).astype(np.float32)
    want = ort.InferenceSession(str(tiny_cnn_path)).run(None, {"image": x})[0]
    got = ort.InferenceSession(str(tmp_path / "out" / "model.onnx")).run(None, {"image": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_torch_callable_export_verifies_against_the_module(torch_models_module, tmp_path):
    result = slimgraph.export(f"{torch_models_module}:build_with_inputs", tmp_path / "out")
    (ver,) = result.verifications
    assert ver.passed and ver.samples == 8  # the example batch + 3 seeded batches of 2
    assert result.manifest["source"]["kind"] == "torch"


def test_export_is_byte_identical_across_runs(torch_models_module, tmp_path):
    spec = f"{torch_models_module}:build_with_inputs"
    slimgraph.export(spec, tmp_path / "a", passes="fold-constants")
    slimgraph.export(spec, tmp_path / "b", passes="fold-constants")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_existing_output_is_refused_unless_forced(tiny_cnn_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        slimgraph.export(tiny_cnn_path, out)
    assert (out / "keep.txt").read_text() == "mine"
    slimgraph.export(tiny_cnn_path, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.onnx").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


class _CorruptWeightsPass(SlimgraphPass):
    """Scales every initializer by 1.5 while claiming to be exact: verification must catch it."""

    name = "test-corrupt"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for value in model.graph.initializers.values():
            value.const_value = ir.Tensor(value.const_value.numpy() * 1.5)
        return ir.passes.PassResult(model, True)


def test_mismatch_fails_and_leaves_nothing(tiny_cnn_path, tmp_path, monkeypatch):
    monkeypatch.setitem(PASSES, _CorruptWeightsPass.name, _CorruptWeightsPass)
    out = tmp_path / "out"
    with pytest.raises(VerificationError, match="output 'logits'"):
        slimgraph.export(tiny_cnn_path, out, passes="test-corrupt")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["models"]


def test_allow_mismatch_keeps_the_artifact_and_records_failure(tiny_cnn_path, tmp_path,
                                                               monkeypatch):
    monkeypatch.setitem(PASSES, _CorruptWeightsPass.name, _CorruptWeightsPass)
    result = slimgraph.export(tiny_cnn_path, tmp_path / "out", passes="test-corrupt",
                              allow_mismatch=True)
    assert not result.passed
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    ver = manifest["backends"]["ort-cpu"]["verification"]
    assert ver["passed"] is False and "output 'logits'" in ver["failures"][0]


def test_killed_export_leaves_no_output(tiny_cnn_path, tmp_path):
    """A process killed while the artifact is being written leaves no `out` directory."""
    script = textwrap.dedent(
        f"""
        import os, signal
        import slimgraph
        from slimgraph.backends import BACKENDS
        from slimgraph.backends.ort import ORT_CPU

        class Dying:
            name = "dying"
            description = "writes a file, then the process is killed"
            def available(self): return True
            def unavailable_reason(self): return None
            def options(self, given): return given
            def build(self, model, root, options, feeds=None):
                (root / "partial.bin").write_bytes(b"x" * 1024)
                os.kill(os.getpid(), signal.SIGKILL)

        BACKENDS["dying"] = Dying()
        slimgraph.export({str(tiny_cnn_path)!r}, {str(tmp_path / "out")!r}, backends=["dying"])
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert not (tmp_path / "out").exists()


def test_a_loaded_model_is_reusable(tiny_cnn_path, tmp_path, monkeypatch):
    monkeypatch.setitem(PASSES, _CorruptWeightsPass.name, _CorruptWeightsPass)
    loaded = slimgraph.load(tiny_cnn_path)
    nodes = [n.op_type for n in loaded.model.graph]
    slimgraph.export(loaded, tmp_path / "a", passes="test-corrupt", allow_mismatch=True)
    assert [n.op_type for n in loaded.model.graph] == nodes
    assert slimgraph.export(loaded, tmp_path / "b").passed


class _PerturbConvPass(SlimgraphPass):
    """Adds large noise to the conv weights only: the first tensor to diverge is the conv output."""

    name = "test-perturb-conv"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        value = model.graph.initializers["conv_w"]
        noise = np.random.default_rng(0).standard_normal(value.const_value.shape.numpy())
        value.const_value = ir.Tensor((value.const_value.numpy() + noise).astype(np.float32))
        return ir.passes.PassResult(model, True)


def test_mismatch_names_the_first_diverging_tensor(tiny_cnn_path, tmp_path, monkeypatch):
    monkeypatch.setitem(PASSES, _PerturbConvPass.name, _PerturbConvPass)
    with pytest.raises(VerificationError) as info:
        slimgraph.export(tiny_cnn_path, tmp_path / "out", passes="test-perturb-conv")
    assert "first diverging tensor: c (output of Conv conv)" in str(info.value)


@pytest.mark.parametrize("shapes", [([2], [2]), ([2], [3])])
def test_the_full_check_names_the_pipeline_and_fails_as_verification(shapes):
    """An undeclared input (checker) and incompatible shapes (strict shape inference) are both
    the graph failing the full check, not a traceback."""
    import onnx_ir as ir

    from slimgraph.errors import VerificationError
    from slimgraph.export import _check_graph
    from slimgraph.passes import Pipeline

    a = ir.Value(name="a", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shapes[0]))
    b = ir.Value(name="b", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shapes[1]))
    add = ir.node("Add", [a, b], name="add")
    add.outputs[0].name = "y"
    inputs = [a, b] if shapes[1] == [3] else [a]  # b undeclared: the checker's error
    graph = ir.Graph(inputs, [add.outputs[0]], nodes=[add], opset_imports={"": 20})
    with pytest.raises(VerificationError, match=r"after passes \[fold-constants\] fails the ONNX"):
        _check_graph(ir.Model(graph, ir_version=10), Pipeline.parse("fold-constants"))
