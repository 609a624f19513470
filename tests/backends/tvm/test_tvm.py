"""tvm-llvm / tvm-cuda: build through export(), compare with onnxruntime, load in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("tvm")

from conftest import make_tiny_cnn  # noqa: E402

import slimgraph  # noqa: E402
from slimgraph.backends import parse_backend_spec  # noqa: E402
from slimgraph.backends.ort import session_for  # noqa: E402
from slimgraph.backends.tvm import TVM_CUDA, TVM_LLVM, load_runner  # noqa: E402
from slimgraph.errors import BackendError  # noqa: E402


def _ort_outputs(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session_for(make_tiny_cnn().SerializeToString()).run(None, feeds)


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _image(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 16, 16)).astype(np.float32)


def test_registered_and_parsed() -> None:
    backend, options = parse_backend_spec("tvm-llvm:mcpu=generic,threads=2,tune=0")
    assert backend is TVM_LLVM
    assert options == {"mcpu": "generic", "threads": 2, "tune": 0}
    assert TVM_LLVM.available() and TVM_LLVM.unavailable_reason() is None


def test_export_tvm_llvm_matches_onnxruntime(tiny_cnn_path: Path, tmp_path: Path) -> None:
    result = slimgraph.export(tiny_cnn_path, tmp_path / "out", backends=["ort-cpu", "tvm-llvm"])
    assert result.passed
    entry = result.manifest["backends"]["tvm-llvm"]
    assert set(entry["files"]) == {"model.onnx", "tvm-llvm/io.json", "tvm-llvm/model.so"}
    assert entry["options"]["untuned"] is True
    assert entry["options"]["target"]["kind"] == "llvm"
    io = json.loads((tmp_path / "out" / "tvm-llvm" / "io.json").read_text())
    assert io["inputs"] == [{"name": "image", "shape": ["N", 3, 16, 16], "dtype": "float32"}]
    run = load_runner(tmp_path / "out" / "tvm-llvm" / "io.json")
    for batch in (1, 5):  # the symbolic batch stays dynamic
        feeds = {"image": _image(batch)}
        (got,), (want,) = run(feeds), _ort_outputs(feeds)
        assert got.shape == (batch, 10)
        assert _rel_err(got, want) < 1e-4


def test_torch_module_exports(torch_models_module: str, tmp_path: Path) -> None:
    result = slimgraph.export(f"{torch_models_module}:build_with_inputs", tmp_path / "out",
                              backends=["tvm-llvm:mcpu=generic"])
    assert result.passed
    assert result.manifest["backends"]["tvm-llvm"]["options"]["mcpu"] == "generic"


def test_build_is_byte_identical(tmp_path: Path) -> None:
    model = ir.from_proto(make_tiny_cnn())
    hashes = []
    for name in ("a", "b"):
        built = TVM_LLVM.build(model, tmp_path / name, {})
        hashes.append({f: (tmp_path / name / f).read_bytes() for f in built.files})
    library = "tvm-llvm/model.so"
    assert {f: b for f, b in hashes[0].items() if f != library} == {
        f: b for f, b in hashes[1].items() if f != library}
    if hashes[0][library] != hashes[1][library]:
        # Known, open (seen on a 2-core AVX2 EPYC, about one build pair in three): TVM 0.27's LLVM
        # code generation orders a few independent stores differently from one build to the next.
        pytest.xfail("TVM 0.27 emitted a differently scheduled model.so for the same input")


def test_fixed_batch_runs_any_batch(tmp_path: Path) -> None:
    built = TVM_LLVM.build(ir.from_proto(make_tiny_cnn()), tmp_path, {"batch": 4})
    run = TVM_LLVM.load(built)
    feeds = {"image": _image(10, seed=3)}  # 4 + 4 + 2 padded rows
    assert _rel_err(run(feeds)[0], _ort_outputs(feeds)[0]) < 1e-4
    with pytest.raises(BackendError, match="'image' has shape"):
        run({"image": np.zeros((4, 3, 8, 8), np.float32)})


def _at_offset(x: np.ndarray, offset: int) -> np.ndarray:
    """A copy of ``x`` whose data starts ``offset`` bytes past a 64-byte boundary."""
    buffer = np.empty(x.nbytes + 128, np.uint8)
    start = (-buffer.ctypes.data) % 64 + offset
    out = buffer[start:start + x.nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    return out


def test_runner_takes_any_alignment_and_outputs_are_the_callers(tmp_path: Path) -> None:
    """Aligned inputs are passed without a copy, outputs come back without one: check both."""
    run = load_runner(TVM_LLVM.build(ir.from_proto(make_tiny_cnn()), tmp_path, {}).entry_path)
    x, y = _image(4, seed=5), _image(4, seed=6)
    first = run({"image": _at_offset(x, 0)})[0]
    kept = first.copy()
    second = run({"image": _at_offset(y, 4)})[0]
    np.testing.assert_array_equal(first, kept)  # not overwritten by the next call
    assert _rel_err(first, _ort_outputs({"image": x})[0]) < 1e-4
    assert _rel_err(second, _ort_outputs({"image": y})[0]) < 1e-4


def test_output_that_is_an_input_is_copied(tmp_path: Path) -> None:
    """The VM returns an Identity's input tensor itself: zero-copy in would alias the caller's."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    run = load_runner(TVM_LLVM.build(model, tmp_path, {}).entry_path)
    x = _at_offset(np.arange(16, dtype=np.float32).reshape(2, 8), 0)
    (y,) = run({"x": x})
    x[...] = -1
    np.testing.assert_array_equal(y, np.arange(16, dtype=np.float32).reshape(2, 8))


