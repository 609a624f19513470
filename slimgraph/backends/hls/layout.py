"""The order of a [C, H, W] map's values: C order, except that io=stream delivers a map pixel by
pixel, (H, W, C). Every conversion between the two is one of these functions."""

from __future__ import annotations

import numpy as np


def layout_name(shape: tuple[int, ...], stream: bool) -> str:
    """How a per-sample tensor of ``shape`` is laid out at the top function: N, CHW or HWC."""
    if len(shape) != 3:
        return "N"
    return "HWC" if stream else "CHW"


def to_hwc(x: np.ndarray) -> np.ndarray:
    """[B, C, H, W] -> [B, H, W, C]."""
    return np.moveaxis(x, 1, -1)


def from_hwc(x: np.ndarray, shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """[B, ...] holding (H, W, C)-ordered values of a [C, H, W] map -> [B, C, H, W]."""
    c, h, w = shape
    return np.moveaxis(x.reshape(len(x), h, w, c), -1, 1)
