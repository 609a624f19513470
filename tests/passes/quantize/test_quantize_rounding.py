"""rounding: GPTQ weight rounding and bias correction, tested against round-to-nearest and torch."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from slimgraph.passes.quantize.int8 import quantize_weight
from slimgraph.passes.quantize.rounding import InputStatistics, gptq, input_vectors, round_layer

torch = pytest.importorskip("torch")




def _correlated_inputs(rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Draws (by seed) of one distribution: k features driven by 8 shared factors plus a little
    noise of their own, with a mean (as neighbouring pixels and channels of an image are)."""
    mixing = np.random.default_rng(100).standard_normal((8, k))
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, 8)) @ mixing + 0.1 * rng.standard_normal((rows, k)) + 0.5


@pytest.mark.parametrize(
    ("shape", "attrs"),
    [
        ((2, 4, 9, 11), {"kernel_shape": [3, 3], "pads": [1, 0, 2, 1], "strides": [2, 1]}),
        ((1, 6, 8, 8), {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "group": 3, "dilations": [2, 2]}),
        ((2, 4, 7, 7), {"kernel_shape": [1, 1], "strides": [2, 2]}),  # pointwise fast path
    ],
)
def test_input_vectors_are_torch_unfold_patches(shape, attrs):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    group = attrs.get("group", 1)
    weight = np.zeros((group * 2, shape[1] // group, *attrs["kernel_shape"]), np.float32)
    node = ir.node("Conv", [ir.Value(name="x"), ir.Value(name="w")],
                   {k: v for k, v in attrs.items() if k != "kernel_shape"})
    got = input_vectors(x, node, weight, rows=10**6, rng=np.random.default_rng(0))
    t, left, b, r = attrs.get("pads", [0, 0, 0, 0])
    padded = torch.nn.functional.pad(torch.from_numpy(x), (left, r, t, b))
    cols = torch.nn.functional.unfold(padded, attrs["kernel_shape"], dilation=attrs.get("dilations", 1),
                                      stride=attrs.get("strides", 1))  # [N, C*kh*kw, L]
    want = cols.permute(0, 2, 1).reshape(-1, group, cols.shape[1] // group).numpy()
    np.testing.assert_array_equal(got, want)


def test_gptq_beats_nearest_on_what_the_layer_computes():
    rng = np.random.default_rng(1)
    k, m = 48, 16
    w = rng.standard_normal((m, k))
    x = _correlated_inputs(4096, k)
    _, scales = quantize_weight(w, 0)
    hessian = (x.T @ x / len(x))[None]
    q = gptq(w[None], scales[None], hessian, 127)[0]
    nearest = np.clip(np.round(w / scales[:, None]), -127, 127)
    assert np.abs(q).max() <= 127 and np.array_equal(q, np.round(q))
    fresh = _correlated_inputs(4096, k, seed=2)

    def output_error(ints):
        return np.linalg.norm(fresh @ (w - ints * scales[:, None]).T)

    assert output_error(q) < 0.5 * output_error(nearest)


def test_gptq_is_nearest_rounding_when_inputs_are_uncorrelated():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((6, 10))
    _, scales = quantize_weight(w, 0)
    hessian = np.diag(rng.uniform(0.5, 2.0, 10))[None]
    q = gptq(w[None], scales[None], hessian, 127)[0]
    np.testing.assert_array_equal(q, np.clip(np.round(w / scales[:, None]), -127, 127))


def test_bias_correction_is_the_mean_output_shift_of_the_rounding():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 4, 1, 1)).astype(np.float32)
    node = ir.node("Conv", [ir.Value(name="x"), ir.Value(name="w")])
    x = (rng.standard_normal((4, 4, 6, 6)) + 3.0).astype(np.float32)  # inputs far from zero mean
    stats = InputStatistics(np.zeros((1, 4, 4)), np.zeros((1, 4)))
    stats.add(input_vectors(x, node, w, 10**6, rng))
    _, scales = quantize_weight(w, 0)
    q, correction = round_layer(node, w, scales, 0, 127, stats)
    assert q.dtype == np.int8 and q.shape == w.shape
    pixels = np.moveaxis(x, 1, -1).reshape(-1, 4).astype(np.float64)
    w2 = w.reshape(8, 4).astype(np.float64)
    shift = (pixels @ (w2 - q.reshape(8, 4) * scales[:, None]).T).mean(axis=0)
    np.testing.assert_allclose(correction, shift, rtol=1e-3)  # statistics summed in float32
    # Cached: a second call with the same scales returns the same rounding.
    again, _ = round_layer(node, w, scales, 0, 127, stats)
    assert again is q


def test_blocked_updates_round_exactly_as_column_by_column(monkeypatch):
    from slimgraph.passes.quantize import rounding

    rng = np.random.default_rng(5)
    w = rng.standard_normal((2, 8, 300))
    scales = np.abs(w).max(axis=-1) / 127
    x = _correlated_inputs(2000, 300)
    hessian = np.stack([x.T @ x / len(x)] * 2)
    blocked = gptq(w, scales, hessian, 127)
    monkeypatch.setattr(rounding, "BLOCK", 10**6)
    np.testing.assert_array_equal(blocked, gptq(w, scales, hessian, 127))


def test_large_positive_definite_inverse_matches_numpy():
    from slimgraph.passes.quantize.rounding import _spd_inverse

    x = _correlated_inputs(3000, 300)
    h = np.stack([x.T @ x / len(x) + 0.01 * np.eye(300)] * 2)
    np.testing.assert_allclose(_spd_inverse(h), np.linalg.inv(h), rtol=1e-6, atol=1e-8)
