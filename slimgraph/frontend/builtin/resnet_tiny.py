"""resnet-tiny and resnet18: CIFAR-style ResNets (stem, stages of two basic blocks, global pool,
Linear). resnet-tiny has widths 16/32/64; resnet18 is the ResNet-18 layout (64/128/256/512) that
the pruning and quantization peers are compared on.

Weights are seeded random; BatchNorm gets random affine parameters and running statistics
estimated on synthetic images, so activations stay well scaled and BN folding has real work.
Calibration and evaluation use deterministic synthetic images (standard normal pixels).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from slimgraph.frontend.builtin import BuiltinModel, EvalData

SEED = 0
CALIBRATION_SEED = 1
EVALUATION_SEED = 2
WIDTHS = (16, 32, 64)
RESNET18_WIDTHS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = 2
EVAL_BATCHES = 4
EVAL_BATCH = 64


class BasicBlock(nn.Module):
    """Two 3x3 Conv-BN layers plus a shortcut (1x1 Conv-BN where shape changes), then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """[N, 3, 32, 32] image -> [N, 10] logits; each stage after the first halves the resolution."""

    def __init__(self, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks, in_ch = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(BLOCKS_PER_STAGE):
                blocks.append(BasicBlock(in_ch, width, stride=2 if i > 0 and j == 0 else 1))
                in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(image))).flatten(1))


def synthetic_images(n: int, seed: int) -> np.ndarray:
    """``n`` images [n, 3, 32, 32] of standard normal pixels; a prefix of a larger draw."""
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32), dtype=np.float32)


def make_resnet_tiny(widths: tuple[int, ...] = WIDTHS) -> CifarResNet:
    """The seeded model, BN statistics estimated on 128 synthetic images, in eval mode."""
    torch.manual_seed(SEED)
    module = CifarResNet(widths)
    batch_norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in batch_norms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.1)
            bn.momentum = None  # cumulative average over the batches below
        module.train()
        images = torch.from_numpy(synthetic_images(128, SEED))
        for batch in images.split(64):
            module(batch)
        for bn in batch_norms:
            bn.momentum = 0.1
    return module.eval()


def _calibration(n: int) -> list[dict[str, np.ndarray]]:
    return [{"image": image[None]} for image in synthetic_images(n, CALIBRATION_SEED)]


def _evaluation() -> EvalData:
    images = synthetic_images(EVAL_BATCHES * EVAL_BATCH, EVALUATION_SEED)
    return EvalData([{"image": b} for b in np.split(images, EVAL_BATCHES)], labels=None)


def build(name: str = "resnet-tiny", widths: tuple[int, ...] = WIDTHS) -> BuiltinModel:
    """The seeded ResNet with synthetic calibration and evaluation images (no labels)."""
    module = make_resnet_tiny(widths)
    return BuiltinModel(
        name=name,
        description=(
            f"ResNet-style CNN (stem + {len(widths)} stages x {BLOCKS_PER_STAGE} basic blocks, "
            f"widths {'/'.join(map(str, widths))}, 1x1-conv shortcuts on downsampling) on "
            "3x32x32; seeded random weights, synthetic standard-normal images, no labels"
        ),
        module=module,
        example_inputs=(torch.from_numpy(synthetic_images(2, CALIBRATION_SEED)),),
        input_names=["image"],
        output_names=["logits"],
        calibration=_calibration,
        evaluation=_evaluation,
        task="classification",
    )


def build_resnet18() -> BuiltinModel:
    """The ResNet-18 layout for 32x32 inputs (11.2 M parameters), seeded random weights."""
    return build("resnet18", RESNET18_WIDTHS)
