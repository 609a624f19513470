"""Frontends: resolve MODEL (an .onnx path, `package.module:callable`, or a built-in name) to IR.

Whatever the source, the result carries the float reference that every artifact is verified
against: the torch module itself, or the source ONNX file under onnxruntime.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.calibration import Calibration, Feeds, check_feed_array
from slimgraph.errors import DataError, InputSpecError, ModelLoadError
from slimgraph.verify import Runner

DEFAULT_MODEL = "digits-cnn"
VERIFY_SAMPLES = 256  # at most this many samples of evaluation data verify an artifact
RANDOM_BATCHES = 4  # seeded random batches verify a model that comes without data
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")  # routed to load_onnx, which refuses them

InputShapes = Mapping[str, Sequence[int]]


@dataclasses.dataclass
class LoadedModel:
    """An IR model plus what verification and calibration need to judge what is made from it."""

    model: ir.Model
    source: dict[str, Any]  # kind, name, sha256
    reference: Runner
    verification_feeds: list[Feeds]
    calibration: Calibration | None
    task: str | None  # "classification" makes top-1 agreement binding
    evaluation: Any = None  # builtin.EvalData: the whole held-out set, with labels where known
    module: Any = None  # the torch.nn.Module, when the source is torch (bench's torch peers)
    input_names: list[str] = dataclasses.field(default_factory=list)
    training: Any = None  # () -> builtin.TrainSplit: the built-in's training data, for heal
    assets: list[tuple[Path, str]] = dataclasses.field(default_factory=list)  # (file, name) to ship


def parse_input_spec(spec: str) -> tuple[str, tuple[int, ...]]:
    """``image=1x3x32x32`` -> ("image", (1, 3, 32, 32))."""
    name, eq, dims = spec.partition("=")
    if not eq or not name or not re.fullmatch(r"\d+(x\d+)*", dims.strip()):
        raise InputSpecError(f"--input {spec!r}: expected NAME=DxDxD, e.g. image=1x3x32x32")
    return name.strip(), tuple(int(d) for d in dims.strip().split("x"))


def load(
    model: str | Path | Any = DEFAULT_MODEL,
    *,
    inputs: InputShapes | None = None,
    calibration: Any = None,
    task: str | None = None,
    texts: TextData | None = None,
) -> LoadedModel:
    """Load MODEL: an ``.onnx`` path, a Hugging Face model folder, ``package.module:callable``,
    a built-in name or an nn.Module.

    ``inputs`` gives input shapes (required for a module without example inputs); ``calibration``
    is anything :meth:`Calibration.coerce` accepts and also serves as verification input. ``task``
    and ``texts`` (calibration, evaluation and training texts) apply to a model folder.
    """
    calib = Calibration.coerce(calibration)
    inputs = dict(inputs or {})
    text = str(model) if isinstance(model, (str, Path)) else ""
    if (task is not None or (texts and texts.given())) and not Path(text).is_dir():
        raise InputSpecError("--task and the --*-text options apply to a Hugging Face model folder")
    if not isinstance(model, (str, Path)):
        return _load_torch(model, None, inputs, calib, {"kind": "torch", "name": type(model).__name__})
    path = Path(text)
    if path.is_dir():
        return _load_folder(path, inputs, calib, task, texts or TextData())
    if path.suffix.lower() in (".onnx", *CHECKPOINT_SUFFIXES) or path.exists():
        # load_onnx refuses checkpoints (by suffix and content) without unpickling them
        return _load_onnx_file(path, inputs, calib)
    if ":" in text:
        return _load_callable(text, inputs, calib)
    from slimgraph.frontend.builtin import get_builtin

    return _load_builtin(get_builtin(text), inputs, calib)


def _load_onnx_file(path: Path, inputs: dict, calib: Calibration | None) -> LoadedModel:
    from slimgraph.artifact import sha256_file
    from slimgraph.backends.ort import runner_for, session_for
    from slimgraph.frontend.onnx_file import load_onnx

    model = load_onnx(path)
    _check_input_names(model, inputs, str(path))
    calib = fit_calibration(model, calib)
    try:
        reference = runner_for(session_for(path))
    except Exception as exc:  # onnxruntime's own exception types
        raise ModelLoadError(f"{path}: onnxruntime cannot run the source model: {exc}") from exc
    feeds = calib.batched(16)[: max(1, VERIFY_SAMPLES // 16)] if calib else [
        random_feeds(model, inputs, seed=seed) for seed in range(RANDOM_BATCHES)
    ]
    if calib:
        check_reference_finite(reference, feeds[0], calib.source)
    source = {"kind": "onnx", "name": str(path), "sha256": sha256_file(path)}
    return LoadedModel(model, source, reference, feeds, calib, None, None, None,
                       [v.name for v in model.graph.inputs])


def _load_callable(spec: str, inputs: dict, calib: Calibration | None) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # like `python -m`: the current project is importable
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"{spec}: cannot import {attr!r} from {module_name!r}: {exc}") from exc
    try:
        made = factory()
    except Exception as exc:  # user code: report whatever it raised
        raise ModelLoadError(f"{spec}: calling it raised {type(exc).__name__}: {exc}") from exc
    module, example = (made if isinstance(made, tuple) else (made, None))
    return _load_torch(module, example, inputs, calib, {"kind": "torch", "name": spec})


def _load_torch(module, example, inputs: dict, calib: Calibration | None,
                source: dict[str, Any]) -> LoadedModel:
    import torch

    from slimgraph.frontend.torch_export import export_module, torch_outputs

    label = source["name"]
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"{label}: expected a torch.nn.Module, got {type(module).__name__}")
    if example is None:
        if not inputs:
            raise InputSpecError(
                f"{label}: a torch module needs example inputs: pass --input NAME=DxD... for each "
                "input, or return (module, example_inputs) from the callable"
            )
        gen = torch.Generator().manual_seed(0)
        example = tuple(torch.randn(*shape, generator=gen) for shape in inputs.values())
        names = list(inputs)
    else:
        example = tuple(example) if isinstance(example, (tuple, list)) else (example,)
        names = list(inputs) if inputs else [f"input_{i}" for i in range(len(example))]
        if len(names) != len(example):
            raise InputSpecError(f"{label}: {len(example)} example inputs but --input names {names}")
    model = export_module(module, example, names, label=label)
    source["sha256"] = _proto_sha256(model)
    calib = fit_calibration(model, calib)
    feeds = calib.batched(16)[: max(1, VERIFY_SAMPLES // 16)] if calib else _example_feeds(
        names, example
    )
    reference = _torch_runner(module, names, torch_outputs)
    if calib:
        check_reference_finite(reference, feeds[0], calib.source)
    return LoadedModel(model, source, reference, feeds, calib, None, None, module, names)


def _example_feeds(names: list[str], example: tuple) -> list[Feeds]:
    """The example inputs, plus seeded N(0,1) batches of the same shapes for float inputs."""
    first = {n: t.detach().numpy() for n, t in zip(names, example, strict=True)}
    feeds = [first]
    for seed in range(1, RANDOM_BATCHES):
        rng = np.random.default_rng(seed)
        feeds.append({
            n: rng.standard_normal(a.shape).astype(a.dtype) if np.issubdtype(a.dtype, np.floating)
            else a for n, a in first.items()
        })
    return feeds


@dataclasses.dataclass
class TextData:
    """Text files (one text per line) for a model folder: calibration, verification, healing."""

    calibration: str | Path | None = None
    evaluation: str | Path | None = None
    training: str | Path | None = None

    def given(self) -> bool:
        return any(x is not None for x in (self.calibration, self.evaluation, self.training))

    def read(self) -> dict[str, list[str] | None]:
        from slimgraph.frontend.text import read_texts

        return {f"{what}_texts": None if path is None else read_texts(path, what)
                for what, path in (("calibration", self.calibration),
                                   ("evaluation", self.evaluation), ("training", self.training))}


def _load_folder(path: Path, inputs: dict, calib: Calibration | None, task: str | None,
                 texts: TextData) -> LoadedModel:
    from slimgraph.frontend import hf_folder

    read = texts.read()  # an empty or unreadable text file stops before the model loads
    builtin = hf_folder.build(path, task=task, **read)
    loaded = _load_builtin(builtin, inputs, calib)
    loaded.source = {"kind": "hf-folder", "name": str(path), "task": builtin.folder_task,
                     "sha256": loaded.source["sha256"]}
    loaded.assets = [(path / f, f.as_posix()) for f in hf_folder.tokenizer_files(path)]
    return loaded


def _load_builtin(builtin, inputs: dict, calib: Calibration | None) -> LoadedModel:
    from slimgraph.frontend.torch_export import export_module, torch_outputs

    if inputs:
        _check_builtin_inputs(builtin, inputs)
    model = export_module(builtin.module, builtin.example_inputs, builtin.input_names,
                          builtin.output_names, max_sequence=builtin.max_sequence,
                          label=builtin.name)
    evaluation = builtin.evaluation()
    feeds, samples = [], 0
    for feed in evaluation.feeds:
        if samples >= VERIFY_SAMPLES:
            break
        feeds.append(feed)
        samples += next(iter(feed.values())).shape[0]
    reference = _torch_runner(builtin.module, builtin.input_names, torch_outputs)
    if calib is None:
        calib = Calibration(builtin.calibration(64), f"{builtin.name}'s calibration set")
    else:
        calib = fit_calibration(model, calib)
        check_reference_finite(reference, calib.batched(16)[0], calib.source)
    source = {"kind": "builtin", "name": builtin.name, "sha256": _proto_sha256(model)}
    return LoadedModel(model, source, reference, feeds, calib, builtin.task, evaluation,
                       builtin.module, list(builtin.input_names), builtin.training)


def _torch_runner(module, names: list[str], torch_outputs) -> Runner:
    import torch

    def run(feeds: Feeds) -> list[np.ndarray]:
        return torch_outputs(module, [torch.from_numpy(np.asarray(feeds[n])) for n in names])

    return run


def _proto_sha256(model: ir.Model) -> str:
    return hashlib.sha256(ir.to_proto(model).SerializeToString(deterministic=True)).hexdigest()


def _check_input_names(model: ir.Model, inputs: dict, label: str) -> None:
    names = [v.name for v in model.graph.inputs]
    for name, shape in inputs.items():
        value = next((v for v in model.graph.inputs if v.name == name), None)
        if value is None:
            raise InputSpecError(f"--input {name}: {label} has no input {name!r}; inputs: {names}")
        _check_shape(value, shape, label, f"--input {name}={'x'.join(map(str, shape))}")


def _check_shape(value: ir.Value, shape: Sequence[int], label: str, subject: str) -> None:
    """Refuse ``shape`` (given by ``subject``) where it contradicts the input's static dims."""
    dims = list(value.shape) if value.shape is not None else None
    if dims is None:
        return
    if len(dims) != len(shape):
        raise InputSpecError(
            f"{subject}: {label} input {value.name!r} has rank {len(dims)} "
            f"(shape {_shape_text(dims)}), not {len(shape)}"
        )
    for i, (d, s) in enumerate(zip(dims, shape, strict=True)):
        if isinstance(d, int) and d != s:
            raise InputSpecError(
                f"{subject}: dim {i} is {s} but {label} input {value.name!r} "
                f"has shape {_shape_text(dims)}"
            )


