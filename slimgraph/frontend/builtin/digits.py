"""scikit-learn's bundled digits (1797 8x8 images, 10 classes): the fixed split shared by the
digits models, their training loop, and their shipped weights (safetensors, never pickle).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from slimgraph.artifact import write_json
from slimgraph.frontend.builtin import EvalData, TrainSplit

logger = logging.getLogger(__name__)

SEED = 0
TEST_FRACTION = 0.2
EVAL_BATCH = 64
# Pixels (0..16) are scaled to [0, 1], then standardised with rounded whole-data-set statistics.
PIXEL_MEAN = 0.3
PIXEL_STD = 0.38
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


@dataclasses.dataclass(frozen=True)
class DigitsSplit:
    """Normalised images [N, 1, 8, 8] float32 and int64 labels; stratified 80/20, fixed seed."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@functools.cache
def digits_split() -> DigitsSplit:
    """The deterministic train/test split every digits model trains and evaluates on."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = ((data.images / 16.0 - PIXEL_MEAN) / PIXEL_STD).astype(np.float32)[:, None]
    labels = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SEED
    )
    for array in (x_train, x_test, y_train, y_test):
        array.flags.writeable = False  # cached and shared: hand out copies only
    return DigitsSplit(x_train, y_train, x_test, y_test)


def calibration_feeds(
    name: str, n: int, shape: Callable[[np.ndarray], np.ndarray]
) -> list[dict[str, np.ndarray]]:
    """The first ``n`` training images (wrapping around past the end), one per feed."""
    x = digits_split().x_train
    return [{name: shape(x[i % len(x)][None]).copy()} for i in range(n)]


def evaluation_data(name: str, shape: Callable[[np.ndarray], np.ndarray]) -> EvalData:
    """The test split in batches of EVAL_BATCH, with labels."""
    split = digits_split()
    starts = range(0, len(split.x_test), EVAL_BATCH)
    feeds = [{name: shape(split.x_test[i : i + EVAL_BATCH]).copy()} for i in starts]
    labels = [split.y_test[i : i + EVAL_BATCH].copy() for i in starts]
    return EvalData(feeds, labels)


def training_split(name: str, shape: Callable[[np.ndarray], np.ndarray]) -> TrainSplit:
    """The whole training split with its labels (what the shipped weights were trained on)."""
    split = digits_split()
    return TrainSplit({name: shape(split.x_train).copy()}, split.y_train.copy(),
                      f"scikit-learn digits training split ({len(split.x_train)} images)")


def fit(
    module: torch.nn.Module,
    shape: Callable[[np.ndarray], np.ndarray],
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    seed: int = SEED,
) -> None:
    """Train on the training split with Adam and a cosine schedule; deterministic on CPU."""
    split = digits_split()
    x = torch.from_numpy(shape(split.x_train).copy())
    y = torch.from_numpy(split.y_train.copy())
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    module.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(batch_size):
            optimizer.zero_grad()
            F.cross_entropy(module(x[idx]), y[idx]).backward()
            optimizer.step()
        schedule.step()
    module.eval()


def held_out_accuracy(
    module: torch.nn.Module, shape: Callable[[np.ndarray], np.ndarray]
) -> float:
    """Top-1 accuracy of ``module`` on the test split."""
    split = digits_split()
    with torch.no_grad():
        logits = module(torch.from_numpy(shape(split.x_test).copy()))
    return float((logits.argmax(1).numpy() == split.y_test).mean())


def save_trained(module: torch.nn.Module, name: str, out_dir: Path, record: dict) -> dict:
    """Write ``<name>.safetensors`` and ``<name>.json`` (the training record) atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    split = digits_split()
    record = {
        "model": name,
        **record,
        "seed": SEED,
        "train_size": len(split.x_train),
        "test_size": len(split.x_test),
        "parameters": sum(p.numel() for p in module.parameters()),
        "torch_version": torch.__version__.split("+")[0],
    }
    for suffix, write in (
        (".safetensors", lambda p: save_file(state, p)),
        (".json", lambda p: write_json(Path(p), record)),
    ):
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}", suffix=suffix)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, out_dir / f"{name}{suffix}")
    return record


def cache_dir() -> Path:
    """Where weights trained on first use go when the shipped file is missing."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "slimgraph" / "weights"


def weights_path(name: str) -> Path:
    """The shipped weights if present, else the user cache copy (which may not exist yet)."""
    shipped = WEIGHTS_DIR / f"{name}.safetensors"
    return shipped if shipped.exists() else cache_dir() / f"{name}.safetensors"


def load_trained(module: torch.nn.Module, name: str, train: Callable[[Path], dict]) -> dict:
    """Load weights into ``module`` (training into the cache dir if missing); return the record."""
    path = weights_path(name)
    if not path.exists():
        logger.warning("%s: no shipped weights; training into %s", name, path.parent)
        train(path.parent)
    module.load_state_dict(load_file(path))
    module.eval()
    return json.loads(path.with_suffix(".json").read_text())
