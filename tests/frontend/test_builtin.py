"""The built-in models: construction, data, shipped weights, and dynamo export parity with ORT."""

from __future__ import annotations

import collections
import functools
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from slimgraph.errors import ModelLoadError
from slimgraph.frontend.builtin import BUILTINS, BuiltinModel, builtin_names, get_builtin

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
digits = pytest.importorskip("slimgraph.frontend.builtin.digits")

FAST = ["digits-cnn", "mlp", "lstm", "resnet-tiny"]
ALL = [*FAST, pytest.param("resnet18", marks=pytest.mark.slow),
       pytest.param("efficientnet-lite1", marks=pytest.mark.slow),
       pytest.param("minilm", marks=pytest.mark.slow)]
OUTPUT_WIDTH = {"digits-cnn": 10, "mlp": 10, "lstm": 10, "resnet-tiny": 10, "resnet18": 10,
                "efficientnet-lite1": 1000, "minilm": 384}
DIGITS_MODELS = {"digits-cnn": "digits_cnn", "mlp": "mlp", "lstm": "lstm"}


@functools.cache
def built(name: str) -> BuiltinModel:
    return get_builtin(name)


@functools.cache
def exported(name: str) -> onnx.ModelProto:
    """torch.onnx.export(dynamo=True) with dim 0 of every input dynamic, as the frontend does."""
    model = built(name)
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        model.module,
        model.example_inputs,
        dynamo=True,
        input_names=model.input_names,
        output_names=model.output_names,
        dynamic_shapes=tuple({0: batch} for _ in model.example_inputs),
        verbose=False,
    )
    return program.model_proto


def run_torch(model: BuiltinModel, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model.module(*(torch.from_numpy(feeds[n]) for n in model.input_names)).numpy()


def test_registry_names_and_descriptions() -> None:
    assert builtin_names() == list(BUILTINS) == [*FAST, "resnet18", "efficientnet-lite1", "minilm"]
    for description, factory in BUILTINS.values():
        assert description and "\n" not in description
        assert callable(factory)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ModelLoadError) as info:
        get_builtin("resnet-huge")
    message = str(info.value)
    assert "resnet-huge" in message
    assert all(name in message for name in builtin_names())


def test_importing_the_package_is_lazy() -> None:
    code = (
        "import sys, slimgraph.frontend.builtin as b; b.builtin_names(); "
        "print(sorted(m for m in ('torch', 'transformers', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ALL)
def test_constructs_with_consistent_shapes(name: str) -> None:
    model = built(name)
    assert model.name == name and model.description
    assert not model.module.training
    assert all(p.dtype == torch.float32 for p in model.module.parameters())
    assert len(model.example_inputs) == len(model.input_names)
    assert all(t.shape[0] >= 2 for t in model.example_inputs)
    assert len(model.output_names) == 1
    with torch.no_grad():
        out = model.module(*model.example_inputs)
    assert out.shape == (model.example_inputs[0].shape[0], OUTPUT_WIDTH[name])
    assert out.dtype == torch.float32

    for feed in model.calibration(3):
        assert list(feed) == model.input_names
        for input_name, example in zip(model.input_names, model.example_inputs, strict=True):
            assert feed[input_name].shape == (1, *example.shape[1:])
            assert feed[input_name].dtype == example.numpy().dtype

    data = model.evaluation()
    assert data.feeds
    for feed in data.feeds:
        assert list(feed) == model.input_names
    if model.task == "classification" and data.labels is not None:
        assert len(data.labels) == len(data.feeds)
        for feed, labels in zip(data.feeds, data.labels, strict=True):
            assert labels.dtype == np.int64
            assert labels.shape == (len(feed[model.input_names[0]]),)
    if name == "minilm":
        assert model.task == "embedding"
        np.testing.assert_allclose(np.linalg.norm(out.numpy(), axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_data_is_deterministic(name: str) -> None:
    model = built(name)
    first, again = model.calibration(6), model.calibration(6)
    prefix = model.calibration(2)
    for a, b in zip(first, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    for a, b in zip(prefix, first[:2], strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # Feeds are copies: writing to one does not change the next call's data.
    first[0][model.input_names[0]][...] = 0
    np.testing.assert_array_equal(
        model.calibration(1)[0][model.input_names[0]], again[0][model.input_names[0]]
    )
    one, two = model.evaluation(), model.evaluation()
    for a, b in zip(one.feeds, two.feeds, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("name", FAST)
def test_rebuild_gives_the_same_module(name: str) -> None:
    a, b = built(name).module.state_dict(), get_builtin(name).module.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "name",
    [
        "digits-cnn",
        "mlp",
        pytest.param("lstm", marks=pytest.mark.slow),
        pytest.param("resnet-tiny", marks=pytest.mark.slow),
        pytest.param("resnet18", marks=pytest.mark.slow),
        pytest.param("minilm", marks=pytest.mark.slow),
    ],
)
def test_dynamo_export_matches_torch_in_onnxruntime(name: str) -> None:
    model = built(name)
    proto = exported(name)
    onnx.checker.check_model(proto, full_check=True)

    graph = proto.graph
    assert [i.name for i in graph.input] == model.input_names
    assert [o.name for o in graph.output] == model.output_names
    for value in graph.input:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    defined = [i.name for i in graph.input] + [i.name for i in graph.initializer]
    defined += [o for node in graph.node for o in node.output if o]
    duplicates = [n for n, c in collections.Counter(defined).items() if c > 1]
    assert not duplicates, f"values defined more than once: {duplicates}"

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    calibration = model.calibration(5)
    batches = [
        *model.evaluation().feeds,
        {k: np.concatenate([f[k] for f in calibration]) for k in model.input_names},
        calibration[0],
    ]
    for feeds in batches:
        (got,) = session.run(None, feeds)
        np.testing.assert_allclose(got, run_torch(model, feeds), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(DIGITS_MODELS))
def test_shipped_weights_reach_recorded_accuracy(name: str) -> None:
    stem = DIGITS_MODELS[name]
    shipped = digits.WEIGHTS_DIR / f"{stem}.safetensors"
    assert shipped.exists() and digits.weights_path(stem) == shipped
    assert shipped.stat().st_size < 512 * 1024
    record = json.loads(shipped.with_suffix(".json").read_text())
    split = digits.digits_split()
    assert (record["train_size"], record["test_size"]) == (len(split.x_train), len(split.x_test))
    assert record["seed"] == digits.SEED and record["epochs"] > 0

    model = built(name)
    data = model.evaluation()
    assert data.labels is not None
    correct = sum(
        int((run_torch(model, feeds).argmax(1) == labels).sum())
        for feeds, labels in zip(data.feeds, data.labels, strict=True)
    )
    total = sum(len(labels) for labels in data.labels)
    assert total == record["test_size"]
    accuracy = correct / total
    assert accuracy == pytest.approx(record["test_accuracy"], abs=1.5 / total)
    assert accuracy >= (0.97 if name == "digits-cnn" else 0.95)


@pytest.mark.slow
def test_missing_weights_are_trained_into_the_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(digits, "WEIGHTS_DIR", tmp_path / "shipped")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = get_builtin("lstm")
    cached = tmp_path / "cache" / "slimgraph" / "weights"
    assert (cached / "lstm.safetensors").exists()
    record = json.loads((cached / "lstm.json").read_text())
    assert record["test_accuracy"] >= 0.9
    assert "top-1" in model.description