def _check_builtin_inputs(builtin, inputs: dict) -> None:
    for name, shape in inputs.items():
        if name not in builtin.input_names:
            raise InputSpecError(
                f"--input {name}: built-in {builtin.name!r} has inputs {builtin.input_names}"
            )
        example = builtin.example_inputs[builtin.input_names.index(name)]
        if tuple(shape[1:]) != tuple(example.shape[1:]):
            raise InputSpecError(
                f"--input {name}={'x'.join(map(str, shape))}: built-in {builtin.name!r} takes "
                f"{name} of shape Nx{'x'.join(map(str, example.shape[1:]))}"
            )


def _shape_text(dims: Sequence) -> str:
    return "x".join(str(d) if isinstance(d, int) else str(d or "?") for d in dims)


def for_single_input(model: ir.Model, calib: Calibration | None) -> Calibration | None:
    """A single-input model takes the only array of each calibration feed whatever its name
    (an .npz saved as ``x`` for a torch callable whose input is ``input_0``); else ``calib``."""
    inputs = model.graph.inputs
    if calib is None or len(inputs) != 1 or not calib.feeds:
        return calib
    name = inputs[0].name
    if all(len(f) == 1 and name not in f for f in calib.feeds):
        return Calibration([{name: next(iter(f.values()))} for f in calib.feeds], calib.source)
    return calib


