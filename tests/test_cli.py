"""The CLI as a user runs it: exit codes, messages, nothing written on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slimgraph.cli import main


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimgraph.cli", *args], capture_output=True,
                          text=True, cwd=cwd)


def test_version_and_help():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("slimgraph ")
    proc = run_cli("export", "--help")
    assert proc.returncode == 0 and "--allow-mismatch" in proc.stdout and "default" in proc.stdout


def test_export_onnx_json_output(tiny_cnn_path, tmp_path, capsys):
    assert main(["export", str(tiny_cnn_path), "-o", str(tmp_path / "out"),
                 "--passes", "fold-constants", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] is True and data["manifest"]["pipeline"] == "fold-constants"
    assert (tmp_path / "out" / "manifest.json").exists()


def test_quiet_prints_nothing(tiny_cnn_path, tmp_path, capsys):
    assert main(["export", str(tiny_cnn_path), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_recipe_flag(tiny_cnn_path, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "fold-constants"\n')
    assert main(["export", str(tiny_cnn_path), "-o", str(tmp_path / "out"), "--recipe",
                 str(recipe), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["manifest"]["pipeline"] == "fold-constants"


def test_passes_and_recipe_conflict_is_a_parser_error(tiny_cnn_path, tmp_path):
    proc = run_cli("export", str(tiny_cnn_path), "--passes", "fold-constants", "--recipe", "r.toml")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--passes", "fold-constant"], "unknown pass 'fold-constant'"),
        (["--passes", "fold-constants:level=3"], "unknown option 'level'"),
        (["--input", "image=1x3x32x32"], "dim 2 is 32 but"),
        (["--input", "image=1x3x16"], "has rank 4"),
        (["--input", "pixels=1x3x16x16"], "has no input 'pixels'"),
        (["--input", "image=1by3"], "expected NAME=DxDxD"),
        (["--backend", "tvm-metal"], "unknown backend 'tvm-metal'"),
        (["--backend", "ort-cpu:threads=2"], "unknown option(s) threads"),
        (["--calib", "missing.npz"], "missing.npz: not a readable .npz"),
    ],
)
def test_bad_options_exit_2_and_write_nothing(tiny_cnn_path, tmp_path, capsys, extra, fragment):
    out = tmp_path / "out"
    code = main(["export", str(tiny_cnn_path), "-o", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert fragment in " ".join(err.split())
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_exit_2(tiny_cnn_path, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["export", str(tiny_cnn_path), "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_torch_checkpoint_refused_without_unpickling(tmp_path, capsys):
    ckpt = tmp_path / "model.pt"
    # A pickle that would run code if anything unpickled it.
    ckpt.write_bytes(b"\x80\x04cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode()
                     + b"'\ntR.")
    assert main(["export", str(ckpt), "-o", str(tmp_path / "out")]) == 2
    assert "never unpickles" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_not_an_onnx_file(tmp_path, capsys):
    bad = tmp_path / "notes.onnx"
    bad.write_text("hello, not a protobuf")
    assert main(["export", str(bad), "-o", str(tmp_path / "out")]) == 2
    assert "notes.onnx" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_torch_callable_without_inputs_asks_for_them(torch_models_module, tmp_path, capsys):
    assert main(["export", f"{torch_models_module}:build", "-o", str(tmp_path / "o")]) == 2
    assert "--input" in capsys.readouterr().err
    assert main(["export", f"{torch_models_module}:not_a_module", "-o", str(tmp_path / "o")]) == 2
    assert "expected a torch.nn.Module" in capsys.readouterr().err
    assert main(["export", f"{torch_models_module}:nope", "-o", str(tmp_path / "o")]) == 2
    assert "cannot import 'nope'" in capsys.readouterr().err


def test_torch_callable_with_input_flag(torch_models_module, tmp_path, capsys):
    assert main(["export", f"{torch_models_module}:build", "--input", "image=2x3x16x16",
                 "-o", str(tmp_path / "o"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["manifest"]["inputs"][0]["name"] == "image"
    assert data["manifest"]["inputs"][0]["shape"][1:] == [3, 16, 16]


def test_inspect_counts_macs(tiny_cnn_path, capsys):
    assert main(["inspect", str(tiny_cnn_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    conv = 16 * 16 * 8 * (3 * 3 * 3)  # output elements x (Cin x kh x kw)
    gemm = 10 * 8
    assert {layer["op_type"]: layer["macs"] for layer in data["layers"]} == {"Conv": conv,
                                                                            "Gemm": gemm}
    assert data["total_macs"] == conv + gemm
    assert data["params"] == 8 * 27 + 8 + 80 + 10 + 10
    assert data["ops"]["Conv"] == 1 and data["inputs"][0]["name"] == "image"
    # Bytes at batch 1: the weights as stored, the activations read and written (float32).
    first = data["layers"][0]
    assert (first["weight_bytes"], first["read_bytes"], first["write_bytes"]) == (
        (8 * 27 + 8) * 4, 3 * 16 * 16 * 4, 8 * 16 * 16 * 4)
    assert first["intensity"] == round(2 * conv / ((8 * 27 + 8 + 3 * 256 + 8 * 256) * 4), 3)
    assert main(["inspect", str(tiny_cnn_path), "--batch", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_macs"] == 4 * (conv + gemm)


def test_inspect_table(tiny_cnn_path, capsys):
    assert main(["inspect", str(tiny_cnn_path)]) == 0
    out = capsys.readouterr().out
    assert "MACs per layer" in out and "op histogram" in out and "55,296" in out


def test_passes_and_backends_listings(capsys):
    assert main(["passes", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "fold-constants" in [p["name"] for p in data["passes"]]
    assert main(["backends", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["ort-cpu"]["available"] is True
    assert rows["ort-cuda"]["available"] is False or rows["ort-cuda"]["reason"] is None
    assert main(["backends"]) == 0
    assert "ort-cuda" in capsys.readouterr().out


def test_calibration_that_does_not_fit_the_model(torch_models_module, tmp_path, capsys):
    import numpy as np

    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, pixels=np.zeros((4, 3, 16, 16), np.float32), mask=np.zeros((4, 1), np.float32))
    assert main(["export", f"{torch_models_module}:build_with_inputs", "--input", "image=2x3x16x16",
                 "--calib", str(wrong), "-o", str(tmp_path / "o")]) == 2
    assert "no array for input 'image'" in capsys.readouterr().err
    bad_shape = tmp_path / "bad_shape.npz"
    np.savez(bad_shape, image=np.zeros((4, 3, 8, 8), np.float32))
    assert main(["export", f"{torch_models_module}:build_with_inputs", "--input", "image=2x3x16x16",
                 "--calib", str(bad_shape), "-o", str(tmp_path / "o")]) == 2
    assert "dim 2 is 8" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "o").exists()


def test_single_input_model_takes_the_only_calibration_array_whatever_its_name(
        torch_models_module, tmp_path, capsys):
    """A torch callable's input is input_0; an .npz saved with the array as ``x`` still feeds it."""
    import numpy as np

    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32))
    out = tmp_path / "o"
    assert main(["export", f"{torch_models_module}:build_with_inputs", "--passes", "quantize:int8",
                 "--calib", str(data), "-o", str(out), "--json"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["name"] for i in manifest["inputs"]] == ["input_0"]
    assert manifest["passes"][0]["counts"]["layers_quantized"] == 2
