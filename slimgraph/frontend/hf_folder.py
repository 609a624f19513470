"""Hugging Face model folders: config.json + model.safetensors + tokenizer files, the layout every
transformers user holds a model in (``save_pretrained``), loaded as a built-in is.

The task comes from the folder: sentence-transformers' ``modules.json`` (a Pooling module: mean or
CLS pooling, then L2 normalisation where a Normalize module follows) makes a sentence embedder;
otherwise ``architectures`` in config.json: ``*ForSequenceClassification`` -> text-classification
(logits [N, labels], top-1 agreement binds), ``*ForTokenClassification`` -> token-classification
(logits [N, L, labels]), ``*ForMaskedLM`` -> fill-mask (logits [N, L, vocab]), a bare ``*Model``
-> feature-extraction (last_hidden_state). ``task=`` overrides.

Inputs are ``input_ids`` and ``attention_mask`` from the folder's own tokenizer; the batch and
sequence axes are dynamic (up to ``max_position_embeddings``). Calibration and verification texts
are padded to ``MAX_LENGTH`` tokens. Only safetensors weights are read: a folder with
only pickled weights (``pytorch_model.bin``) is refused, nothing is unpickled. The folder is data:
``read_folder`` checks its JSON files, refuses custom code (``auto_map``, classes transformers does
not ship) and any file or path that leads out of it, before transformers reads it. Texts for
calibration and verification default to ``text.EVERYDAY_SENTENCES``; healing trains on general
English read from installed packages (``corpora``) unless given its own.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slimgraph.errors import InputSpecError, ModelLoadError
from slimgraph.frontend.builtin import BuiltinModel, EvalData, TrainSplit

MAX_LENGTH = 64
CALIBRATION_TEXTS = 48  # of the default sentences; the rest verify
EVAL_BATCH = 8
HEAL_HELD_OUT = 256
TASKS = ("feature-extraction", "text-classification", "token-classification", "fill-mask")
_ARCHITECTURE_TASKS = (
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForMaskedLM", "fill-mask"),
    ("Model", "feature-extraction"),
)
# What a deployed artifact needs beside model.onnx to turn text into its inputs and read its outputs.
TOKENIZER_FILES = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "spiece.model",
    "sentencepiece.bpe.model", "modules.json", "1_Pooling/config.json",
)
# At least one of these is a tokenizer's vocabulary; the rest of TOKENIZER_FILES only configure it.
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                    "tokenizer.model")
CONVERT_HINT = (
    "convert it once in an environment you trust: python -c \"from transformers import AutoModel; "
    "AutoModel.from_pretrained('DIR').save_pretrained('DIR', safe_serialization=True)\""
)
MAX_JSON_BYTES = 64 << 20  # config, modules, pooling, tokenizer config and shard index files
MAX_SIZE = 1 << 24  # bound on every size in config.json (vocabulary, widths, depth, positions)
# config.json sizes: integers in [minimum, MAX_SIZE] where present (DeBERTa-v3 has no token types).
_SIZES = {name: 1 for name in (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings", "num_labels", "embedding_size", "dim", "hidden_dim", "n_layers", "n_heads",
    "d_model", "d_ff", "d_kv", "num_layers", "num_heads", "n_embd", "n_layer", "n_head", "n_positions",
)} | {"type_vocab_size": 0}
# sentence-transformers modules slimgraph reproduces; any other would be silently dropped.
_SENTENCE_MODULES = ("Transformer", "Pooling", "Normalize")
_POOLINGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


@dataclasses.dataclass(frozen=True)
class FolderSpec:
    """What a model folder's JSON files say, validated before transformers reads the folder."""

    folder: Path
    model_type: str
    architectures: tuple[str, ...]
    max_position_embeddings: int
    pooling: tuple[str, bool] | None  # (mean | cls, L2-normalised) for a sentence-transformers folder


def is_model_folder(path: Path) -> bool:
    return path.is_dir()