def fit_calibration(model: ir.Model, calib: Calibration | None) -> Calibration | None:
    """``calib`` with every feed checked against the model's inputs and cast to their types."""
    calib = for_single_input(model, calib)
    if calib is None:
        return None
    if not calib.feeds:
        raise DataError(f"{calib.source}: holds no samples")
    return Calibration([check_feed(model, f, calib.source) for f in calib.feeds], calib.source)


def check_feed(model: ir.Model, feed: Feeds, label: str) -> Feeds:
    """The model's inputs taken from ``feed`` (named by ``label`` in messages), each checked by
    ``check_feed_array``, of a shape the model accepts and cast to the input's element type."""
    fitted = {}
    for value in model.graph.inputs:
        if value.name not in feed:
            raise InputSpecError(f"{label}: no array for input {value.name!r}; arrays: "
                                 f"{', '.join(sorted(feed)) or 'none'}")
        array = check_feed_array(label, value.name, np.asarray(feed[value.name]))
        shape = "x".join(map(str, array.shape))
        _check_shape(value, array.shape, "the model", f"{label}: array {value.name!r} of shape {shape}")
        fitted[value.name] = _as_input_type(value, array, label)
    return fitted


def _as_input_type(value: ir.Value, array: np.ndarray, label: str) -> np.ndarray:
    """``array`` cast to the input's type where that keeps every value: any number into a float
    input (finite after the cast), integers that fit into an integer input."""
    want = _NUMPY_DTYPES.get(value.dtype) if value.dtype is not None else None
    if want is None or array.dtype == want:
        return array
    want = np.dtype(want)
    if want.kind == "f" and array.dtype.kind in "biuf":
        cast = array.astype(want)
        if not np.isfinite(cast).all():
            raise DataError(f"{label}: array {value.name!r} holds values beyond the {want} range "
                            f"of the model's input")
        return cast
    if want.kind in "iu" and array.dtype.kind in "biu":
        info = np.iinfo(want)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise DataError(f"{label}: array {value.name!r} holds values outside the {want} range "
                            f"of the model's input ({array.min()} .. {array.max()})")
        return array.astype(want)
    raise InputSpecError(f"{label}: array {value.name!r} is {array.dtype} but the model's input "
                         f"{value.name!r} takes {want}")


