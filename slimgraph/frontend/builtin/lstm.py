"""lstm: a one-layer LSTM (hidden 32) that reads a digits image row by row, then a Linear head.

Regenerate the shipped weights with ``python -m slimgraph.frontend.builtin.lstm``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimgraph.frontend.builtin import BuiltinModel, digits

NAME = "lstm"
HIDDEN = 32
EPOCHS = 30
LR = 1e-2


class RowLSTM(nn.Module):
    """[N, T=8, 8] image rows -> [N, 10] logits from the last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, 10)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(sequence)
        return self.head(hidden[-1])


def _as_sequence(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), 8, 8)


def train(out_dir: Path = digits.WEIGHTS_DIR) -> dict:
    """Train from a fixed seed, write weights + record to ``out_dir``, return the record."""
    torch.manual_seed(digits.SEED)
    module = RowLSTM()
    digits.fit(module, _as_sequence, epochs=EPOCHS, lr=LR)
    accuracy = digits.held_out_accuracy(module, _as_sequence)
    record = {"test_accuracy": accuracy, "epochs": EPOCHS, "lr": LR}
    return digits.save_trained(module, NAME, out_dir, record)


def build() -> BuiltinModel:
    """The trained LSTM with digits training rows to calibrate and the test split to evaluate."""
    module = RowLSTM()
    record = digits.load_trained(module, NAME, train)
    return BuiltinModel(
        name="lstm",
        description=(
            f"LSTM (hidden {HIDDEN}) over the 8 rows of a digits image, Linear head; "
            f"top-1 {record['test_accuracy']:.4f} on {record['test_size']} held-out images"
        ),
        module=module,
        example_inputs=(torch.from_numpy(_as_sequence(digits.digits_split().x_train[:2]).copy()),),
        input_names=["sequence"],
        output_names=["logits"],
        calibration=lambda n: digits.calibration_feeds("sequence", n, _as_sequence),
        evaluation=lambda: digits.evaluation_data("sequence", _as_sequence),
        training=lambda: digits.training_split("sequence", _as_sequence),
        task="classification",
    )


if __name__ == "__main__":
    print(train())
