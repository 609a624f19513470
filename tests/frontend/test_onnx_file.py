"""load_onnx refuses every unsafe or broken file with one message; save_onnx is deterministic."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimgraph.artifact import sha256_file as file_sha256
from slimgraph.errors import ModelLoadError
from slimgraph.frontend import onnx_file
from slimgraph.frontend.onnx_file import load_onnx, save_onnx

X = np.linspace(-1.0, 1.0, 6, dtype=np.float32).reshape(2, 3)


def _model() -> onnx.ModelProto:
    """y = relu(x @ W + b): two initializers, enough to exercise external data."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4) - 5.0, "W")
    b = numpy_helper.from_array(np.array([0.5, -1.0, 2.0, 0.0], dtype=np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"], name="matmul"),
        helper.make_node("Add", ["xw", "b"], ["xwb"], name="add"),
        helper.make_node("Relu", ["xwb"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _run(model: onnx.ModelProto | str | Path) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": X})[0]


def _run_ir(model: ir.Model) -> np.ndarray:
    ir.external_data.load_to_model(model)
    return _run(ir.to_proto(model))


def _save_external(folder: Path, location: str = "weights.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(
        _model(),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return path


def _set_external(path: Path, tensor_name: str, **entries: str) -> None:
    """Rewrite external_data entries of one initializer in the saved .onnx file."""
    proto = onnx.load(path, load_external_data=False)
    (tensor,) = [t for t in proto.graph.initializer if t.name == tensor_name]
    current = {e.key: e.value for e in tensor.external_data}
    current.update(entries)
    del tensor.external_data[:]
    for key, value in current.items():
        tensor.external_data.add(key=key, value=value)
    path.write_bytes(proto.SerializeToString())


def _load_error(path: Path) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_onnx(path)
    message = str(info.value)
    assert str(path.absolute()) in message
    return message


# --- good files ---------------------------------------------------------------------------


def test_inline_model_loads_and_matches(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save_model(_model(), path)
    model = load_onnx(path)
    assert [v.name for v in model.graph.inputs] == ["x"]
    np.testing.assert_array_equal(_run_ir(model), _run(_model()))


def test_external_data_model_loads_and_matches(tmp_path: Path) -> None:
    path = _save_external(tmp_path / "m")
    model = load_onnx(path)
    assert isinstance(model.graph.initializers["W"].const_value, ir.ExternalTensor)
    np.testing.assert_array_equal(_run_ir(model), _run(_model()))


def test_symlink_inside_folder_is_accepted(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    path = _save_external(folder, location="real.bin")
    (folder / "weights.bin").symlink_to("real.bin")
    for name in ("W", "b"):
        _set_external(path, name, location="weights.bin")
    np.testing.assert_array_equal(_run_ir(load_onnx(path)), _run(_model()))


# --- not an ONNX file ---------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    assert "no such file" in _load_error(tmp_path / "absent.onnx")


def test_directory(tmp_path: Path) -> None:
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    assert "is a directory" in _load_error(folder)


def test_fifo_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    os.mkfifo(path)
    assert "not a regular file" in _load_error(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"")
    assert "is empty" in _load_error(path)


@pytest.mark.parametrize(
    "content",
    [
        b"ir_version: 8\nthis is a text file, not a protobuf\n",
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06\x00\x00\x00",
        b"hello",
    ],
    ids=["text", "png", "short-text"],
)
def test_not_onnx(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    assert "not an ONNX model" in _load_error(path)


def test_truncated_protobuf(tmp_path: Path) -> None:
    data = _model().SerializeToString()
    path = tmp_path / "model.onnx"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in _load_error(path)


# --- torch checkpoints --------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin"])
def test_checkpoint_by_extension(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(_model().SerializeToString())
    message = _load_error(path)
    assert "never unpickles" in message
    assert "package.module:callable" in message
    assert "weights_only=True" in message


def test_checkpoint_by_content_zip(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    message = _load_error(path)
    assert "zip archive" in message
    assert "never unpickles" in message


def test_checkpoint_by_content_pickle(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}, protocol=4))
    message = _load_error(path)
    assert "pickle" in message
    assert "never unpickles" in message


# --- checker failures ---------------------------------------------------------------------


def test_unknown_op_names_node(tmp_path: Path) -> None:
    model = _model()
    model.graph.node[2].op_type = "NoSuchOp"
    path = tmp_path / "model.onnx"
    onnx.save_model(model, path)
    message = _load_error(path)
    assert "ONNX checker" in message
    assert "'relu'" in message
    assert "NoSuchOp" in message


def test_type_mismatch_names_node(tmp_path: Path) -> None:
    model = _model()
    model.graph.initializer[1].CopyFrom(
        numpy_helper.from_array(np.array([1, 2, 3, 4], dtype=np.int64), "b")
    )
    path = tmp_path / "model.onnx"
    onnx.save_model(model, path)
    message = _load_error(path)
    assert "ONNX checker" in message
    assert "'add'" in message


# --- external data ------------------------------------------------------------------------


def test_external_absolute_location(tmp_path: Path) -> None:
    path = _save_external(tmp_path / "m")
    _set_external(path, "W", location=str(tmp_path / "m" / "weights.bin"))
    message = _load_error(path)
    assert "tensor 'W'" in message
    assert "absolute" in message


@pytest.mark.parametrize("location", ["../weights.bin", "sub/../../weights.bin", "..\\w.bin"])
def test_external_dotdot_location(tmp_path: Path, location: str) -> None:
    path = _save_external(tmp_path / "m")
    _set_external(path, "W", location=location)
    message = _load_error(path)
    assert "tensor 'W'" in message
    assert "leaves the model's folder" in message


def test_external_symlink_outside_folder(tmp_path: Path) -> None:
    outside = tmp_path / "secret.bin"
    outside.write_bytes(np.zeros(12, dtype=np.float32).tobytes())
    folder = tmp_path / "m"
    path = _save_external(folder)
    (folder / "link.bin").symlink_to(outside)
    _set_external(path, "W", location="link.bin", offset="0", length="48")
    message = _load_error(path)
    assert "tensor 'W'" in message
    assert "symlink" in message
    assert str(outside) in message


def test_external_symlinked_subfolder_outside(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "w.bin").write_bytes(bytes(48))
    folder = tmp_path / "m"
    path = _save_external(folder)
    (folder / "sub").symlink_to(elsewhere)
    _set_external(path, "W", location="sub/w.bin", offset="0", length="48")
    assert "symlink" in _load_error(path)


def test_external_hard_link_refused(tmp_path: Path) -> None:
    outside = tmp_path / "secret.bin"
    outside.write_bytes(bytes(48))
    folder = tmp_path / "m"
    path = _save_external(folder)
    os.link(outside, folder / "hard.bin")
    _set_external(path, "W", location="hard.bin", offset="0", length="48")
    message = _load_error(path)
    assert "tensor 'W'" in message
    assert "hard link" in message
    assert "outside the model's folder" in message


def test_external_missing_file(tmp_path: Path) -> None:
    path = _save_external(tmp_path / "m")
    (tmp_path / "m" / "weights.bin").unlink()
    message = _load_error(path)
    assert "weights.bin" in message
    assert "does not exist" in message


def test_external_length_beyond_file(tmp_path: Path) -> None:
    path = _save_external(tmp_path / "m")
    data = tmp_path / "m" / "weights.bin"
    data.write_bytes(data.read_bytes()[:40])
    message = _load_error(path)
    assert "runs past the end" in message
    assert "weights.bin" in message


def test_external_offset_beyond_file(tmp_path: Path) -> None:
    path = _save_external(tmp_path / "m")
    _set_external(path, "b", offset="1000000")
    message = _load_error(path)
    assert "tensor 'b'" in message
    assert "offset 1000000" in message


def test_external_length_disagrees_with_shape(tmp_path: Path) -> None:
    path = _save_external(tmp_path / "m")
    _set_external(path, "W", length="8")
    message = _load_error(path)
    assert "tensor 'W'" in message
    assert "48 bytes" in message


# --- save_onnx ----------------------------------------------------------------------------


def test_save_is_byte_identical_and_loads_back(tmp_path: Path) -> None:
    model = ir.from_proto(_model())
    (first,) = save_onnx(model, tmp_path / "a.onnx")
    (second,) = save_onnx(model, tmp_path / "b.onnx")
    assert first.read_bytes() == second.read_bytes()
    assert file_sha256(first) == file_sha256(second)
    reloaded = load_onnx(first)
    (third,) = save_onnx(reloaded, tmp_path / "c.onnx")
    assert third.read_bytes() == first.read_bytes()
    np.testing.assert_array_equal(_run(first), _run(_model()))


def test_save_inlines_weights_of_a_model_loaded_with_external_data(tmp_path: Path) -> None:
    model = load_onnx(_save_external(tmp_path / "src"))
    out = tmp_path / "out"
    out.mkdir()
    assert save_onnx(model, out / "model.onnx") == [out / "model.onnx"]
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]
    np.testing.assert_array_equal(_run(out / "model.onnx"), _run(_model()))
    assert isinstance(model.graph.initializers["W"].const_value, ir.ExternalTensor)


def test_save_above_threshold_uses_external_data(tmp_path: Path) -> None:
    model = ir.from_proto(_model())
    (tmp_path / "a").mkdir()
    written = save_onnx(model, tmp_path / "a" / "model.onnx", external_data_threshold=16)
    assert written == [tmp_path / "a" / "model.onnx", tmp_path / "a" / "model.onnx.data"]
    (tmp_path / "b").mkdir()
    again = save_onnx(model, tmp_path / "b" / "model.onnx", external_data_threshold=16)
    for one, two in zip(written, again, strict=True):
        assert one.read_bytes() == two.read_bytes()
    reloaded = load_onnx(written[0])
    assert isinstance(reloaded.graph.initializers["W"].const_value, ir.ExternalTensor)
    np.testing.assert_array_equal(_run(written[0]), _run(_model()))
    np.testing.assert_array_equal(_run_ir(reloaded), _run(_model()))


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_past_in_memory_limit_checks_from_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Models over 2 GB go to the checker by path; a tiny limit exercises that branch."""
    monkeypatch.setattr(onnx_file, "_IN_MEMORY_CHECK_BYTES", 16)
    good = _save_external(tmp_path / "good")
    np.testing.assert_array_equal(_run_ir(load_onnx(good)), _run(_model()))
    bad = _model()
    bad.graph.node[0].op_type = "NoSuchOp"
    (tmp_path / "bad").mkdir()
    path = tmp_path / "bad" / "model.onnx"
    onnx.save_model(bad, path, save_as_external_data=True, location="w.bin", size_threshold=0)
    message = _load_error(path)
    assert "'matmul'" in message
    assert "NoSuchOp" in message


def test_external_symlink_loop(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    path = _save_external(folder)
    (folder / "loop.bin").symlink_to("loop.bin")
    _set_external(path, "W", location="loop.bin")
    assert "tensor 'W'" in _load_error(path)
