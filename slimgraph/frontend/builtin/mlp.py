"""mlp: a 64-256-256-10 ReLU MLP on flattened digits images.

Regenerate the shipped weights with ``python -m slimgraph.frontend.builtin.mlp``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimgraph.frontend.builtin import BuiltinModel, digits

NAME = "mlp"
EPOCHS = 30
LR = 1e-3


def make_mlp() -> nn.Sequential:
    """[N, 64] features -> [N, 10] logits."""
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def _as_features(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), 64)


def train(out_dir: Path = digits.WEIGHTS_DIR) -> dict:
    """Train from a fixed seed, write weights + record to ``out_dir``, return the record."""
    torch.manual_seed(digits.SEED)
    module = make_mlp()
    digits.fit(module, _as_features, epochs=EPOCHS, lr=LR)
    accuracy = digits.held_out_accuracy(module, _as_features)
    record = {"test_accuracy": accuracy, "epochs": EPOCHS, "lr": LR}
    return digits.save_trained(module, NAME, out_dir, record)


def build() -> BuiltinModel:
    """The trained MLP with digits training features to calibrate and the test split to evaluate."""
    module = make_mlp()
    record = digits.load_trained(module, NAME, train)
    return BuiltinModel(
        name="mlp",
        description=(
            "64-256-256-10 ReLU MLP trained on scikit-learn digits (flattened 8x8 pixels); "
            f"top-1 {record['test_accuracy']:.4f} on {record['test_size']} held-out images"
        ),
        module=module,
        example_inputs=(torch.from_numpy(_as_features(digits.digits_split().x_train[:2]).copy()),),
        input_names=["features"],
        output_names=["logits"],
        calibration=lambda n: digits.calibration_feeds("features", n, _as_features),
        evaluation=lambda: digits.evaluation_data("features", _as_features),
        training=lambda: digits.training_split("features", _as_features),
        task="classification",
    )


if __name__ == "__main__":
    print(train())
