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
only pickled weights (``pytorch_model.bin``) is refused, nothing is unpickled. Texts for
calibration and verification default to ``text.EVERYDAY_SENTENCES``; healing trains on the Python
documentation sentences unless given its own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

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
CONVERT_HINT = (
    "convert it once in an environment you trust: python -c \"from transformers import AutoModel; "
    "AutoModel.from_pretrained('DIR').save_pretrained('DIR', safe_serialization=True)\""
)


def is_model_folder(path: Path) -> bool:
    return path.is_dir()


def read_config(folder: Path) -> dict:
    config = folder / "config.json"
    if not config.is_file():
        raise ModelLoadError(
            f"{folder}: is a directory without config.json, not a Hugging Face model folder. Pass "
            "an .onnx file, or a folder saved with transformers' save_pretrained"
        )
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config}: not a readable JSON config ({exc})") from exc


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


def sentence_pooling(folder: Path) -> tuple[str, bool] | None:
    """(pooling, normalise) where ``modules.json`` makes the folder a sentence-transformers
    embedder, else None."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{modules_file}: not readable JSON ({exc})") from exc
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
    if "Pooling" not in kinds:
        return None
    pooling = "mean"
    config = folder / kinds["Pooling"].get("path", "") / "config.json"
    if config.is_file():
        settings = json.loads(config.read_text(encoding="utf-8"))
        if settings.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif not settings.get("pooling_mode_mean_tokens", True):
            raise ModelLoadError(f"{config}: only mean and CLS-token pooling are supported")
    return pooling, "Normalize" in kinds


def detect_task(folder: Path, config: dict, task: str | None) -> str:
    if task is not None:
        if task not in TASKS:
            raise InputSpecError(f"--task {task!r}: valid tasks are {', '.join(TASKS)}")
        return task
    if sentence_pooling(folder) is not None:
        return "feature-extraction"
    architectures = config.get("architectures") or []
    for architecture in architectures:
        for suffix, found in _ARCHITECTURE_TASKS:
            if architecture.endswith(suffix):
                return found
    raise ModelLoadError(
        f"{folder / 'config.json'}: unknown architecture {architectures or '(none listed)'}; "
        f"pass --task (one of {', '.join(TASKS)})"
    )


def _make_module(folder: Path, task: str):
    import torch
    import torch.nn.functional as F
    import transformers
    from torch import nn

    auto = {
        "feature-extraction": transformers.AutoModel,
        "text-classification": transformers.AutoModelForSequenceClassification,
        "token-classification": transformers.AutoModelForTokenClassification,
        "fill-mask": transformers.AutoModelForMaskedLM,
    }[task]
    try:
        # Eager attention exports as plain MatMul/Softmax; SDPA adds IsNaN/Where guards.
        model = auto.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                     dtype=torch.float32, attn_implementation="eager")
    except Exception as exc:  # transformers raises many types; name the folder and the cause
        raise ModelLoadError(f"{folder}: transformers cannot load it for {task}: {exc}") from exc
    pooling = sentence_pooling(folder) if task == "feature-extraction" else None

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
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # a missing or corrupt tokenizer file: name the folder
        raise ModelLoadError(f"{folder}: its tokenizer does not load ({type(exc).__name__}: {exc})") from exc


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
    config = read_config(folder)
    check_weights(folder)
    task = detect_task(folder, config, task)
    tokenizer = _tokenizer(folder)
    module, output, pooled = _make_module(folder, task)

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
        """``training_texts``, else the Python documentation sentences split by hash into
        disjoint training and held-out sets; heal distils the float model on them."""
        from slimgraph.frontend.text import documentation_sentences, documentation_source, split_sentences

        if training_texts is not None:
            train, held = split_sentences(training_texts)
            source = f"{len(train)} given training texts"
        else:
            train, held = split_sentences(documentation_sentences())
            source = f"{len(train)} {documentation_source()}"
        held = held[:: max(1, len(held) // HEAL_HELD_OUT)][:HEAL_HELD_OUT]
        return TrainSplit(tokenise(train), None, source,
                          held_out=[tokenise(held[i:i + EVAL_BATCH * 4])
                                    for i in range(0, len(held), EVAL_BATCH * 4)])

    kind = {"text-classification": "classification", "token-classification": "token-classification",
            "fill-mask": "fill-mask"}.get(task, "embedding")
    label = name or folder.name
    what = f"{config.get('model_type', 'transformer')} {task}" + (" (pooled sentence embedding)"
                                                                   if pooled else "")
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
        max_sequence=config.get("max_position_embeddings", 512) if dynamic_sequence else None,
        folder_task=task,
    )
