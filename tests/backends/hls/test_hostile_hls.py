"""hls against hostile input: names from the model and option values never become code.

Every case carries a payload that would create a marker file if any of it ran (in the C++ the
export compiles and runs, in make's command line or recipes, in Tcl); the marker must never exist.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimgraph import codegen
from slimgraph.backends.hls import HLS
from slimgraph.calibration import Calibration
from slimgraph.cli import main
from slimgraph.passes.quantize import InsertQDQPass

pytestmark = pytest.mark.skipif(shutil.which("g++") is None or shutil.which("make") is None,
                                reason="the C simulation needs g++ and make")


def payloads(marker: Path) -> list[str]:
    """Names that end a // comment, a /* */ comment, a string, a line, or run code in make / Tcl /
    a shell, each trying to create ``marker``."""
    cmd = f"touch {marker}"

    def system(k: int) -> str:
        return f'static int pwn{k} = std::system("{cmd}");'

    return [
        f"a\n#include <cstdlib>\n{system(0)}\n//",  # a newline ends the // comment
        f"b\r{system(1)}//",  # a lone carriage return does too
        f"c */ {system(2)} /* ",  # ends a block comment
        f'd"; {system(3)} //',  # ends a string literal
        "e\\",  # a trailing backslash splices the next line into the comment
        "f??/",  # the trigraph for a backslash (-std=c++14 enables trigraphs)
        f"$(shell {cmd})", f"`{cmd}`", f"}}; exec {cmd}; {{", f"'; {cmd}; '",
        "int", "class", "out", "in", "model", "main", "w_0", "rq_1", "b_2", "cfg0_y", "in_t",
        "size", "int8", "NULL", "EOF", "std", "sg", "stdout", "linux",  # keywords, library names
        "a.b", "a_b", "a-b",  # one mangling, three tensors
        "9lives", "_Reserved", "x__y", "", "ü" * 3, "n" * 5000,
    ]


def hostile_model(names: list[str]) -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> Add (skip) -> Relu -> GlobalAveragePool -> Flatten -> Gemm, every
    value and node named from ``names`` (values unique, as ONNX requires)."""
    rng = np.random.default_rng(5)
    it = iter(names)

    def name() -> str:
        return next(it)

    def weight(label: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((0.4 * rng.standard_normal(shape)).astype(np.float32), label)

    x, c0, r0, c1, s, r1, g, f, y = (name() for _ in range(9))
    w0, b0, w1, wf, bf = (name() for _ in range(5))
    node = helper.make_node
    nodes = [node("Conv", [x, w0, b0], [c0], pads=[1, 1, 1, 1], name=name()),
             node("Relu", [c0], [r0], name=name()),
             node("Conv", [r0, w1], [c1], pads=[1, 1, 1, 1], name=name()),
             node("Add", [c1, r0], [s], name=name()),
             node("Relu", [s], [r1], name=name()),
             node("GlobalAveragePool", [r1], [g], name=name()),
             node("Flatten", [g], [f], name=name()),
             node("Gemm", [f, wf, bf], [y], transB=1, name=name())]
    graph = helper.make_graph(
        nodes, name(), [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", 4])],
        initializer=[weight(w0, 4, 3, 3, 3), weight(b0, 4), weight(w1, 4, 4, 3, 3),
                     weight(wf, 4, 4), weight(bf, 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _images(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 6, 6)).astype(np.float32)


def _name_sets(marker: Path) -> list[list[str]]:
    """The payloads dealt into graphs of 23 names each (value names must be unique)."""
    pool = [p for p in payloads(marker) if p]
    per_graph = 23
    sets = []
    for start in range(0, len(pool), per_graph - 4):
        chunk = pool[start:start + per_graph - 4]
        filler = [f"filler.{i}" for i in range(per_graph - len(chunk))]
        sets.append(chunk + filler)
    return sets


def _emitted_text(root: Path) -> str:
    files = [p for p in (root / "hls").rglob("*")
             if p.is_file() and p.suffix in (".h", ".cpp", ".tcl", "") and "tb_data" not in p.parts]
    assert any(p.name == "Makefile" for p in files) and any(p.suffix == ".tcl" for p in files)
    return "\n".join(p.read_text() for p in files)


def _assert_no_payload_outside_comments(emitted: str) -> None:
    for line in emitted.splitlines():  # escaped text holds no '/' or '#': what precedes the
        code = line.split("//")[0].split("#")[0]  # first one is generated code
        assert not re.search(r"system\s*\(|touch\s|exec\s|\$\(shell|`", code), line
        assert "\r" not in line and not line.rstrip().endswith("\\"), line


@pytest.mark.parametrize("io", ["parallel", "stream"])
def test_hostile_names_compile_run_bit_exact_and_never_reach_the_code(io: str,
                                                                     tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for k, names in enumerate(_name_sets(marker)):
        qpass = InsertQDQPass(speed_check=False, guard=False)
        proto = hostile_model(names)
        key = proto.graph.input[0].name
        qpass.calibration = Calibration([{key: _images(2, seed)} for seed in range(4)])
        model = qpass(ir.from_proto(proto)).model
        root = tmp_path / f"{io}{k}"
        built = HLS.build(model, root, {"io": io}, feeds=[{key: _images(6, 50 + k)}])
        assert built.details["csim"]["vs_integer_reference"]["bit_exact"]
        assert not marker.exists()
        emitted = _emitted_text(root)
        graph_names = {n.name for n in model.graph} | {v.name for n in model.graph for v in n.outputs}
        graph_names |= {model.graph.name, key}
        for name in graph_names:
            if codegen.text(name) != name:  # a character the escaper encodes: the name is only
                assert name not in emitted, name  # ever seen mangled or escaped
        if k == 0:  # the newline payload is there, escaped, in the comments
            assert codegen.text(names[0]) in emitted and "%0A" in emitted
        _assert_no_payload_outside_comments(emitted)


def test_namespace_is_unique_deterministic_and_reserved() -> None:
    names = codegen.Namespace(("in", "out"))
    given = [names.ident(t) for t in ("a.b", "a_b", "a-b", "in", "int", "size_t", "NULL", "9x", "")]
    assert given == ["a_b", "a_b_2", "a_b_3", "in_2", "int_2", "size_t_2", "v_NULL", "v_9x", "v"]
    assert names.ident("a.b") == "a_b" and names.ident("a.b", "type", "a.b_t") == "a_b_t"
    assert all(re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,47}", n) for n in given)
    long = [names.ident("n" * 5000 + str(i)) for i in range(3)]
    assert len(set(long)) == 3 and all(len(n) <= codegen.MAX_IDENTIFIER for n in long)


@pytest.mark.parametrize("value", ["a\nb", "x */ y", 'q"r', "s\\", "t??/", "$(x)", "#", "{[]}", "ü"])
def test_text_cannot_end_a_comment_a_string_or_a_line(value: str) -> None:
    escaped = codegen.text(value)
    assert re.fullmatch(r"[A-Za-z0-9 _.,:=+()<>@%-]*", escaped), escaped
    assert codegen.text(value) == escaped and escaped != value


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32))
    return path


def _headers_at(directory: Path) -> Path:
    directory.mkdir(parents=True)
    for header in ("ap_int.h", "hls_stream.h"):
        (directory / header).write_text("#error never compiled\n")
    return directory


@pytest.mark.parametrize("spec, says", [
    ("hls:part=$(shell touch {marker})", "part="),
    ("hls:part=xc}}; exec touch {marker}; {{", "part="),
    ("hls:part=a b", "part="), ("hls:part=", "part="),
    ("hls:clock_ns=nan", "clock_ns="), ("hls:clock_ns=inf", "clock_ns="),
    ("hls:clock_ns=-5", "clock_ns="), ("hls:clock_ns=0", "clock_ns="),
    ("hls:clock_ns=1e9", "clock_ns="), ("hls:clock_ns=fast", "clock_ns="),
    ("hls:agreement=nan", "agreement="), ("hls:agreement=2", "agreement="),
    ("hls:agreement=-0.5", "agreement="), ("hls:reuse=true", "reuse="), ("hls:reuse=1e400", "reuse="),
    ("hls:reuse=99999999999", "reuse="), ("hls:csim=maybe", "csim="),
    ("hls:precision=ap_fixed<16,999>", "precision"), ("hls:io=stream;touch", "io="),
    ("hls:ap_types=/no/such/dir", "ap_types"),
    ("hls:ap_types={dollar}", "ap_types"),
])
def test_hostile_options_exit_2_one_line_nothing_written(spec: str, says: str, tmp_path: Path,
                                                        calib: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    dollar = _headers_at(tmp_path / f"h$(shell touch {marker})")
    spec = spec.format(marker=marker, dollar=dollar)
    out = tmp_path / "o"
    code = main(["export", "mlp", "-o", str(out), "--passes", "quantize:int8", "--backend", spec,
                 "--calib", str(calib), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]
    assert not marker.exists()


def test_a_hostile_onnx_file_exports_through_the_cli(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    names = _name_sets(marker)[0]
    path = tmp_path / "hostile.onnx"
    onnx.save(hostile_model(names), path)
    data = tmp_path / "calib.npz"
    np.savez(data, images=_images(8, 1))
    out = tmp_path / "out"
    code = main(["export", str(path), "-o", str(out), "--passes", "quantize:int8", "--backend",
                 "hls", "--calib", str(data), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert not marker.exists()
    _assert_no_payload_outside_comments(_emitted_text(out))


def test_a_float_layer_after_an_unquantized_int8_result_is_refused_by_name(tmp_path: Path,
                                                                          capsys) -> None:
    out = tmp_path / "o"
    code = main(["export", "digits-cnn", "-o", str(out), "--passes",
                 "quantize:int8,exclude=node_linear_1", "--backend", "hls", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "error: hls: 'node_linear_1' (Gemm) reads a float result" in err, err
    assert "Traceback" not in err and not out.exists()
