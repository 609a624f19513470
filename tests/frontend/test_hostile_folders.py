"""Hostile Hugging Face folders: each case, built here from one tiny valid folder, stops `export`
with exit 2 and one line naming the file (and key), writes nothing, and never runs the folder's
Python, whatever stdin answers."""

from __future__ import annotations

import io
import json
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from slimgraph.cli import main
from slimgraph.errors import ModelLoadError

transformers = pytest.importorskip("transformers")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "a", "mat", "."]
# The folder's own Python: importing it leaves a marker, so a test can see that it never ran.
PAYLOAD = """
import pathlib
pathlib.Path({marker!r}).write_text("the folder's code ran")
from transformers import BertConfig, BertModel, BertTokenizer


class EvilConfig(BertConfig):
    model_type = "evilbert"


class EvilModel(BertModel):
    config_class = EvilConfig


class EvilTokenizer(BertTokenizer):
    pass
"""


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    """A valid sentence-transformers folder: a 1-layer, 8-wide BERT, its tokenizer, modules.json
    (Transformer, CLS Pooling, Normalize) and 1_Pooling/config.json."""
    folder = tmp_path_factory.mktemp("base") / "model"
    vocab = folder.parent / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(folder, safe_serialization=True)
    transformers.BertTokenizer(vocab_file=str(vocab)).save_pretrained(folder)
    modules = [{"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
               for i, (path, kind) in enumerate([("", "Transformer"), ("1_Pooling", "Pooling"),
                                                 ("2_Normalize", "Normalize")])]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 8, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    return folder


def _edit_json(name: str, change: Callable[[object], object]) -> Callable[[Path, Path], None]:
    """A case that rewrites the folder's ``name`` with ``change(parsed)`` (a callable's return)."""

    def apply(folder: Path, outside: Path) -> None:
        path = folder / name
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return apply


def _set(name: str, key: str, value: object) -> Callable[[Path, Path], None]:
    return _edit_json(name, lambda data: {**data, key: value})


def _write(name: str, content: str | bytes) -> Callable[[Path, Path], None]:
    def apply(folder: Path, outside: Path) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return apply


def _remove(*names: str) -> Callable[[Path, Path], None]:
    def apply(folder: Path, outside: Path) -> None:
        for name in names:
            (folder / name).unlink()

    return apply


def _link_outside(name: str, directory: bool = False) -> Callable[[Path, Path], None]:
    """``name`` becomes a symlink to a copy of itself outside the folder (a secret, say)."""

    def apply(folder: Path, outside: Path) -> None:
        path, target = folder / name, outside / Path(name).name
        (shutil.copytree if directory else shutil.copy)(path, target)
        (shutil.rmtree if directory else Path.unlink)(path)
        path.symlink_to(target, target_is_directory=directory)

    return apply


def _module(index: int, **entry: object) -> Callable[[Path, Path], None]:
    def change(modules: list) -> list:
        modules[index] = {**modules[index], **entry}
        return modules

    return _edit_json("modules.json", change)


def _custom_code(config: dict, tokenizer: dict | None = None) -> Callable[[Path, Path], None]:
    """The folder ships evil.py and its JSON names it (and a model type transformers lacks)."""

    def apply(folder: Path, outside: Path) -> None:
        (folder / "evil.py").write_text(PAYLOAD.format(marker=str(outside / "MARKER")))
        _set("config.json", "model_type", "evilbert")(folder, outside)
        for key, value in config.items():
            _set("config.json", key, value)(folder, outside)
        for key, value in (tokenizer or {}).items():
            _set("tokenizer_config.json", key, value)(folder, outside)

    return apply


def _safetensors(content: Callable[[bytes], bytes]) -> Callable[[Path, Path], None]:
    def apply(folder: Path, outside: Path) -> None:
        path = folder / "model.safetensors"
        path.write_bytes(content(path.read_bytes()))

    return apply


def _sharded(shard: str) -> Callable[[Path, Path], None]:
    """model.safetensors moved out to OUTSIDE/shard.safetensors; the index names ``shard`` (with
    ``{outside}`` filled in) for its tensors."""

    def apply(folder: Path, outside: Path) -> None:
        (folder / "model.safetensors").rename(outside / "shard.safetensors")
        name = shard.format(outside=outside)
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {"embeddings.word_embeddings.weight": name}}))

    return apply


