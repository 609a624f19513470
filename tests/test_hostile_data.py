"""Hostile data files, recipes and output paths for `export` and `bench`: each is refused naming the
file (and array), in one line, with exit code 2 and nothing written; no payload ever runs."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_tiny_cnn
from numpy.lib import format as npy_format
from onnx import numpy_helper

from slimgraph.cli import main

SHAPE = (4, 3, 16, 16)  # tiny_cnn's input "image", four samples
MARKER = "payload-ran"


class _Payload:
    """Unpickling it creates the marker folder: proof that a reader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    onnx.save_model(make_tiny_cnn(), path)
    return path


def _image(value: float | None = None, n: int = SHAPE[0], dtype=np.float32) -> np.ndarray:
    if value is None:
        return np.random.default_rng(0).standard_normal((n, *SHAPE[1:])).astype(dtype)
    return np.full((n, *SHAPE[1:]), value, dtype)


def _savez(**arrays) -> Callable[[Path], None]:
    return lambda p: np.savez(p, **arrays)


def _write(data: bytes) -> Callable[[Path], None]:
    return lambda p: p.write_bytes(data)


def _truncated(p: Path) -> None:
    np.savez(p, image=_image())
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _member(raw: bytes) -> Callable[[Path], None]:
    def build(p: Path) -> None:
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("image.npy", raw)
    return build


def _huge_header() -> bytes:
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                            "shape": (1 << 38, 3)})
    return buf.getvalue() + bytes(64)


def _pickled(p: Path) -> None:
    p.write_bytes(pickle.dumps(_Payload(p.parent / MARKER)))


def _object_array(p: Path) -> None:
    np.savez(p, image=np.array([_Payload(p.parent / MARKER)] * 4, dtype=object))


def _with_nan(p: Path) -> None:
    image = _image()
    image[1, 0, 2, 3] = np.nan
    np.savez(p, image=image)


# Each builds a hostile .npz at the given path; the fragment is what the one line must say.
NPZ_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing": (lambda p: None, "not a readable .npz file (it does not exist)"),
    "directory": (lambda p: p.mkdir(), "not a readable .npz file (it is a directory)"),
    "empty file": (_write(b""), "not an .npz file"),
    "not a zip": (_write(b"slimgraph " * 20), "not an .npz file"),
    "truncated zip": (_truncated, "not an .npz file"),
    "pickle, not a zip": (_pickled, "not an .npz file"),
    "object array": (_object_array, "'image' is not a plain .npy array"),
    "member without .npy magic": (_member(b"garbage" * 10), "'image' is not a .npy array"),
    "member claiming terabytes": (_member(_huge_header()), "'image' is larger than the memory"),
    "no arrays": (_savez(), "holds no arrays"),
    "zero samples": (_savez(image=_image(n=0)), "'image' holds no samples"),
    "scalar": (_savez(image=np.float32(1.0)), "'image' is a scalar"),
    "sample counts disagree": (_savez(image=_image(), mask=np.ones((3, 1), np.float32)),
                               "disagree on the sample count"),
    "strings": (_savez(image=np.full(SHAPE, "x")), "'image' has dtype <U1"),
    "complex": (_savez(image=_image().astype(np.complex64)), "'image' has dtype complex64"),
    "nan": (_with_nan, "'image' holds 1 non-finite value(s) (nan)"),
    "inf": (_savez(image=_image(np.inf)), "'image' holds 3072 non-finite value(s) (inf)"),
    "beyond float32": (_savez(image=_image(1e39, dtype=np.float64)),
                       "'image' holds 1e+39, beyond the float32 range"),
}
LABEL_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "float labels": (_savez(image=_image(), labels=np.full(4, 0.5)), "'labels' must hold one integer"),
    "string labels": (_savez(image=_image(), labels=np.array(list("abcd"))),
                      "'labels' must hold one integer"),
    "2-d labels": (_savez(image=_image(), labels=np.zeros((4, 2), np.int64)),
                   "'labels' must hold one integer"),
    "labels count": (_savez(image=_image(), labels=np.zeros(3, np.int64)),
                     "disagree on the sample count"),
}


def _refused(argv: list[str], capsys, out: Path, *fragments: str) -> str:
    """Run the CLI; assert exit 2, one line naming ``fragments``, and nothing at or beside ``out``."""
    code = main([*argv, "--quiet"])  # --quiet: no progress lines, so stderr is the error alone
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists() and not out.is_symlink()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return lines[0]