def read_folder(folder: Path) -> FolderSpec:
    """Every check on a folder before transformers sees it: its JSON files' types, no custom code,
    files that stay inside it, safetensors weights that open, and tokenizer files present."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"{folder}: is a directory without config.json, not a Hugging Face model folder. Pass "
            "an .onnx file, or a folder saved with transformers' save_pretrained"
        )
    config = _read_json(folder, config_file)
    _check_config_types(config_file, config)
    check_weights(folder)
    model_type, architectures = _native_model(config_file, config)
    pooling = sentence_pooling(folder)
    _check_tokenizer(folder)
    _check_weight_files(folder)
    for name in TOKENIZER_FILES:  # shipped in the artifact: never a file from elsewhere
        if (folder / name).is_file():
            _inside(folder, folder / name, str(folder / name))
    return FolderSpec(folder, model_type, architectures, config.get("max_position_embeddings", 512), pooling)


def _read_json(folder: Path, path: Path) -> Any:
    """A JSON file of the folder, which must lie inside it; NaN and Infinity are refused."""
    _inside(folder, path, str(path))

    def non_finite(word: str) -> None:
        raise ValueError(f"{word} is not a JSON number")

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):  # 1e999 reads as inf
            raise ValueError(f"{text} is not a finite number")
        return value

    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ModelLoadError(f"{path}: over {MAX_JSON_BYTES >> 20} MiB, too large for a JSON config")
        return json.loads(path.read_bytes().decode("utf-8"), parse_constant=non_finite, parse_float=finite)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelLoadError(f"{path}: not a readable JSON file ({_one_line(exc)})") from exc


def _inside(folder: Path, path: Path, where: str) -> None:
    """Refuse ``path`` (named by ``where``) unless, symlinks resolved, it lies inside ``folder`` (or,
    for a folder that is a Hugging Face cache snapshot, in the blobs store its files link to)."""
    root = folder.resolve()
    roots = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    resolved = path.resolve()
    if not any(resolved.is_relative_to(r) for r in roots):
        raise ModelLoadError(f"{where} leads to {resolved}, outside the folder {folder}; refused")


def _relative_path(folder: Path, file: Path, key: str, value: Any) -> Path:
    """A path named inside ``file``: a relative string without '..' that stays inside ``folder``."""
    if not isinstance(value, str):
        raise ModelLoadError(f"{file}: {key} is {_kind(value)}, not a path string")
    path = Path(value)
    if path.is_absolute() or ".." in path.parts:
        raise ModelLoadError(f"{file}: {key} {value!r} must be a path relative to the folder, without '..'")
    _inside(folder, folder / path, f"{file}: {key} {value!r}")
    return folder / path


def _check_config_types(path: Path, config: Any) -> None:
    """The keys slimgraph and transformers read from config.json, by type, before either uses them."""
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: holds {_kind(config)}, not a JSON object")
    _refuse_custom_code(path, config)
    if "quantization_config" in config:
        raise ModelLoadError(f"{path}: key 'quantization_config': a pre-quantized model; export the float "
                             "model (slimgraph quantizes it itself)")
    architectures = config.get("architectures", [])
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(a, str) and a for a in architectures)):
        raise ModelLoadError(f"{path}: key 'architectures' is {_kind(architectures)}, not a list of "
                             "class names")
    if not isinstance(config.get("model_type", ""), str):
        raise ModelLoadError(f"{path}: key 'model_type' is {_kind(config['model_type'])}, not a string")
    for key in ("tokenizer_class", "hidden_act"):
        if not isinstance(config.get(key, ""), str | None):
            raise ModelLoadError(f"{path}: key {key!r} is {_kind(config[key])}, not a string")
    for key, minimum in _SIZES.items():
        value = config.get(key, minimum)
        if not (isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= MAX_SIZE):
            raise ModelLoadError(f"{path}: key {key!r} is {_kind(value)}; expected an integer from "
                                 f"{minimum} to {MAX_SIZE}")
    id2label, label2id = config.get("id2label", {}), config.get("label2id", {})
    if not (isinstance(id2label, dict)
            and all(k.isdigit() and isinstance(v, str) for k, v in id2label.items())):
        raise ModelLoadError(f"{path}: key 'id2label' must map label numbers (\"0\") to names")
    if not (isinstance(label2id, dict) and all(isinstance(v, int) and not isinstance(v, bool)
                                               for v in label2id.values())):
        raise ModelLoadError(f"{path}: key 'label2id' must map label names to integers")


def _refuse_custom_code(path: Path, config: dict) -> None:
    """``auto_map`` makes transformers import the folder's own Python: never done here."""
    if "auto_map" in config:
        raise ModelLoadError(f"{path}: key 'auto_map' asks to run the folder's own Python code; slimgraph "
                             "never runs code from a model folder (only architectures transformers ships)")


