"""Packed bits: the one layout every packed bit in slimgraph uses.

**Bit order: least significant bit first.** Element ``k`` of a packed run lives in byte ``k // 8``
at bit ``k % 8`` (value ``1 << (k % 8)``), numpy's ``packbits(..., bitorder="little")``; the last
byte of a run is padded with zero bits. A reader gets element ``k`` back as
``(byte[k >> 3] >> (k & 7)) & 1``. The writers and readers:

- binary weights (``quantize:binary``): the signs of the whole weight, flattened in C order, 1
  where ``w >= 0``; decoded in the graph by ``BitShift`` right by ``[0, 1, ..., 7]`` and ``Mod 2``.
- sparse bitmasks (``fold-sparse``): 1 where the flattened tensor is nonzero; the same decode.
- the HLS project's +1 / -1 weights: one run per output row ``[O, ceil(K / 8)]``, read by
  ``sg::Mac::step`` with the expression above (``backends/hls/include/sg_layers.h``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BIT_SHIFTS = np.arange(8, dtype=np.uint8)  # the right shifts that bring bit k of a byte to bit 0


def pack_bits(bits: np.ndarray, axis: int = -1) -> np.ndarray:
    """0/1 (or bool) values -> uint8, eight per byte along ``axis``, least significant bit first."""
    return np.packbits(np.asarray(bits).astype(bool), axis=axis, bitorder="little")


def unpack_bits(packed: np.ndarray, count: int, axis: int = -1) -> np.ndarray:
    """The first ``count`` 0/1 values (uint8) along ``axis`` of what ``pack_bits`` packed."""
    return np.unpackbits(packed, axis=axis, count=count, bitorder="little")


def pack_signs(weight: np.ndarray) -> np.ndarray:
    """One bit per weight, 1 where ``w >= 0``, the whole weight flattened in C order."""
    return pack_bits(np.asarray(weight).ravel() >= 0)


def unpack_signs(packed: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The +1 / -1 float32 array ``pack_signs`` stored."""
    bits = unpack_bits(packed.ravel(), int(np.prod(shape))).astype(np.float32)
    return (bits * 2 - 1).reshape(shape)
