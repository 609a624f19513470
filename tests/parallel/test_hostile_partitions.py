"""run and partition on hostile input. One good export and one good partition (of a two-input
model, so a pipeline input is forwarded between stages) are made once; every case copies one,
corrupts it (paths leaving the folder, hashes, garbage or payload files, malformed pipeline.json
and manifest.json, bad data, bad options, unwritable outputs) and checks that the command exits 2
with one line naming the input, writes nothing, and never runs the payload."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimgraph.artifact import file_hashes
from slimgraph.cli import main
from slimgraph.errors import InputSpecError
from slimgraph.parallel.run import MIN_CPU_SHARE, actor_share, placeable_share

S0, S1, S2 = (Path("stages") / f"stage{i}.onnx" for i in range(3))  # the good partition's stages


class _Payload:
    """Unpickling this creates ``marker``: proof that a loader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _small_model(batch: str | int = "N") -> onnx.ModelProto:
    """y = Relu(x @ w1) @ w2 + z: four nodes, two inputs, z needed only by the last."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["m"], name="mm2"),
             helper.make_node("Add", ["m", "z"], ["y"], name="add")]
    graph = helper.make_graph(
        nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4]),
                         helper.make_tensor_value_info("z", TensorProto.FLOAT, [batch, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    import slimgraph
    from slimgraph.parallel import partition

    root = tmp_path_factory.mktemp("hostile")
    onnx.save(_small_model(), root / "small.onnx")
    slimgraph.export(root / "small.onnx", root / "art", passes="fold-constants")
    partition(root / "art", root / "part", stages=3, batch=4)
    rng = np.random.default_rng(1)
    np.savez(root / "in.npz", x=rng.standard_normal((10, 4)).astype(np.float32),
             z=rng.standard_normal((10, 3)).astype(np.float32))
    return {"art": root / "art", "part": root / "part", "data": root / "in.npz",
            "onnx": root / "small.onnx"}


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name, symlinks=True))


def _rehash(folder: Path) -> None:
    """What an attacker who rewrites the manifest too would do: hashes that match the files."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = file_hashes(folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _state(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` with its content hash or link target."""
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): os.readlink(p) if p.is_symlink()
            else hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _refused(capsys, argv: list[str], out: Path, expect: str, marker: Path | None = None) -> str:
    """``main(argv)`` exits 2 with one line holding ``expect``, and leaves ``out``'s folder as
    it was (nothing written, no temporary sibling) and ``marker`` absent."""
    capsys.readouterr()
    before = _state(out.parent)
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expect in lines[0], lines[0]
    assert _state(out.parent) == before
    assert marker is None or not marker.exists()
    return lines[0]


def _run(capsys, artifact: Path, data: Path, tmp_path: Path, expect: str, *extra: str,
         marker: Path | None = None) -> str:
    out = tmp_path / "out" / "result.npz"
    out.parent.mkdir(exist_ok=True)
    return _refused(capsys, ["run", str(artifact), "--data", str(data), "-o", str(out), "--local",
                             *extra], out, expect, marker)


def _pipeline(folder: Path, edit: Callable[[dict], object]) -> None:
    pipeline = json.loads((folder / "pipeline.json").read_text())
    edit(pipeline)
    (folder / "pipeline.json").write_text(json.dumps(pipeline))
    _rehash(folder)


def _replace(path: Path, data: bytes | Callable[[bytes], bytes], rehash: bool = True) -> None:
    path.write_bytes(data(path.read_bytes()) if callable(data) else data)
    if rehash:
        _rehash(path.parent.parent if path.parent.name == "stages" else path.parent)


def _link(path: Path, target: Path) -> None:
    """Move ``path`` out of its folder to ``target`` and leave a symlink to it in its place."""
    shutil.move(path, target)
    path.symlink_to(target)