def test_bad_options_name_the_option(tmp_path: Path) -> None:
    model = ir.from_proto(make_tiny_cnn())
    with pytest.raises(BackendError, match="unknown option.*bogus"):
        TVM_LLVM.build(model, tmp_path, {"bogus": 1})
    with pytest.raises(BackendError, match="mcpu='not-a-cpu'"):
        TVM_LLVM.build(model, tmp_path, {"mcpu": "not-a-cpu"})
    with pytest.raises(BackendError, match="prepack='yes'"):
        TVM_LLVM.build(model, tmp_path, {"prepack": "yes"})
    with pytest.raises(BackendError, match="layout='NCWH' must be one of NCHW, NHWC"):
        TVM_LLVM.build(model, tmp_path, {"layout": "NCWH"})
    with pytest.raises(BackendError, match="arch="):
        TVM_CUDA.build(model, tmp_path, {"arch": "90"})


def test_unsupported_op_is_named(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("GRU", ["x", "w", "r"], ["y"], hidden_size=2)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, [1, 6, 2], [0.0] * 12),
                     helper.make_tensor("r", TensorProto.FLOAT, [1, 6, 2], [0.0] * 12)],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(slimgraph.errors.UnsupportedOpError, match="GRU"):
        TVM_LLVM.build(model, tmp_path, {})