def _header(header: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header


AUTO_MAP = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
# (case, what the folder gets, what the one line must name: the file ("" for the folder), then
# the key or problem)
CASES = [
    # custom code, with stdin answering "y"
    ("config-auto-map", _custom_code({"auto_map": AUTO_MAP, "architectures": ["EvilModel"]}),
     "config.json", "auto_map"),
    ("config-auto-map-native-type", _set("config.json", "auto_map", AUTO_MAP), "config.json", "auto_map"),
    ("tokenizer-auto-map", _custom_code({}, {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}),
     "config.json", "model_type"),
    ("tokenizer-auto-map-native-type", _set("tokenizer_config.json", "auto_map",
                                            {"AutoTokenizer": ["evil.EvilTokenizer", None]}),
     "tokenizer_config.json", "auto_map"),
    ("unknown-model-type", _custom_code({}), "config.json", "model_type"),
    ("missing-model-type", _edit_json("config.json", lambda c: {k: v for k, v in c.items()
                                                                if k != "model_type"}),
     "config.json", "model_type"),
    ("unknown-architecture", _set("config.json", "architectures", ["EvilModel"]), "config.json",
     "unknown architecture"),
    ("custom-sentence-module", _module(1, type="evil.EvilPooling"), "modules.json", "evil.EvilPooling"),
    # config.json
    ("config-not-json", _write("config.json", "{ not json"), "config.json", "not a readable JSON"),
    ("config-not-utf8", _write("config.json", b'{"model_type": "\xff"}'), "config.json", "utf-8"),
    ("config-deep", _write("config.json", "[" * 200_000), "config.json", "not a readable JSON"),
    ("config-list", _write("config.json", "[]"), "config.json", "not a JSON object"),
    ("architectures-string", _set("config.json", "architectures", "BertModel"), "config.json",
     "architectures"),
    ("architectures-ints", _set("config.json", "architectures", [1, 2]), "config.json", "architectures"),
    ("model-type-number", _set("config.json", "model_type", 7), "config.json", "model_type"),
    ("hidden-size-string", _set("config.json", "hidden_size", "8"), "config.json", "hidden_size"),
    ("hidden-size-negative", _set("config.json", "hidden_size", -8), "config.json", "hidden_size"),
    ("hidden-size-bool", _set("config.json", "hidden_size", True), "config.json", "hidden_size"),
    ("hidden-size-huge", _set("config.json", "vocab_size", 10**12), "config.json", "vocab_size"),
    ("hidden-size-nan", _write("config.json", '{"model_type": "bert", "hidden_size": NaN}'),
     "config.json", "NaN"),
    ("dropout-infinite", _write("config.json", '{"model_type": "bert", "hidden_dropout_prob": 1e999}'),
     "config.json", "1e999"),
    ("id2label-words", _set("config.json", "id2label", {"zero": "a"}), "config.json", "id2label"),
    ("label2id-strings", _set("config.json", "label2id", {"a": "0"}), "config.json", "label2id"),
    ("hidden-act-number", _set("config.json", "hidden_act", 3), "config.json", "hidden_act"),
    ("pre-quantized", _set("config.json", "quantization_config", {"quant_method": "gptq"}),
     "config.json", "quantization_config"),
    ("config-links-outside", _link_outside("config.json"), "config.json", "outside the folder"),
    # modules.json
    ("modules-not-list", _write("modules.json", "{}"), "modules.json", "not a list"),
    ("modules-not-json", _write("modules.json", "[{"), "modules.json", "not a readable JSON"),
    ("module-not-object", _edit_json("modules.json", lambda m: [*m, 1]), "modules.json", "entry 3"),
    ("module-type-number", _module(1, type=5), "modules.json", "'type'"),
    ("module-type-markup", _module(1, type="[/][bold]x"), "modules.json", "[/][bold]x"),
    ("module-path-number", _module(1, path=["1_Pooling"]), "modules.json", "'path'"),
    ("module-dense", _module(2, type="sentence_transformers.models.Dense"), "modules.json", "Dense"),
    ("module-twice", _edit_json("modules.json", lambda m: [*m, m[1]]), "modules.json", "Pooling"),
    ("pooling-path-absolute", _module(1, path="/etc"), "modules.json", "'/etc'"),
    ("pooling-path-dotdot", _module(1, path="../1_Pooling"), "modules.json", "'../1_Pooling'"),
    ("normalize-path-dotdot", _module(2, path="2_Normalize/../../x"), "modules.json", "'path'"),
    ("transformer-elsewhere", _module(0, path="1_Pooling"), "modules.json", "Transformer"),
    ("pooling-dir-links-outside", _link_outside("1_Pooling", directory=True), "modules.json",
     "outside the folder"),
    # 1_Pooling/config.json
    ("pooling-config-list", _write("1_Pooling/config.json", "[true]"), "1_Pooling/config.json",
     "not a JSON object"),
    ("pooling-mode-string", _set("1_Pooling/config.json", "pooling_mode_cls_token", "yes"),
     "1_Pooling/config.json", "pooling_mode_cls_token"),
    ("pooling-max", _set("1_Pooling/config.json", "pooling_mode_max_tokens", True),
     "1_Pooling/config.json", "pooling_mode_max_tokens"),
    ("pooling-config-links-outside", _link_outside("1_Pooling/config.json"), "1_Pooling/config.json",
     "outside the folder"),
    # tokenizer
    ("no-tokenizer", _remove("tokenizer.json"), "", "no tokenizer files"),
    ("tokenizer-config-list", _write("tokenizer_config.json", "[]"), "tokenizer_config.json",
     "not a JSON object"),
    ("tokenizer-class-number", _set("tokenizer_config.json", "tokenizer_class", 1),
     "tokenizer_config.json", "tokenizer_class"),
    ("vocab-file-absolute", _set("tokenizer_config.json", "vocab_file", "/etc/passwd"),
     "tokenizer_config.json", "vocab_file"),
    ("tokenizer-file-dotdot", _set("tokenizer_config.json", "tokenizer_file", "../tokenizer.json"),
     "tokenizer_config.json", "tokenizer_file"),
    ("tokenizer-links-outside", _link_outside("tokenizer.json"), "tokenizer.json", "outside the folder"),
    ("tokenizer-config-links-outside", _link_outside("tokenizer_config.json"), "tokenizer_config.json",
     "outside the folder"),
    # weights
    ("weights-empty", _safetensors(lambda data: b""), "model.safetensors", "not a valid safetensors"),
    ("weights-garbage", _safetensors(lambda data: b"PK\x03\x04 a zip, say" * 10), "model.safetensors",
     "not a valid safetensors"),
    ("weights-truncated", _safetensors(lambda data: data[: len(data) - 100]), "model.safetensors",
     "not a valid safetensors"),
    ("weights-header-huge", _safetensors(lambda data: _header(b"{}", 1 << 60)), "model.safetensors",
     "not a valid safetensors"),
    ("weights-header-not-json", _safetensors(lambda data: _header(b"{nope}")), "model.safetensors",
     "not a valid safetensors"),
    ("weights-header-list", _safetensors(lambda data: _header(b"[1, 2]")), "model.safetensors",
     "not a valid safetensors"),
    ("weights-offsets-past-end", _safetensors(lambda data: _header(json.dumps(
        {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 1 << 40]}}).encode()) + bytes(64)),
     "model.safetensors", "not a valid safetensors"),
    ("weights-link-outside", _link_outside("model.safetensors"), "model.safetensors", "outside the folder"),
    ("shard-dotdot", _sharded("../outside/shard.safetensors"), "model.safetensors.index.json",
     "weight_map"),
    ("shard-absolute", _sharded("{outside}/shard.safetensors"), "model.safetensors.index.json",
     "weight_map"),
    ("shard-missing", _sharded("shard.safetensors"), "model.safetensors.index.json", "shard.safetensors"),
]