def check_reference_finite(reference: Runner, feed: Feeds, label: str) -> None:
    """Refuse data on which the float model itself gives NaN or inf: nothing can be calibrated
    or verified against such outputs."""
    for i, out in enumerate(reference(feed)):
        out = np.asarray(out)
        if out.dtype.kind == "f" and not np.isfinite(out).all():
            raise DataError(f"{label}: the float model's output #{i} is not finite on this data "
                            "(values too large for the model?); scale the inputs as in training")


_NUMPY_DTYPES = {
    ir.DataType.FLOAT: np.float32, ir.DataType.DOUBLE: np.float64,
    ir.DataType.FLOAT16: np.float16, ir.DataType.INT64: np.int64, ir.DataType.INT32: np.int32,
    ir.DataType.INT8: np.int8, ir.DataType.UINT8: np.uint8, ir.DataType.BOOL: np.bool_,
}


def random_feeds(model: ir.Model, inputs: InputShapes | None = None, seed: int = 0,
                 batch: int = 2) -> Feeds:
    """Deterministic inputs for a model without data: N(0,1) floats, small non-negative ints.

    Shapes come from ``inputs`` where given, else the graph's; symbolic dims read as ``batch``.
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        if inputs and value.name in inputs:
            shape = tuple(inputs[value.name])
        elif value.shape is not None:
            shape = tuple(d if isinstance(d, int) else batch for d in value.shape)
        else:
            raise InputSpecError(f"input {value.name!r} has no shape: pass --input {value.name}=...")
        dtype = value.dtype
        np_dtype = _NUMPY_DTYPES.get(dtype) if dtype is not None else None
        if np_dtype is None:
            raise InputSpecError(
                f"input {value.name!r} has type {dtype}; pass real data with --calib FILE.npz"
            )
        if np.issubdtype(np_dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(np_dtype)
        elif np_dtype is np.bool_:
            feeds[value.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[value.name] = rng.integers(0, 10, shape).astype(np_dtype)
    return feeds


__all__ = ["DEFAULT_MODEL", "LoadedModel", "load", "parse_input_spec", "random_feeds"]