def _native_model(path: Path, config: dict) -> tuple[str, tuple[str, ...]]:
    """(model_type, architectures), each one that transformers implements itself."""
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    native = set()
    for name in dir(modeling_auto):
        if name.endswith("_MAPPING_NAMES"):
            for classes in getattr(modeling_auto, name).values():
                native.update(classes if isinstance(classes, (tuple, list)) else [classes])
    architectures = tuple(config.get("architectures") or ())
    unknown = [a for a in architectures if a not in native]
    if unknown:
        raise ModelLoadError(f"{path}: key 'architectures': unknown architecture {unknown} (not a model "
                             "class transformers ships; custom code is never run)")
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        what = "missing" if model_type is None else f"{model_type!r}, not a model type transformers ships"
        raise ModelLoadError(f"{path}: key 'model_type' is {what}; custom code is never run")
    return model_type, architectures


def check_weights(folder: Path) -> None:
    """Safetensors present, or a refusal that says how to convert pickled weights."""
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return
    pickled = [p.name for p in sorted(folder.glob("pytorch_model*.bin"))]
    if pickled:
        raise ModelLoadError(
            f"{folder}: holds only pickled weights ({', '.join(pickled)}); slimgraph reads "
            f"safetensors only and never unpickles a model file; {CONVERT_HINT}"
        )
    raise ModelLoadError(f"{folder}: no model.safetensors (weights) in the folder")


