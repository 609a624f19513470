"""digits-cnn: a LeNet-style CNN (two Conv-BN-ReLU-MaxPool stages, two Linear layers) on digits.

Regenerate the shipped weights with ``python -m slimgraph.frontend.builtin.digits_cnn``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimgraph.frontend.builtin import BuiltinModel, digits

NAME = "digits_cnn"
EPOCHS = 30
LR = 3e-3


class DigitsCNN(nn.Module):
    """[N, 1, 8, 8] normalised image -> [N, 10] logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))


def _as_image(x: np.ndarray) -> np.ndarray:
    return x


def train(out_dir: Path = digits.WEIGHTS_DIR) -> dict:
    """Train from a fixed seed, write weights + record to ``out_dir``, return the record."""
    torch.manual_seed(digits.SEED)
    module = DigitsCNN()
    digits.fit(module, _as_image, epochs=EPOCHS, lr=LR)
    accuracy = digits.held_out_accuracy(module, _as_image)
    record = {"test_accuracy": accuracy, "epochs": EPOCHS, "lr": LR}
    return digits.save_trained(module, NAME, out_dir, record)


def build() -> BuiltinModel:
    """The trained digits CNN with the training split for calibration and the test split to evaluate."""
    module = DigitsCNN()
    record = digits.load_trained(module, NAME, train)
    return BuiltinModel(
        name="digits-cnn",
        description=(
            "LeNet-style CNN (Conv-BN-ReLU-MaxPool x2, Linear x2) trained on scikit-learn digits; "
            f"top-1 {record['test_accuracy']:.4f} on {record['test_size']} held-out images"
        ),
        module=module,
        example_inputs=(torch.from_numpy(digits.digits_split().x_train[:2].copy()),),
        input_names=["image"],
        output_names=["logits"],
        calibration=lambda n: digits.calibration_feeds("image", n, _as_image),
        evaluation=lambda: digits.evaluation_data("image", _as_image),
        training=lambda: digits.training_split("image", _as_image),
        task="classification",
    )


if __name__ == "__main__":
    print(train())
