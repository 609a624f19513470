"""heal: distillation wins back what pruning and binarisation lost, on real digits, in place."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import slimgraph
from slimgraph.backends.ort import session_for
from slimgraph.cli import main
from slimgraph.errors import PipelineSpecError
from slimgraph.frontend.builtin.digits import digits_split
from slimgraph.passes import Pipeline


@functools.cache
def _digits():
    return slimgraph.load("digits-cnn")


def _accuracy(model_path: Path) -> float:
    """Top-1 of an exported model.onnx on the digits test split, computed here, not by heal."""
    split = digits_split()
    session = session_for(str(model_path), {"allow_spinning": False})
    logits = session.run(None, {"image": split.x_test.copy()})[0]
    return float((logits.argmax(1) == split.y_test).mean())


def _export(tmp_path: Path, name: str, spec: str, **kw) -> slimgraph.ExportResult:
    return slimgraph.export(_digits(), tmp_path / name, passes=spec, backends=["ort-cpu"],
                            allow_mismatch=True, **kw)


def _heal_report(result) -> dict:
    return next(p for p in result.manifest["passes"] if p["name"] == "heal")


def test_heal_recovers_pruned_accuracy(tmp_path: Path) -> None:
    pruned = _export(tmp_path, "pruned", "fold-constants,prune-channels:ratio=0.5")
    healed = _export(tmp_path, "healed", "fold-constants,prune-channels:ratio=0.5,heal:steps=200")
    float_acc = 0.9917  # the shipped weights' record
    before, after = _accuracy(pruned.out / "model.onnx"), _accuracy(healed.out / "model.onnx")
    assert after >= before + 0.03, (before, after)
    assert after >= float_acc - 0.02
    report = _heal_report(healed)
    assert report["modified"] is True
    assert report["counts"]["steps"] == 200 and report["counts"]["initializers_changed"] > 0
    note = next(n for n in report["notes"] if n.startswith("heal:"))
    assert "digits training split" in note and f"{after:.4f}" in note
    assert note in (healed.out / "report.md").read_text()
    # the shapes prune-channels chose are kept
    assert healed.manifest["model"]["after"]["params"] == pruned.manifest["model"]["after"]["params"]
    assert "heal samples_per_s" in healed.timings


def test_heal_makes_binary_weights_usable(tmp_path: Path) -> None:
    plain = _export(tmp_path, "binary", "fold-constants,quantize:binary")
    healed = _export(tmp_path, "healed", "fold-constants,quantize:binary,heal:steps=300")
    before, after = _accuracy(plain.out / "model.onnx"), _accuracy(healed.out / "model.onnx")
    assert before < 0.8 and after >= 0.93, (before, after)
    # same packed format, same size: only the bits and the alphas moved
    healed_model, plain_model = healed.manifest["model"]["after"], plain.manifest["model"]["after"]
    assert healed_model["weight_bytes"] == plain_model["weight_bytes"]
    assert healed_model["ops"] == plain_model["ops"]


def test_bf16_heal_trains_under_autocast_and_keeps_every_format(tmp_path: Path) -> None:
    """bf16 autocast moves the arithmetic, not the formats: the int4 weights, their scales' type
    and the graph's ops are what the fp32 heal writes; the pruned accuracy still comes back."""
    int4 = "fold-constants,quantize:int4,block=32"
    plain = _export(tmp_path, "int4", int4)
    healed = _export(tmp_path, "bf16", int4 + ",heal:steps=60,precision=bf16")
    fp32 = _export(tmp_path, "fp32", int4 + ",heal:steps=60,precision=fp32")
    for result in (healed, fp32):
        assert result.manifest["model"]["after"]["ops"] == plain.manifest["model"]["after"]["ops"]
        assert result.manifest["model"]["after"]["weight_bytes"] == \
            plain.manifest["model"]["after"]["weight_bytes"]
    types = {}
    for name, result in (("plain", plain), ("bf16", healed)):
        graph = onnx.load(result.out / "model.onnx").graph
        types[name] = {t.name: t.data_type for t in graph.initializer}
    assert types["bf16"] == types["plain"]
    report = _heal_report(healed)
    assert any(n.startswith("precision bf16 (asked)") for n in report["notes"])
    assert _accuracy(healed.out / "model.onnx") >= _accuracy(plain.out / "model.onnx")
    pruned = "fold-constants,prune-channels:ratio=0.5"
    before = _accuracy(_export(tmp_path, "pruned", pruned).out / "model.onnx")
    after = _accuracy(_export(tmp_path, "pruned-bf16", pruned + ",heal:steps=200,precision=bf16")
                      .out / "model.onnx")
    assert after >= before + 0.03 and after >= 0.97, (before, after)