def _hostile(tmp_path: Path, build: Callable[[Path], None], suffix: str = ".npz") -> Path:
    path = tmp_path / f"hostile{suffix}"
    build(path)
    return path


@pytest.mark.parametrize("case", NPZ_CASES)
@pytest.mark.parametrize("flag", ["--calib", "--eval", "--train"])
def test_hostile_npz_is_refused_by_name(tiny, tmp_path, capsys, flag, case):
    build, fragment = NPZ_CASES[case]
    data, out = _hostile(tmp_path, build), tmp_path / "out"
    argv = {"--calib": ["export", str(tiny), "--passes", "quantize:int8", "--calib", str(data)],
            "--eval": ["bench", str(tiny), "--eval", str(data), "--peers", ""],
            "--train": ["export", str(tiny), "--passes", "heal", "--train", str(data)]}[flag]
    _refused([*argv, "-o", str(out)], capsys, out, f"{data}: ", fragment)
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("case", LABEL_CASES)
@pytest.mark.parametrize("flag", ["--eval", "--train"])
def test_hostile_labels_are_refused_by_name(tiny, tmp_path, capsys, flag, case):
    build, fragment = LABEL_CASES[case]
    data, out = _hostile(tmp_path, build), tmp_path / "out"
    argv = (["bench", str(tiny), "--eval", str(data), "--peers", ""] if flag == "--eval" else
            ["export", str(tiny), "--passes", "heal", "--train", str(data)])
    _refused([*argv, "-o", str(out)], capsys, out, f"{data}: ", fragment)


# Arrays that are sound on their own but do not fit tiny_cnn, or drive its float outputs to inf.
MISFIT_CASES = {
    "no array for the input": (_savez(pixels=_image(), mask=np.ones((4, 1), np.float32)),
                               "no array for input 'image'; arrays: mask, pixels"),
    "wrong shape": (_savez(image=np.zeros((4, 3, 8, 8), np.float32)),
                    "array 'image' of shape 1x3x8x8: dim 2 is 8"),
    "outputs overflow": (_savez(image=_image(1e37)), "float model's output #0 is not finite"),
}


@pytest.mark.parametrize("case", MISFIT_CASES)
def test_calibration_that_does_not_fit_the_model(tiny, tmp_path, capsys, case):
    build, fragment = MISFIT_CASES[case]
    data, out = _hostile(tmp_path, build), tmp_path / "out"
    _refused(["export", str(tiny), "--passes", "quantize:int8", "--calib", str(data), "-o",
              str(out)], capsys, out, f"{data}: ", fragment)


def test_evaluation_that_does_not_fit_the_model(tiny, tmp_path, capsys):
    data, out = _hostile(tmp_path, MISFIT_CASES["wrong shape"][0]), tmp_path / "out"
    _refused(["bench", str(tiny), "--eval", str(data), "--peers", "", "-o", str(out)], capsys, out,
             f"{data}: array 'image' of shape 4x3x8x8: dim 2 is 8")


TEXT_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing": (lambda p: None, "cannot read"),
    "directory": (lambda p: p.mkdir(), "cannot read"),
    "empty": (_write(b""), "holds no text"),
    "blank lines only": (_write(b"\n   \n\t\n"), "holds no text"),
    "not utf-8": (_write(b"\xff\xfe\x00\x81binary"), "cannot read"),
}


@pytest.mark.parametrize("case", TEXT_CASES)
@pytest.mark.parametrize("flag", ["--calib-text", "--eval-text", "--train-text"])
def test_hostile_text_file_is_refused_by_name(tmp_path, capsys, flag, case):
    build, fragment = TEXT_CASES[case]
    folder = tmp_path / "folder"  # the texts are read before the folder is looked at
    folder.mkdir()
    text, out = _hostile(tmp_path, build, ".txt"), tmp_path / "out"
    _refused(["export", str(folder), flag, str(text), "-o", str(out)], capsys, out,
             f"{text}: ", fragment)