def _fails_at_run_time(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with y reshaped to [5, 7] at the end: still valid, with the same inputs and
    outputs, and failing when it runs."""
    for node in model.graph.node:
        node.output[:] = ["y_pre" if o == "y" else o for o in node.output]
    model.graph.initializer.append(numpy_helper.from_array(np.array([5, 7], np.int64), "shape"))
    model.graph.node.append(helper.make_node("Reshape", ["y_pre", "shape"], ["y"]))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"]))
    return model


def _unknown_op(folder: Path) -> None:
    """Every stage's ops renamed to ones no domain has (which stage holds what varies)."""
    for path in (folder / "stages").iterdir():
        path.write_bytes(path.read_bytes().replace(b"MatMul", b"MatMu1").replace(b"Relu", b"Rel0")
                         .replace(b"Add", b"Ad0"))
    _rehash(folder)


def _external_data_stage(folder: Path) -> None:
    """Stage 0's weights moved to weights.bin beside it, inside the folder and hashed."""
    onnx.save(onnx.load(folder / S0), folder / S0, save_as_external_data=True,
              location="weights.bin", size_threshold=0)
    _rehash(folder)


def _zip_bytes(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name, data)
    return buf.getvalue()


def _set(path: tuple, value) -> Callable[[dict], None]:
    def edit(pipeline: dict) -> None:
        target = pipeline
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


# (corrupt(folder, tmp_path, marker), what the one line must say)
PARTITION_CASES = {
    # stage paths that leave the folder
    "absolute path": (lambda d, t, m: (shutil.copy(d / S0, t / "outside.onnx"), _pipeline(
        d, _set(("stages", 0, "file"), str(t / "outside.onnx")))), "is not a relative path inside"),
    "dot-dot": (lambda d, t, m: (shutil.copy(d / S0, t / "outside.onnx"), _pipeline(
        d, _set(("stages", 0, "file"), "../outside.onnx"))), "is not a relative path inside"),
    "dot-dot inside": (lambda d, t, m: _pipeline(
        d, _set(("stages", 0, "file"), "stages/../stages/stage0.onnx")), "not a relative path"),
    "backslash": (lambda d, t, m: _pipeline(
        d, _set(("stages", 0, "file"), "stages\\stage0.onnx")), "not a relative path"),
    "NUL": (lambda d, t, m: _pipeline(
        d, _set(("stages", 0, "file"), "stages/stage0.onnx\x00")), "not a relative path"),
    "empty path": (lambda d, t, m: _pipeline(d, _set(("stages", 0, "file"), "")),
                   "not a relative path"),
    "markup in a path": (lambda d, t, m: _pipeline(d, _set(("stages", 0, "file"), "/[/][bold]x")),
                         "'/[/][bold]x' is not a relative path"),
    "symlinked stage": (lambda d, t, m: _link(d / S0, t / "outside.onnx"), "outside the folder"),
    "symlinked stages dir": (lambda d, t, m: _link(d / "stages", t / "outside"),
                             "outside the folder"),
    "symlinked pipeline": (lambda d, t, m: _link(d / "pipeline.json", t / "p.json"),
                           "outside the folder"),
    "symlinked manifest": (lambda d, t, m: _link(d / "manifest.json", t / "m.json"),
                           "outside the folder"),
    "symlink loop": (lambda d, t, m: ((d / S0).unlink(), (d / S0).symlink_to(d / S0)),
                     "stage0.onnx: cannot be resolved"),
    "dangling symlink": (lambda d, t, m: ((d / S0).unlink(), (d / S0).symlink_to(t / "gone")),
                         "stage0.onnx: no such file"),
    # hashes
    "no manifest": (lambda d, t, m: (d / "manifest.json").unlink(), "manifest.json: no such file"),
    "stage not listed": (lambda d, t, m: (d / "manifest.json").write_text(json.dumps(
        {"files": {k: v for k, v in file_hashes(d).items() if k != S1.as_posix()}})),
        "stage1.onnx: not listed in"),
    "stage changed": (lambda d, t, m: _replace(d / S1, lambda b: b + b"\0", rehash=False),
                      "stage1.onnx: sha256 does not match"),
    "pipeline changed": (lambda d, t, m: _replace(d / "pipeline.json", lambda b: b + b" ",
                                                  rehash=False),
                         "pipeline.json: sha256 does not match"),
    "manifest not JSON": (lambda d, t, m: (d / "manifest.json").write_text("{files:"),
                          "manifest.json: not valid JSON"),
    "manifest a list": (lambda d, t, m: (d / "manifest.json").write_text("[]"),
                        "manifest.json: expected a JSON object"),
    "manifest files a list": (lambda d, t, m: (d / "manifest.json").write_text(
        '{"files": ["stages/stage0.onnx"]}'), "manifest.json: 'files' must map"),
    "manifest hash a number": (lambda d, t, m: (d / "manifest.json").write_text(json.dumps(
        {"files": {k: 1 for k in file_hashes(d)}})), "manifest.json: 'files' must map"),
    # stage files that are not models (hashes rewritten to match)
    "garbage stage": (lambda d, t, m: _replace(d / S1, os.urandom(300)), "stage1.onnx"),
    "truncated stage": (lambda d, t, m: _replace(d / S1, lambda b: b[: len(b) // 2]),
                        "stage1.onnx"),
    "empty stage": (lambda d, t, m: _replace(d / S1, b""), "stage1.onnx: is empty"),
    "pickle stage": (lambda d, t, m: _replace(d / S1, pickle.dumps(_Payload(m))),
                     "stage1.onnx: is a pickle"),
    "zip stage": (lambda d, t, m: _replace(d / S1, _zip_bytes("data.pkl", pickle.dumps(
        _Payload(m)))), "stage1.onnx: is a zip archive"),
    "stage is a folder": (lambda d, t, m: ((d / S1).unlink(), (d / S1).mkdir()),
                          "stage1.onnx: not a regular file"),
    "stage missing": (lambda d, t, m: (d / S1).unlink(), "stage1.onnx: no such file"),
    "external data": (lambda d, t, m: _external_data_stage(d),
                      "stage0.onnx: tensors ['w1'] are stored in external data"),
    "unknown op": (lambda d, t, m: _unknown_op(d), "stage0.onnx: fails the ONNX checker"),
    # pipeline.json that is not what run reads (hashes rewritten to match)
    "pipeline not JSON": (lambda d, t, m: _replace(d / "pipeline.json", b"{stages: ["),
                          "pipeline.json: not valid JSON"),
    "pipeline not UTF-8": (lambda d, t, m: _replace(d / "pipeline.json", b"\xff\xfe{}"),
                           "pipeline.json: not valid JSON"),
    "pipeline nested": (lambda d, t, m: _replace(d / "pipeline.json", b"[" * 200_000),
                        "pipeline.json: not valid JSON"),
    "pipeline a list": (lambda d, t, m: _replace(d / "pipeline.json", b"[1, 2]"),
                        "pipeline.json: expected a JSON object, got list"),
    "wrong format": (lambda d, t, m: _pipeline(d, _set(("format",), "other/9")), "'format'"),
    "stages a string": (lambda d, t, m: _pipeline(d, _set(("stages",), "stages/stage0.onnx")),
                        "'stages' must be a non-empty list"),
    "no stages": (lambda d, t, m: _pipeline(d, _set(("stages",), [])),
                  "'stages' must be a non-empty list"),
    "stage a string": (lambda d, t, m: _pipeline(d, _set(("stages", 0), "x")),
                       "stages[0] must be an object"),
    "file a number": (lambda d, t, m: _pipeline(d, _set(("stages", 0, "file"), 7)),
                      "stages[0].file must be a string"),
    "inputs a string": (lambda d, t, m: _pipeline(d, _set(("stages", 0, "inputs"), "x")),
                        "stages[0].inputs must be a list"),
    "outputs numbers": (lambda d, t, m: _pipeline(d, _set(("stages", 1, "outputs"), [1, 2])),
                        "stages[1].outputs must be a list"),
    "forward null": (lambda d, t, m: _pipeline(d, _set(("stages", 0, "forward"), None)),
                     "stages[0].forward must be a list"),
    "pipeline inputs floats": (lambda d, t, m: _pipeline(d, _set(("inputs",), [3.5])),
                               "pipeline.json: inputs must be a list"),
    "no pipeline outputs": (lambda d, t, m: _pipeline(d, lambda p: p.pop("outputs")),
                            "pipeline.json: outputs must be a list"),
    # wiring
    "output not made": (lambda d, t, m: _pipeline(d, _set(("stages", 0, "outputs"), ["nope"])),
                        "stages[0].outputs names ['nope']"),
    "input not forwarded": (lambda d, t, m: _pipeline(d, _set(("stages", 0, "forward"), [])),
                            "stages[1] needs ['z']"),
    "stages swapped": (lambda d, t, m: _pipeline(
        d, lambda p: p.update(stages=[p["stages"][1], p["stages"][0], p["stages"][2]])),
        "stages[0] needs"),
    "ghost output": (lambda d, t, m: _pipeline(d, _set(("outputs",), ["ghost"])),
                     "outputs ['ghost'] do not come out of the last stage"),
    # valid, consistent, and still cannot run
    "stage fails at run time": (lambda d, t, m: _replace(
        d / S2, _fails_at_run_time(onnx.load(d / S2)).SerializeToString()),
                                "onnxruntime cannot run it"),
}


@pytest.mark.parametrize("case", list(PARTITION_CASES), ids=list(PARTITION_CASES))
def test_hostile_partition_folder(good, tmp_path, capsys, case):
    corrupt, expect = PARTITION_CASES[case]
    folder, marker = _copy(good["part"], tmp_path), tmp_path / "PWNED"
    corrupt(folder, tmp_path, marker)
    _run(capsys, folder, good["data"], tmp_path, expect, marker=marker)


ARTIFACT_CASES = {
    "model changed": (lambda d, t, m: _replace(d / "model.onnx", lambda b: b + b"\0",
                                               rehash=False), "model.onnx: sha256 does not match"),
    "model symlinked out": (lambda d, t, m: _link(d / "model.onnx", t / "outside.onnx"),
                            "outside the folder"),
    "model not listed": (lambda d, t, m: (d / "manifest.json").write_text('{"files": {}}'),
                         "model.onnx: not listed in"),
    "model missing": (lambda d, t, m: (d / "model.onnx").unlink(), "model.onnx: no such file"),
    "manifest garbage": (lambda d, t, m: (d / "manifest.json").write_bytes(b"\x80\x04garbage"),
                         "manifest.json: not valid JSON"),
    "pickle model": (lambda d, t, m: _replace(d / "model.onnx", pickle.dumps(_Payload(m))),
                     "model.onnx: is a pickle"),
}


@pytest.mark.parametrize("case", list(ARTIFACT_CASES), ids=list(ARTIFACT_CASES))
def test_hostile_export_artifact(good, tmp_path, capsys, case):
    corrupt, expect = ARTIFACT_CASES[case]
    folder, marker = _copy(good["art"], tmp_path), tmp_path / "PWNED"
    corrupt(folder, tmp_path, marker)
    _run(capsys, folder, good["data"], tmp_path, expect, marker=marker)


def _npy_member(header_shape: tuple[int, ...]) -> bytes:
    """An .npy whose header claims ``header_shape`` but holds 16 bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                               "shape": header_shape})
    return buf.getvalue() + bytes(16)


def _add_member(path: Path, name: str, data: bytes) -> None:
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(name, data)


def _good_arrays(n: int = 10) -> dict[str, np.ndarray]:
    return {"x": np.ones((n, 4), np.float32), "z": np.ones((n, 3), np.float32)}


def _savez(**arrays) -> Callable[[Path, Path], None]:
    return lambda p, m: np.savez(p, **arrays)


def _corrupt_member(p: Path, m: Path) -> None:
    np.savez_compressed(p, **{k: np.arange(v.size, dtype=np.float32).reshape(v.shape) * 3.7
                              for k, v in _good_arrays(200).items()})
    data = bytearray(p.read_bytes())
    data[200:260] = bytes(60)
    p.write_bytes(bytes(data))


# (write(path, marker), what the one line must say)
DATA_CASES = {
    "text file": (lambda p, m: p.write_text("x,z\n1,2\n"), "in.npz: not an .npz"),
    "empty file": (lambda p, m: p.write_bytes(b""), "in.npz: not an .npz"),
    "truncated": (lambda p, m: (np.savez(p, **_good_arrays(500)),
                                p.write_bytes(p.read_bytes()[:4000])), "in.npz"),
    "corrupt member": (_corrupt_member, "in.npz: member 'x' is not a plain .npy array"),
    "a folder": (lambda p, m: p.mkdir(), "in.npz: not a readable .npz file (it is a directory)"),
    "missing": (lambda p, m: None, "in.npz: not a readable .npz file (it does not exist)"),
    "single npy": (lambda p, m: p.write_bytes(_npy_member((4,))), "in.npz: not an .npz"),
    "pickled objects": (lambda p, m: np.savez(p, x=np.array([_Payload(m)], dtype=object),
                                              z=np.ones((1, 3), np.float32)),
                        "member 'x' is not a plain .npy array (Object arrays cannot be loaded"),
    "raw pickle": (lambda p, m: p.write_bytes(pickle.dumps(_Payload(m))), "in.npz: not an .npz"),
    "not npy member": (lambda p, m: (np.savez(p, z=np.ones((10, 3), np.float32)), _add_member(
        p, "x.npy", b"plain bytes")), "in.npz: member 'x' is not a .npy array"),
    "huge header": (lambda p, m: p.write_bytes(_zip_bytes("x.npy", _npy_member((10**12, 4)))),
                    "in.npz: array 'x'"),
    "missing input": (_savez(x=np.ones((10, 4), np.float32)), "missing ['z']"),
    "extra array": (_savez(**_good_arrays(), w=np.ones(10)), "not inputs ['w']"),
    "no samples": (_savez(**_good_arrays(0)), "no samples"),
    "sample counts differ": (_savez(x=np.ones((10, 4), np.float32), z=np.ones((9, 3), np.float32)),
                             "same number of samples"),
    "scalar": (_savez(x=np.float32(1), z=np.ones((1, 3), np.float32)), "same number of samples"),
    "ints": (_savez(x=np.ones((10, 4), np.int64), z=np.ones((10, 3), np.float32)),
             "'x' is int64, the model takes float32"),
    "complex": (_savez(x=np.ones((10, 4), np.complex64), z=np.ones((10, 3), np.float32)),
                "the model takes float32"),
    "strings": (_savez(x=np.full((10, 4), "a"), z=np.ones((10, 3), np.float32)),
                "the model takes float32"),
    "wrong width": (_savez(x=np.ones((10, 5), np.float32), z=np.ones((10, 3), np.float32)),
                    "'x' has shape [10, 5]"),
    "wrong rank": (_savez(x=np.ones((10, 4, 1), np.float32), z=np.ones((10, 3), np.float32)),
                   "'x' has shape [10, 4, 1]"),
    "NaN": (_savez(x=np.full((10, 4), np.nan, np.float32), z=np.ones((10, 3), np.float32)),
            "'x' holds 40 NaN or infinite values"),
    "overflows float32": (_savez(x=np.full((10, 4), 1e300), z=np.ones((10, 3), np.float32)),
                          "'x' holds 40 NaN or infinite values"),
}


@pytest.mark.parametrize("case", list(DATA_CASES), ids=list(DATA_CASES))
def test_hostile_data(good, tmp_path, capsys, case):
    write, expect = DATA_CASES[case]
    data, marker = tmp_path / "in.npz", tmp_path / "PWNED"
    write(data, marker)
    _run(capsys, good["art"], data, tmp_path, expect, marker=marker)


@pytest.mark.parametrize("flags,expect", [
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--batch", "-4"], "--batch must be >= 1, got -4"),
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--workers", "-1"], "--workers must be >= 1, got -1"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--threads", "100000"], "--threads 100000 is more than 1024"),
])
def test_bad_run_options(good, tmp_path, capsys, flags, expect):
    _run(capsys, good["art"], good["data"], tmp_path, expect, *flags)


def _fixed_batch(tmp_path: Path) -> Path:
    path = tmp_path / "fixed.onnx"
    onnx.save(_small_model(batch=2), path)
    return path


def _external(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "ext.onnx"
    path.parent.mkdir()
    onnx.save(_small_model(), path, save_as_external_data=True, location="w.bin", size_threshold=0)
    return path


def _garbage(tmp_path: Path) -> Path:
    (tmp_path / "garbage.onnx").write_bytes(os.urandom(64))
    return tmp_path / "garbage.onnx"


@pytest.mark.parametrize("make,expect", [
    (_fixed_batch, "takes batches of exactly 2; pass --batch 2"),
    (_external, "ext.onnx: tensors ['w1', 'w2'] are stored in external data"),
    (_garbage, "garbage.onnx"),
    (lambda t: t / "nothing.onnx", "not an artifact directory"),
    (lambda t: (t / "empty").mkdir() or t / "empty", "not an artifact directory"),
], ids=["fixed batch", "external data", "garbage", "missing", "empty folder"])
def test_hostile_model_file(good, tmp_path, capsys, make, expect):
    _run(capsys, make(tmp_path), good["data"], tmp_path, expect)


def test_the_payloads_would_run_if_unpickled(tmp_path):
    """Guards the marker checks above: each payload does create its marker when loaded unsafely."""
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()
    marker.unlink()
    np.savez(tmp_path / "o.npz", x=np.array([_Payload(marker)], dtype=object))
    with np.load(tmp_path / "o.npz", allow_pickle=True) as npz:
        npz["x"]
    assert marker.exists()


def test_the_good_folders_run(good, tmp_path, capsys):
    """The unmodified copies run, so each refusal above comes from its corruption."""
    outs = []
    for name in ("part", "art"):
        out = tmp_path / f"{name}.npz"
        assert main(["run", str(_copy(good[name], tmp_path)), "--data", str(good["data"]), "-o",
                     str(out), "--local", "--batch", "3", "--quiet"]) == 0
        with np.load(out) as got:
            outs.append(got["y"])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "art.npz", "part", "part.npz"]


def _file_parent(t: Path) -> Path:
    (t / "afile").write_text("x")
    return t / "afile" / "out.npz"


def _dangling(t: Path) -> Path:
    (t / "out.npz").symlink_to(t / "nowhere")
    return t / "out.npz"


def _existing(t: Path) -> Path:
    (t / "out.npz").write_bytes(b"keep")
    return t / "out.npz"


@pytest.mark.parametrize("make,extra,expect", [
    (_file_parent, [], "afile is not a directory"),
    (_dangling, [], "dangling symlink"),
    (_existing, [], "exists; pass --force"),
    (lambda t: (t / "d").mkdir() or t / "d", ["--force"], "exists and is a folder"),
], ids=["parent is a file", "dangling symlink", "exists", "a folder"])
def test_unwritable_run_output(good, tmp_path, capsys, make, extra, expect):
    out = make(tmp_path)
    _refused(capsys, ["run", str(good["part"]), "--data", str(good["data"]), "-o", str(out),
                      "--local", *extra], out, expect)


def test_workers_beyond_the_cluster_are_refused_before_ray_starts(good, tmp_path, capsys):
    ray = pytest.importorskip("ray")
    most = int((os.cpu_count() or 1) / MIN_CPU_SHARE)
    line = _run(capsys, good["art"], good["data"], tmp_path, "--workers 10000:", "--workers",
                "10000")
    assert f"hold at most {most} actors" in line
    assert not ray.is_initialized()


def test_placeable_share_is_bounded():
    assert placeable_share([2.0], 20) == pytest.approx(MIN_CPU_SHARE)
    assert placeable_share([2.0], 21) is None
    assert placeable_share([0.0], 1) is None
    assert placeable_share([64.0] * 100, 10**6) is None  # answered without a million candidates
    assert placeable_share([4.0, 1.0], 3) == pytest.approx(4 / 3)
    with pytest.raises(InputSpecError, match="hold at most 20 actors"):
        actor_share([1.0, 1.0], 21, "--workers 21")


@pytest.mark.slow
def test_a_failing_actor_is_one_line_and_ray_is_shut_down(good, tmp_path, capsys):
    """Ray may log its own lines when it starts (token auth); ours is the one error line."""
    ray = pytest.importorskip("ray")
    model = tmp_path / "fails.onnx"
    onnx.save(_fails_at_run_time(_small_model()), model)
    out = tmp_path / "out" / "out.npz"
    assert main(["run", str(model), "--data", str(good["data"]), "-o", str(out), "--workers", "1",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "run: a Ray actor failed: [ONNXRuntimeError]" in errors[0]
    assert not ray.is_initialized()
    assert not out.parent.exists()


def _changed_model(t: Path, good: dict[str, Path]) -> Path:
    folder = _copy(good["art"], t)
    _replace(folder / "model.onnx", lambda b: b + b"\0", rehash=False)
    return folder


def _builtin_named_by_a_list(t: Path, good: dict[str, Path]) -> Path:
    folder = _copy(good["art"], t)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["source"] = {"kind": "builtin", "name": ["mlp"]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("model,flags,make_out,expect", [
    (None, ["--stages", "0"], None, "--stages must be >= 1, got 0"),
    (None, ["--stages", "-2"], None, "--stages must be >= 1, got -2"),
    (None, ["--stages", "50"], None, "--stages 50 is more than the 4 nodes"),
    (None, ["--stages", "2", "--batch", "0"], None, "--batch must be >= 1, got 0"),
    (None, ["--stages", "2", "--threads", "-1"], None, "--threads must be >= 1, got -1"),
    (None, ["--stages", "2", "--threads", "5000"], None, "--threads 5000 is more than 1024"),
    (None, ["--max-stage-bytes", "-5"], None, "--max-stage-bytes must be >= 1, got -5"),
    (None, ["--stages", "2"], _file_parent, "afile is not a directory"),
    (None, ["--stages", "2"], _dangling, "dangling symlink"),
    (None, ["--stages", "2"], _existing, "exists; pass --force"),
    (_changed_model, ["--stages", "2"], None, "model.onnx: sha256 does not match"),
    (_builtin_named_by_a_list, ["--stages", "2"], None, "source.name must be a string"),
], ids=["stages 0", "stages negative", "stages too many", "batch 0", "threads negative", "threads 5000",
        "max bytes negative", "parent is a file", "dangling symlink", "exists", "changed model",
        "source name a list"])
def test_hostile_partition_input(good, tmp_path, capsys, model, flags, make_out, expect):
    source = model(tmp_path, good) if model else good["onnx"]
    (tmp_path / "o").mkdir()
    out = make_out(tmp_path / "o") if make_out else tmp_path / "o" / "p"
    _refused(capsys, ["partition", str(source), "-o", str(out), *flags], out, expect)