@pytest.mark.parametrize(("case", "make", "file", "named"), CASES, ids=[c[0] for c in CASES])
def test_hostile_folder_stops_with_one_line_and_runs_nothing(base_folder, tmp_path, capsys, monkeypatch,
                                                             case, make, file, named):
    folder, outside = tmp_path / "model", tmp_path / "outside"
    shutil.copytree(base_folder, folder)
    outside.mkdir()
    make(folder, outside)
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))  # a prompt would be answered yes

    assert main(["export", str(folder), "-o", str(out_parent / "artifact"), "--quiet"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    assert str(folder / file if file else folder) in lines[0], lines[0]
    assert named in lines[0], lines[0]
    assert list(out_parent.iterdir()) == []  # no artifact, no temporary sibling
    assert not (outside / "MARKER").exists()


@pytest.fixture
def custom_code_folder(base_folder, tmp_path) -> tuple[Path, Path]:
    """The base folder with a model type transformers lacks and auto_map in both configs naming
    evil.py (no tokenizer_class: transformers has no class of its own to fall back on)."""
    folder, marker = tmp_path / "model", tmp_path / "MARKER"
    shutil.copytree(base_folder, folder)
    _custom_code({"auto_map": AUTO_MAP, "architectures": ["EvilModel"]},
                 {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}})(folder, tmp_path)
    _edit_json("tokenizer_config.json", lambda t: {k: v for k, v in t.items() if k != "tokenizer_class"})(
        folder, tmp_path)
    return folder, marker


def test_transformers_itself_is_told_never_to_run_folder_code(custom_code_folder, monkeypatch):
    """Behind the refusal: the loaders pass trust_remote_code=False, so transformers neither asks
    (stdin says yes) nor imports the folder's Python even where read_folder were skipped."""
    from slimgraph.frontend import hf_folder

    folder, marker = custom_code_folder
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))
    spec = hf_folder.FolderSpec(folder, "evilbert", ("EvilModel",), 32, None)
    with pytest.raises(ModelLoadError, match="transformers cannot load it"):
        hf_folder._make_module(spec, "feature-extraction")
    with pytest.raises(ModelLoadError, match="its tokenizer does not load"):
        hf_folder._tokenizer(folder)
    assert not marker.exists()