def _check_weight_files(folder: Path) -> None:
    """model.safetensors, or each shard the index names, inside the folder with a header that opens."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        _check_safetensors(folder, single)
        return
    weight_map = _read_json(folder, index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not (isinstance(weight_map, dict) and weight_map):
        raise ModelLoadError(f"{index}: key 'weight_map' must map tensor names to shard files")
    for shard in sorted({_relative_path(folder, index, "weight_map", name) for name in weight_map.values()}):
        if not shard.is_file():
            raise ModelLoadError(f"{index}: names shard {shard.name}, which is not in the folder")
        _check_safetensors(folder, shard)


def _check_safetensors(folder: Path, path: Path) -> None:
    """safetensors checks the header (size, JSON, dtypes, offsets against the file's length)."""
    from safetensors import SafetensorError, safe_open

    _inside(folder, path, str(path))
    try:
        with safe_open(path, framework="np"):
            pass
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{path}: not a valid safetensors file ({_one_line(exc)})") from exc


def sentence_pooling(folder: Path) -> tuple[str, bool] | None:
    """(pooling, normalise) where ``modules.json`` makes the folder a sentence-transformers
    embedder, else None."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    modules = _read_json(folder, modules_file)
    if not isinstance(modules, list):
        raise ModelLoadError(f"{modules_file}: holds {_kind(modules)}, not a list of modules")
    paths: dict[str, Path] = {}
    for i, module in enumerate(modules):
        if not isinstance(module, dict):
            raise ModelLoadError(f"{modules_file}: entry {i} is {_kind(module)}, not an object")
        kind = module.get("type")
        if not isinstance(kind, str):
            raise ModelLoadError(f"{modules_file}: entry {i} key 'type' is {_kind(kind)}, not a string")
        if not kind.startswith("sentence_transformers."):
            raise ModelLoadError(f"{modules_file}: entry {i} type {kind!r} is not a sentence-transformers "
                                 "module; a folder's own modules are never imported")
        short = kind.rsplit(".", 1)[-1]
        if short not in _SENTENCE_MODULES or short in paths:
            raise ModelLoadError(f"{modules_file}: entry {i} type {kind!r}: slimgraph reproduces one "
                                 f"each of {', '.join(_SENTENCE_MODULES)} only")
        paths[short] = _relative_path(folder, modules_file, f"entry {i} key 'path'", module.get("path", ""))
    if paths.get("Transformer", folder).resolve() != folder.resolve():
        raise ModelLoadError(f"{modules_file}: the Transformer module must be the folder itself (path \"\")")
    if "Pooling" not in paths:
        return None
    return _pooling_mode(folder, paths["Pooling"] / "config.json"), "Normalize" in paths


def _pooling_mode(folder: Path, config: Path) -> str:
    """mean or cls, from a Pooling module's config.json (mean where it has none)."""
    if not config.is_file():
        return "mean"
    settings = _read_json(folder, config)
    if not isinstance(settings, dict):
        raise ModelLoadError(f"{config}: holds {_kind(settings)}, not a JSON object")
    modes = {k: v for k, v in settings.items() if k.startswith("pooling_mode_")}
    for key, value in modes.items():
        if not isinstance(value, bool):
            raise ModelLoadError(f"{config}: key {key!r} is {_kind(value)}, not true or false")
    chosen = [k for k, v in modes.items() if v]
    if not chosen:
        return "mean"
    if len(chosen) > 1 or chosen[0] not in _POOLINGS:
        raise ModelLoadError(f"{config}: pooling {chosen}: only one of mean and CLS-token pooling is "
                             "supported")
    return _POOLINGS[chosen[0]]


def _check_tokenizer(folder: Path) -> None:
    """A vocabulary file present; tokenizer_config.json without custom code or paths out of the folder."""
    if not any((folder / name).is_file() for name in VOCABULARY_FILES):
        raise ModelLoadError(f"{folder}: no tokenizer files (one of {', '.join(VOCABULARY_FILES)}); save "
                             "the tokenizer into the folder with save_pretrained")
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    settings = _read_json(folder, path)
    if not isinstance(settings, dict):
        raise ModelLoadError(f"{path}: holds {_kind(settings)}, not a JSON object")
    _refuse_custom_code(path, settings)
    if not isinstance(settings.get("tokenizer_class"), str | None):
        raise ModelLoadError(f"{path}: key 'tokenizer_class' is {_kind(settings['tokenizer_class'])}, "
                             "not a string")
    for key, value in settings.items():
        if key.endswith("_file") and value is not None:
            _relative_path(folder, path, f"key {key!r}", value)


def detect_task(spec: FolderSpec, task: str | None) -> str:
    if task is not None:
        if task not in TASKS:
            raise InputSpecError(f"--task {task!r}: valid tasks are {', '.join(TASKS)}")
        return task
    if spec.pooling is not None:
        return "feature-extraction"
    for architecture in spec.architectures:
        for suffix, found in _ARCHITECTURE_TASKS:
            if architecture.endswith(suffix):
                return found
    listed = list(spec.architectures) or "(none listed)"
    raise ModelLoadError(f"{spec.folder / 'config.json'}: no task for architecture {listed}; pass --task "
                         f"(one of {', '.join(TASKS)})")


def _make_module(spec: FolderSpec, task: str):
    import torch
    import torch.nn.functional as F
    import transformers
    from safetensors import SafetensorError
    from torch import nn

    folder = spec.folder
    auto = {
        "feature-extraction": transformers.AutoModel,
        "text-classification": transformers.AutoModelForSequenceClassification,
        "token-classification": transformers.AutoModelForTokenClassification,
        "fill-mask": transformers.AutoModelForMaskedLM,
    }[task]
    try:
        # Eager attention exports as plain MatMul/Softmax; SDPA adds IsNaN/Where guards.
        model, info = auto.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                           trust_remote_code=False, dtype=torch.float32,
                                           attn_implementation="eager", output_loading_info=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError, ImportError,
            SafetensorError, *_strict_config_errors()) as exc:
        raise ModelLoadError(f"{folder}: transformers cannot load it for {task}: {_one_line(exc)}") from exc
    missing = sorted(info["missing_keys"])
    if missing:
        raise ModelLoadError(f"{folder}: its weights lack {len(missing)} tensor(s) {type(model).__name__} "
                             f"needs for {task} (e.g. {missing[0]}); they would be random")
    pooling = spec.pooling if task == "feature-extraction" else None

    class FolderModel(nn.Module):
        """``input_ids``, ``attention_mask`` (int64 [N, L]) -> the task's output."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = model  # the name the built-in minilm always had: initializer names stay

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
            if task != "feature-extraction":
                return out.logits
            states = out.last_hidden_state
            if pooling is None:
                return states
            kind, normalise = pooling
            if kind == "cls":
                pooled = states[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(states.dtype)
                pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return F.normalize(pooled, p=2, dim=1) if normalise else pooled

    output = {"text-classification": "logits", "token-classification": "logits",
              "fill-mask": "logits"}.get(task, "sentence_embedding" if pooling else "last_hidden_state")
    return FolderModel().eval(), output, pooling is not None


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # tokenizers' Rust errors are bare Exception: name the folder and the cause
        raise ModelLoadError(f"{folder}: its tokenizer does not load ({type(exc).__name__}: "
                             f"{_one_line(exc)})") from exc


def _strict_config_errors() -> tuple[type[Exception], ...]:
    """huggingface_hub's typed-config validation error (transformers 5 configs), where it exists."""
    from huggingface_hub import errors

    error = getattr(errors, "StrictDataclassError", None)
    return (error,) if error is not None else ()


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """A library's exception text on one line, cut to ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _kind(value: Any) -> str:
    """A JSON value for a message: its JSON type and a short repr (never more than one line)."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    text = repr(value)
    return f"{names.get(type(value), type(value).__name__)} {text if len(text) <= 40 else text[:39] + '…'}"