RECIPE_CASES: dict[str, tuple[bytes, str]] = {
    "not toml": (b"x = \n", "cannot read recipe"),
    "not utf-8": (b"\xff\xfe[[pass]]", "cannot read recipe"),
    "empty": (b"", "needs at least one [[pass]] table"),
    "pass is a string": (b'pass = "quantize"', "needs at least one [[pass]] table"),
    "pass holds numbers": (b"pass = [1, 2]", "[[pass]] #1 is not a table"),
    "name is a number": (b"[[pass]]\nname = 3\n", "[[pass]] #1 has no name"),
    "unknown pass": (b'[[pass]]\nname = "rm -rf"\n', "unknown pass 'rm -rf'"),
    "float option is a list": (b'[[pass]]\nname = "quantize"\nmode = "int8"\npercentile = [1]\n',
                               "quantize:percentile: [1] is not a float"),
    "float option is nan": (b'[[pass]]\nname = "quantize"\nmode = "int8"\npercentile = nan\n',
                            "quantize:percentile: nan is not a"),
    "bool option is a number": (b'[[pass]]\nname = "quantize"\nmode = "int8"\nguard = 3\n',
                                "quantize:guard: 3 is not a bool"),
    "str option is a number": (b'[[pass]]\nname = "quantize"\nmode = 8\n',
                               "quantize:mode: 8 is not a str"),
    "list option holds numbers": (b'[[pass]]\nname = "quantize"\nmode = "int8"\nexclude = [1]\n',
                                  "quantize:exclude: [1] is not a list"),
}


@pytest.mark.parametrize("case", RECIPE_CASES)
@pytest.mark.parametrize("command", ["export", "bench"])
def test_hostile_recipe_is_refused_by_name(tiny, tmp_path, capsys, command, case):
    text, fragment = RECIPE_CASES[case]
    recipe, out = tmp_path / "recipe.toml", tmp_path / "out"
    recipe.write_bytes(text)
    flag = "--recipe" if command == "export" else "--variants"
    _refused([command, str(tiny), flag, str(recipe), "-o", str(out)], capsys, out,
             f"{recipe}: ", fragment)


def _parent_is_file(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "file").write_text("mine")
    return tmp_path / "file" / "out", "is not a directory"


def _dangling_symlink(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    return tmp_path / "out", "dangling symlink"


def _existing_file(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "out").write_text("mine")
    return tmp_path / "out", "exists; pass --force"


OUT_CASES = {"parent is a file": _parent_is_file, "dangling symlink": _dangling_symlink,
             "existing file": _existing_file}


@pytest.mark.parametrize("case", OUT_CASES)
@pytest.mark.parametrize("command", ["export", "bench"])
def test_unwritable_output_path_is_refused_before_any_work(tiny, tmp_path, capsys, command, case):
    out, fragment = OUT_CASES[case](tmp_path)
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    code = main([command, str(tiny), "-o", str(out), "--quiet",
                 *(["--peers", ""] if command == "bench" else [])])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert str(out) in lines[0] and fragment in lines[0], lines[0]
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before


# Degenerate but finite calibration: quantization must give finite, positive scales. (At 1e30
# GPTQ's second moments overflow, numpy warns, and the pass falls back to nearest rounding.)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("value", [0.0, 1e30])
def test_degenerate_calibration_gives_finite_positive_scales(tiny, tmp_path, capsys, value):
    data, out = tmp_path / "c.npz", tmp_path / "out"
    np.savez(data, image=_image(value))
    code = main(["export", str(tiny), "--passes", "quantize:int8", "--calib", str(data), "-o",
                 str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    scales = [numpy_helper.to_array(t) for t in onnx.load(out / "model.onnx").graph.initializer
              if t.name.endswith("scale")]
    assert scales and all(np.isfinite(s).all() and (s > 0).all() for s in scales)


@pytest.mark.parametrize("dtype", [np.float64, np.int64])
def test_wider_calibration_is_cast_to_the_input_type(tiny, tmp_path, capsys, dtype):
    data, out = tmp_path / "c.npz", tmp_path / "out"
    np.savez(data, x=(_image() * 3).astype(dtype))  # named x: a one-input model takes it anyway
    assert main(["export", str(tiny), "--passes", "quantize:int8", "--calib", str(data), "-o",
                 str(out), "--quiet"]) == 0, capsys.readouterr().err


def test_float64_training_data_is_cast_to_the_input_type(tiny, tmp_path, capsys):
    data, out = tmp_path / "train.npz", tmp_path / "out"
    np.savez(data, image=_image(n=8).astype(np.float64))
    assert main(["export", str(tiny), "--passes", "heal:steps=1", "--train", str(data), "-o",
                 str(out), "--quiet"]) == 0, capsys.readouterr().err