def test_valid_folder_passes_and_reads_its_pooling(base_folder):
    from slimgraph.frontend.hf_folder import read_folder

    spec = read_folder(base_folder)
    assert (spec.model_type, spec.architectures, spec.max_position_embeddings, spec.pooling) == (
        "bert", ("BertModel",), 32, ("cls", True))


def test_cache_snapshot_links_into_its_blobs_only(base_folder, tmp_path):
    """A Hugging Face cache snapshot's files are links into the repository's blobs: accepted; a
    link past the blobs is not."""
    from slimgraph.frontend.hf_folder import read_folder

    repo = tmp_path / "hub" / "models--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abcd", repo / "blobs"
    blobs.mkdir(parents=True)
    for source in base_folder.rglob("*"):
        if source.is_file():
            blob = blobs / source.relative_to(base_folder).as_posix().replace("/", "_")
            shutil.copy(source, blob)
            link = snapshot / source.relative_to(base_folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path("../" * (len(link.relative_to(repo).parts) - 1)) / "blobs" / blob.name)
    assert read_folder(snapshot).pooling == ("cls", True)

    (tmp_path / "secret.txt").write_text("[PAD]\n")
    (snapshot / "vocab.txt").symlink_to(blobs / ".." / ".." / ".." / "secret.txt")
    with pytest.raises(ModelLoadError, match=r"vocab.txt leads to \S*secret.txt, outside the folder"):
        read_folder(snapshot)
