"""The layer list: integer tensors and layers with typed parameters per kind.

``lower`` builds it from the graph; ``emit``, ``estimate`` and ``reference`` read it. Layer kinds
and their parameters:

    conv              ConvParams (weights, window, groups)
    dense             DenseParams (weights)
    maxpool, avgpool  PoolParams (window)
    add, concat       MergeParams (one multiplier per input)
    sigmoid           SigmoidParams (lookup table)
    softmax           SoftmaxParams (exp table and divider)
    requant, clamp, sign   none
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def bits_for(bound: float) -> int:
    """Bits of a signed integer that holds every value of magnitude <= bound."""
    return max(2, int(math.ceil(math.log2(bound + 1))) + 1)


@dataclasses.dataclass
class Format:
    """How a tensor's raw integers map to reals: ``scale * (raw - zero_point)``."""

    bits: int
    signed: bool
    scale: np.ndarray  # float64, shape () or (C,) (per channel: accumulator outputs only)
    zero_point: int = 0

    @property
    def low(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def high(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def code(self, real: float) -> int:
        """The raw integer QuantizeLinear gives ``real`` (saturated); +-inf -> the type's ends."""
        if real == math.inf:
            return self.high
        if real == -math.inf:
            return self.low
        return int(np.clip(np.rint(real / float(self.scale)) + self.zero_point, self.low, self.high))

    def same(self, other: Format) -> bool:
        return (self.bits, self.signed, self.zero_point) == (other.bits, other.signed,
                                                             other.zero_point) and \
            self.scale.shape == other.scale.shape and bool(np.all(self.scale == other.scale))

    def describe(self) -> str:
        kind = f"{'int' if self.signed else 'uint'}{self.bits}"
        if self.scale.ndim:
            return f"{kind}, per-channel scale"
        return f"{kind}, scale {float(self.scale):.6g}, zero point {self.zero_point}"


@dataclasses.dataclass
class Tensor:
    """A buffer of the design: per-sample shape (C, H, W) or (N,), in C order."""

    name: str
    shape: tuple[int, ...]
    fmt: Format

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


@dataclasses.dataclass
class Requant:
    """Per output channel: ``m / 2^shift`` and the value added after the shift."""

    m: np.ndarray  # int64 (C,)
    shift: np.ndarray  # int64 (C,)
    post: np.ndarray  # int64 (C,)


@dataclasses.dataclass
class Weights:
    """A conv's or dense layer's integer weight [O, ...] and bias in accumulator units."""

    q: np.ndarray  # int64
    kind: str  # int8, fixed or binary
    bias: np.ndarray  # int64 (O,)
    bias_out: np.ndarray | None = None  # binary weights: the float bias, added in output units

    @property
    def bits(self) -> int:
        """Bits of a signed integer that holds every weight."""
        return bits_for(int(np.abs(self.q).max(initial=0)))


@dataclasses.dataclass
class Window:
    """A sliding window over (H, W): kernel, strides, pads (top, left, bottom, right), output."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    out: tuple[int, int]


@dataclasses.dataclass
class ConvParams:
    weights: Weights
    window: Window
    groups: int


@dataclasses.dataclass
class DenseParams:
    weights: Weights


@dataclasses.dataclass
class PoolParams:
    window: Window


@dataclasses.dataclass
class MergeParams:
    """add, concat: each input times its multiplier, one shift shared after the sum."""

    m: list[int]


@dataclasses.dataclass
class SigmoidParams:
    drop: int  # input bits dropped to index the table
    table: np.ndarray  # int64: the output code per index


@dataclasses.dataclass
class SoftmaxParams:
    drop: int  # bits dropped from the distance to the row's maximum
    table: np.ndarray  # int64: exp(-distance) in 16-bit fixed point
    divider: int


LayerParams = (ConvParams | DenseParams | PoolParams | MergeParams | SigmoidParams
               | SoftmaxParams)


@dataclasses.dataclass
class Layer:
    kind: str  # see the module docstring
    name: str
    inputs: list[Tensor]
    output: Tensor
    params: LayerParams | None = None
    lo: int = 0
    hi: int = 0
    requant: Requant | None = None
    node: str = ""  # the ONNX node it came from
    macs: int = 0
    acc_scale: np.ndarray | None = None  # the real value of one accumulator step, per channel
    acc_bits: int = 32
    clip: tuple[float, float] = (-math.inf, math.inf)  # a Relu / Clip merged in, in real units

    @property
    def weights(self) -> Weights | None:
        return self.params.weights if isinstance(self.params, ConvParams | DenseParams) else None

    @property
    def window(self) -> Window | None:
        return self.params.window if isinstance(self.params, ConvParams | PoolParams) else None