def tokenizer_files(folder: Path) -> list[Path]:
    """The files an artifact copies to be deployable on its own (relative to ``folder``)."""
    return [Path(name) for name in TOKENIZER_FILES if (folder / name).is_file()]


def build(folder: str | Path, *, name: str | None = None, task: str | None = None,
          dynamic_sequence: bool = True,
          calibration_texts: Sequence[str] | None = None,
          evaluation_texts: Sequence[str] | None = None,
          training_texts: Sequence[str] | None = None) -> BuiltinModel:
    """The folder as a BuiltinModel: module, tokenised example inputs and text data."""
    import torch

    from slimgraph.frontend.text import EVERYDAY_SENTENCES

    folder = Path(folder)
    spec = read_folder(folder)
    task = detect_task(spec, task)
    tokenizer = _tokenizer(folder)
    module, output, pooled = _make_module(spec, task)

    def tokenise(texts: Sequence[str]) -> dict[str, np.ndarray]:
        encoded = tokenizer(list(texts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                            return_tensors="np")
        return {k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask")}

    calib_texts = list(calibration_texts or EVERYDAY_SENTENCES[:CALIBRATION_TEXTS])
    eval_texts = list(evaluation_texts or (
        EVERYDAY_SENTENCES[CALIBRATION_TEXTS:] if calibration_texts is None else EVERYDAY_SENTENCES))
    calibration_tokens = tokenise(calib_texts)

    def calibration(n: int) -> list[dict[str, np.ndarray]]:
        """The first ``n`` calibration texts (wrapping around), one per feed."""
        return [{k: v[i % len(calib_texts)][None].copy() for k, v in calibration_tokens.items()}
                for i in range(n)]

    def evaluation() -> EvalData:
        batches = [eval_texts[i:i + EVAL_BATCH] for i in range(0, len(eval_texts), EVAL_BATCH)]
        return EvalData([tokenise(b) for b in batches], labels=None)

    def training() -> TrainSplit:
        """``training_texts`` (split by hash into disjoint training and held-out sets), else
        general English (``corpora.general_training``) scored on held-out general English from
        other sources (``corpora.general_held_out``); heal distils the float model on them."""
        from slimgraph.frontend.corpora import general_held_out, general_training
        from slimgraph.frontend.text import split_sentences

        if training_texts is not None:
            train, held = split_sentences(training_texts)
            source = f"{len(train)} given training texts"
            held = held[:: max(1, len(held) // HEAL_HELD_OUT)][:HEAL_HELD_OUT]
        else:
            mix, held_mix = general_training(), general_held_out()
            train, held = mix.sentences, held_mix.sentences
            source = (f"{len(train)} general English sentences: {mix.describe()}; scored on "
                      f"{len(held)} held-out sentences of other sources: {held_mix.describe()}")
        return TrainSplit(tokenise(train), None, source,
                          held_out=[tokenise(held[i:i + EVAL_BATCH * 4])
                                    for i in range(0, len(held), EVAL_BATCH * 4)])

    kind = {"text-classification": "classification", "token-classification": "token-classification",
            "fill-mask": "fill-mask"}.get(task, "embedding")
    label = name or folder.name
    what = f"{spec.model_type} {task}" + (" (pooled sentence embedding)" if pooled else "")
    return BuiltinModel(
        name=label,
        description=f"Hugging Face folder {folder}: {what}; data padded to {MAX_LENGTH} tokens",
        module=module,
        example_inputs=tuple(torch.from_numpy(v.copy())
                             for v in tokenise((calib_texts * 2)[:2]).values()),
        input_names=["input_ids", "attention_mask"],
        output_names=[output],
        calibration=calibration,
        evaluation=evaluation,
        task=kind,
        training=training,
        max_sequence=spec.max_position_embeddings if dynamic_sequence else None,
        folder_task=task,
    )