def test_heal_is_deterministic(tmp_path: Path) -> None:
    spec = "fold-constants,prune-channels:ratio=0.5,heal:steps=30"
    a, b = _export(tmp_path, "a", spec), _export(tmp_path, "b", spec)
    for name in ("model.onnx", "manifest.json", "report.md"):
        assert (a.out / name).read_bytes() == (b.out / name).read_bytes(), name
    c = _export(tmp_path, "c", spec + ",seed=1")
    assert (a.out / "model.onnx").read_bytes() != (c.out / "model.onnx").read_bytes()


def test_eval_every_records_the_curve_without_changing_the_training(tmp_path: Path) -> None:
    spec = "fold-constants,prune-channels:ratio=0.5,heal:steps=30"
    plain, curved = _export(tmp_path, "a", spec), _export(tmp_path, "b", spec + ",eval_every=12")
    assert (plain.out / "model.onnx").read_bytes() == (curved.out / "model.onnx").read_bytes()
    note = next(n for n in _heal_report(curved)["notes"] if n.startswith("held-out accuracy"))
    points = [p.split() for p in note.split(": ", 1)[1].split(", ")]
    assert [int(step) for step, _ in points] == [12, 24, 30]
    # the torch module's last score is the exported graph's accuracy, computed here by onnxruntime
    assert float(points[-1][1]) == pytest.approx(_accuracy(curved.out / "model.onnx"), abs=0.003)
    assert "curve" not in json.dumps(curved.manifest)  # its seconds vary run to run
    assert not any(n.startswith("held-out") for n in _heal_report(plain)["notes"])


def test_heal_that_hurts_is_undone(tmp_path: Path) -> None:
    plain = _export(tmp_path, "plain", "fold-constants")
    ruined = _export(tmp_path, "ruined", "fold-constants,heal:steps=20,lr=5.0")
    report = _heal_report(ruined)
    assert report["modified"] is False
    assert any("made the held-out accuracy worse" in n for n in report["notes"])
    assert (ruined.out / "model.onnx").read_bytes() == (plain.out / "model.onnx").read_bytes()
    assert any("heal:" in w and "worse" in w for w in ruined.warnings)


def test_heal_options_are_checked() -> None:
    for spec, word in [("heal:loss=hinge", "loss"), ("heal:steps=0", "steps"),
                       ("heal:alpha=2", "alpha"), ("heal:device=tpu", "device"),
                       ("heal:precision=fp16", "precision"), ("heal:eval_every=-1", "eval_every"),
                       ("heal:eval_every=5,workers=2", "eval_every")]:
        with pytest.raises(PipelineSpecError, match=word):
            Pipeline.parse(spec)
    assert Pipeline.parse("heal:steps=5,lr=0.01").spec() == "heal:steps=5,lr=0.01"


def _digits_npz(path: Path, n: int, labels: bool = True) -> Path:
    split = digits_split()
    arrays = {"image": split.x_train[:n].copy()}
    if labels:
        arrays["labels"] = split.y_train[:n].copy()
    np.savez(path, **arrays)
    return path


def test_cli_train_file(tmp_path: Path) -> None:
    data = _digits_npz(tmp_path / "train.npz", 400)
    out = tmp_path / "out"
    code = main(["export", "digits-cnn", "-o", str(out), "--quiet", "--allow-mismatch",
                 "--passes", "fold-constants,prune-channels:ratio=0.5,heal:steps=40",
                 "--train", str(data)])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    note = next(n for p in manifest["passes"] if p["name"] == "heal" for n in p["notes"]
                if n.startswith("heal:"))
    assert str(data) in note


def test_cli_bad_train_file_writes_nothing(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixels=np.zeros((4, 1, 8, 8), np.float32))
    out = tmp_path / "out"
    code = main(["export", "digits-cnn", "-o", str(out), "--passes", "heal:steps=5",
                 "--train", str(bad)])
    assert code == 2 and not out.exists()
    assert "no array for model input(s) image" in capsys.readouterr().err


