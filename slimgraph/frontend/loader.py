"""Frontends: resolve MODEL (an .onnx path, `package.module:callable`, or a built-in name) to IR.

Whatever the source, the result carries the float reference that every artifact is verified
against: the torch module itself, or the source ONNX file under onnxruntime.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.calibration import Calibration, Feeds
from slimgraph.errors import DataError, InputSpecError, ModelLoadError
from slimgraph.frontend.inputs import (
    InputShapes,
    _check_builtin_inputs,
    _check_input_names,
    fit_calibration,
    random_feeds,
)
from slimgraph.verify import Runner

DEFAULT_MODEL = "digits-cnn"
VERIFY_SAMPLES = 256  # at most this many samples of evaluation data verify an artifact
RANDOM_BATCHES = 4  # seeded random batches verify a model that comes without data
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")  # routed to load_onnx, which refuses them


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


def check_reference_finite(reference: Runner, feed: Feeds, label: str) -> None:
    """Refuse data on which the float model itself gives NaN or inf: nothing can be calibrated
    or verified against such outputs."""
    for i, out in enumerate(reference(feed)):
        out = np.asarray(out)
        if out.dtype.kind == "f" and not np.isfinite(out).all():
            raise DataError(f"{label}: the float model's output #{i} is not finite on this data "
                            "(values too large for the model?); scale the inputs as in training")