def test_lstm_that_cannot_be_unrolled_says_why(tmp_path: Path) -> None:
    from test_tvm_lstm import make_lstm

    proto, _ = make_lstm(clip=2.0)
    with pytest.raises(slimgraph.errors.UnsupportedOpError, match="LSTM node .*clip is set"):
        TVM_LLVM.build(ir.from_proto(proto), tmp_path, {})


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from tvm.runtime import cpu, load_module, tensor
    from tvm.runtime.vm import VirtualMachine

    root = sys.argv[1]
    io = json.load(open(root + "/io.json"))
    vm = VirtualMachine(load_module(root + "/" + io["library"]), cpu())
    x = np.load(sys.argv[2])
    np.save(sys.argv[3], vm[io["function"]](tensor(x)).numpy())
    print(sorted(m for m in sys.modules if m.startswith("slimgraph") or m == "onnx"))
    """
)


def test_library_runs_in_a_fresh_process_with_the_runtime_only(tmp_path: Path) -> None:
    """Only tvm.runtime calls, no slimgraph or onnx import. (`import tvm` itself still loads the
    compiler's Python packages: PyPI has no runtime-only TVM wheel.)"""
    built = TVM_LLVM.build(ir.from_proto(make_tiny_cnn()), tmp_path / "art", {})
    script = tmp_path / "run_so.py"
    script.write_text(FRESH_PROCESS)
    x = _image(3, seed=7)
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run(
        [sys.executable, str(script), str(built.entry_path.parent), str(tmp_path / "x.npy"),
         str(tmp_path / "y.npy")],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert _rel_err(np.load(tmp_path / "y.npy"), _ort_outputs({"image": x})[0]) < 1e-4


KEEPS_AFFINITY = textwrap.dedent(
    """
    import os, sys, threading
    import numpy as np
    from slimgraph.backends.tvm import load_runner

    run = load_runner(sys.argv[1])
    run({"image": np.zeros((1, 3, 16, 16), np.float32)})
    seen = []
    thread = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
    thread.start()
    thread.join()
    print(sorted(os.sched_getaffinity(0)), sorted(seen[0]))
    """
)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and >= 2 cores")
def test_loading_with_threads_keeps_the_callers_cores(tmp_path: Path) -> None:
    """TVM pins the thread that first configures its pool; load_runner gives the cores back, so
    threads started later (torch, onnxruntime) are not confined to one core. A fresh process:
    the pin happens once per process."""
    built = TVM_LLVM.build(ir.from_proto(make_tiny_cnn()), tmp_path / "art", {"threads": 2})
    script = tmp_path / "affinity.py"
    script.write_text(KEEPS_AFFINITY)
    done = subprocess.run([sys.executable, str(script), str(built.entry_path)], cwd=tmp_path,
                          capture_output=True, text=True, check=True)
    cores = sorted(os.sched_getaffinity(0))
    assert done.stdout.strip().splitlines()[-1] == f"{cores} {cores}"


def test_tvm_cuda_builds_without_a_gpu(tmp_path: Path) -> None:
    assert TVM_CUDA.buildable()
    built = TVM_CUDA.build(ir.from_proto(make_tiny_cnn()), tmp_path, {"arch": "sm_80"})
    assert (tmp_path / "tvm-cuda" / "model.so").stat().st_size > 0
    assert built.options["target"]["kind"] == "cuda"
    assert built.options["target"]["arch"] == "sm_80"
    if not TVM_CUDA.available():
        assert "GPU" in TVM_CUDA.unavailable_reason()


def test_export_build_only_marks_tvm_cuda_unverified(tiny_cnn_path: Path, tmp_path: Path) -> None:
    if TVM_CUDA.available():
        pytest.skip("this machine can run tvm-cuda")
    with pytest.raises(slimgraph.SlimgraphError, match="--build-only"):
        slimgraph.export(tiny_cnn_path, tmp_path / "refused", backends=["tvm-cuda"])
    assert not (tmp_path / "refused").exists()
    result = slimgraph.export(tiny_cnn_path, tmp_path / "out", backends=["ort-cpu", "tvm-cuda"],
                              build_only=True)
    entry = result.manifest["backends"]["tvm-cuda"]
    assert "GPU" in entry["verification"]["skipped"]
    assert "tvm-cuda/model.so" in entry["files"]
    assert [v.backend for v in result.verifications] == ["ort-cpu"]
    assert any("NOT verified" in w for w in result.warnings)
    assert "NOT RUN" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.gpu
def test_tvm_cuda_export_verifies(tiny_cnn_path: Path, tmp_path: Path) -> None:
    if not TVM_CUDA.available():
        pytest.skip(TVM_CUDA.unavailable_reason())
    assert slimgraph.export(tiny_cnn_path, tmp_path / "out", backends=["tvm-cuda"]).passed


def _one_gemm() -> onnx.ModelProto:
    """x [N, 16] -> Gemm -> [N, 8]: one tuning task, so one MetaSchedule round."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        initializer=[numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w"),
                     numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.slow
def test_tuning_database_is_reused(tmp_path: Path) -> None:
    """A tiny budget: this checks the plumbing (cache miss, then hit, packed weights baked into
    the library), not the speed."""
    proto = _one_gemm()
    model = ir.from_proto(proto)
    options = {"tune": 8, "batch": 2, "cache_dir": str(tmp_path / "cache"), "threads": 1}
    first = TVM_LLVM.build(model, tmp_path / "a", dict(options))
    tuning = first.options["tuning"]
    assert tuning["cache"] == "miss" and tuning["trials"] == 8 and first.options["untuned"] is False
    assert first.options["prepack"] is True
    assert (tmp_path / "cache" / tuning["key"]).is_dir()
    second = TVM_LLVM.build(model, tmp_path / "b", dict(options))
    assert second.options["tuning"] == {**tuning, "cache": "hit"}
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    (want,) = session_for(proto.SerializeToString()).run(None, {"x": x})
    assert _rel_err(TVM_LLVM.load(second)({"x": x})[0], want) < 1e-4


@pytest.mark.slow
def test_tuned_nhwc_convolutions_match_onnxruntime(tmp_path: Path) -> None:
    """The default tuned CPU layout converts the convolutions to NHWC (and back at the outputs);
    a tiny budget again: plumbing and exactness, not speed."""
    options = {"tune": 4, "batch": 2, "cache_dir": str(tmp_path / "cache"), "threads": 1}
    built = TVM_LLVM.build(ir.from_proto(make_tiny_cnn()), tmp_path / "a", options)
    assert built.options["layout"] == "NHWC" and built.options["tuning"]["layout"] == "NHWC"
    feeds = {"image": _image(3, seed=9)}
    assert _rel_err(TVM_LLVM.load(built)(feeds)[0], _ort_outputs(feeds)[0]) < 1e-4


@pytest.mark.slow
def test_every_builtin_compiles_and_matches_onnxruntime(tmp_path: Path) -> None:
    """fp32 bar of issue 6: 1e-4 relative to onnxruntime on the built-in's verification feeds."""
    from slimgraph.backends.ort import runner_for
    from slimgraph.frontend import load
    from slimgraph.frontend.builtin import builtin_names

    fixed_batch = {}
    for name in builtin_names():
        loaded = load(name)
        built = TVM_LLVM.build(loaded.model, tmp_path / name, {})
        run = TVM_LLVM.load(built)
        reference = runner_for(session_for(ir.to_proto(loaded.model).SerializeToString()))
        feeds = loaded.verification_feeds[0]
        for got, want in zip(run(feeds), reference(feeds), strict=True):
            assert got.shape == want.shape, name
            assert _rel_err(got, want) < 1e-4, name
        fixed_batch[name] = built.options["batch"]
    # minilm's attention mask is computed from Shape ops: only a fixed batch imports
    assert fixed_batch == {n: 1 if n == "minilm" else None for n in builtin_names()}