def _einsum_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Einsum", ["x", "w"], ["y"], equation="ni,ij->nj", name="mix")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], initializer=[w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_untrainable_op_stops_before_training(tmp_path: Path, capsys) -> None:
    model = _einsum_model(tmp_path / "einsum.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32))
    out = tmp_path / "out"
    code = main(["export", str(model), "-o", str(out), "--passes", "heal:steps=5",
                 "--calib", str(calib)])
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "Einsum (mix)" in err


def test_onnx_file_heals_on_calibration_with_a_warning(tmp_path: Path, tiny_cnn_path: Path) -> None:
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=np.random.default_rng(2).standard_normal((32, 3, 16, 16)).astype(np.float32))
    result = slimgraph.export(tiny_cnn_path, tmp_path / "out", passes="heal:steps=10,lr=1e-4",
                              calibration=calib, allow_mismatch=True)
    report = _heal_report(result)
    assert any("calibration set (24 samples)" in n for n in report["notes"])
    assert any("trained on the calibration set" in w for w in result.warnings)
    with pytest.raises(slimgraph.SlimgraphError, match="needs training data"):
        slimgraph.export(tiny_cnn_path, tmp_path / "none", passes="heal:steps=10")


@pytest.mark.slow
def test_two_workers_train_like_one(tmp_path: Path) -> None:
    one = _export(tmp_path, "one", "fold-constants,prune-channels:ratio=0.5,heal:steps=120")
    two = _export(tmp_path, "two", "fold-constants,prune-channels:ratio=0.5,heal:steps=120,workers=2")
    assert _heal_report(two)["counts"]["workers"] == 2
    acc_one, acc_two = _accuracy(one.out / "model.onnx"), _accuracy(two.out / "model.onnx")
    assert abs(acc_one - acc_two) <= 0.02, (acc_one, acc_two)
    assert acc_two >= 0.95


@pytest.mark.slow
def test_heal_joins_a_torchrun_job(tmp_path: Path) -> None:
    """`torchrun -m slimgraph export ...`: both ranks heal together, rank 0 writes."""
    import subprocess
    import sys

    out = tmp_path / "out"
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "slimgraph", "export",
         "digits-cnn", "-o", str(out), "--quiet", "--allow-mismatch",
         "--passes", "fold-constants,prune-channels:ratio=0.5,heal:steps=20"],
        check=True, cwd=tmp_path, timeout=600,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    heal = next(p for p in manifest["passes"] if p["name"] == "heal")
    assert heal["counts"]["workers"] == 2 and heal["modified"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_device_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: test_heal_on_gpu covers it")
    with pytest.raises(Exception, match="no CUDA device"):
        _export(tmp_path, "cuda", "fold-constants,heal:steps=2,device=cuda")


def test_heal_on_gpu(tmp_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cpu = _export(tmp_path, "cpu", "fold-constants,prune-channels:ratio=0.5,heal:steps=100,device=cpu")
    gpu = _export(tmp_path, "gpu", "fold-constants,prune-channels:ratio=0.5,heal:steps=100,device=cuda")
    acc_cpu, acc_gpu = _accuracy(cpu.out / "model.onnx"), _accuracy(gpu.out / "model.onnx")
    assert abs(acc_cpu - acc_gpu) <= 0.02 and acc_gpu >= 0.95


def test_learn_scales_trains_the_quantization_scales(tmp_path: Path) -> None:
    spec = "fold-constants,quantize:int8,speed_check=false"
    fixed = _export(tmp_path, "fixed", spec + ",heal:steps=40")
    learned = _export(tmp_path, "learned", spec + ",heal:steps=40,learn_scales=true")

    def scales(result) -> dict[str, np.ndarray]:
        model = onnx.load(result.out / "model.onnx")
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        casts = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast"}
        names = {casts.get(n.input[1], n.input[1]) for n in model.graph.node
                 if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
        return {k: inits[k] for k in names if k in inits}

    a, b = scales(fixed), scales(learned)
    assert a.keys() == b.keys() and len(a) >= 5
    assert all(a[k].dtype == b[k].dtype for k in a)  # stored as they were (float16 here)
    assert sum(not np.array_equal(a[k], b[k]) for k in a) >= 3
    plain = _export(tmp_path, "plain", spec)
    assert all(np.array_equal(scales(plain)[k], a[k]) for k in a)  # fixed without the option
    assert _accuracy(learned.out / "model.onnx") >= 0.97
