"""slimgraph.bits: the one packed-bit layout (least significant bit first) and who uses it."""

import numpy as np
import onnx_ir as ir
import pytest

from slimgraph.bits import pack_bits, pack_signs, unpack_bits, unpack_signs


def test_bit_k_lives_at_byte_k_div_8_bit_k_mod_8():
    bits = np.zeros(19, bool)
    bits[[0, 3, 9, 18]] = True
    # byte 0: bits 0 and 3 -> 0b1001; byte 1: bit 9 -> 1 << 1; byte 2: bit 18 -> 1 << 2.
    np.testing.assert_array_equal(pack_bits(bits), np.array([9, 2, 4], np.uint8))
    np.testing.assert_array_equal(unpack_bits(np.array([9, 2, 4], np.uint8), 19), bits.astype(np.uint8))


def test_rows_pack_along_the_axis_each_padded_to_a_byte():
    rows = np.array([[1, 0, 0, 0, 0, 0, 0, 0, 1], [0, 1, 0, 0, 0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(pack_bits(rows, axis=1), np.array([[1, 1], [2, 0]], np.uint8))


def test_pack_signs_round_trips_exactly():
    rng = np.random.default_rng(0)
    for shape in [(3, 5, 2, 2), (13,), (8, 8)]:
        w = rng.standard_normal(shape).astype(np.float32)
        w.flat[0] = 0.0  # zero counts as +1
        packed = pack_signs(w)
        assert packed.dtype == np.uint8 and packed.size == -(-w.size // 8)
        np.testing.assert_array_equal(unpack_signs(packed, shape), np.where(w >= 0, 1.0, -1.0))


def _decode_shifts(model: ir.Model) -> list[np.ndarray]:
    return [n.inputs[1].const_value.numpy().ravel() for n in model.graph if n.op_type == "BitShift"]


@pytest.mark.parametrize("spec", ["quantize:binary", "fold-sparse"])
def test_graph_decodes_read_the_same_order(spec):
    """The binary weights' and the sparse bitmask's decode graphs shift by 0..7: LSB first."""
    import slimgraph
    from slimgraph.passes import Pipeline

    loaded = slimgraph.load("digits-cnn")
    passes = "sparsify:0.9,fold-sparse:positions=bitmask" if spec == "fold-sparse" else spec
    pipeline = Pipeline.parse(passes)
    pipeline.bind_calibration(loaded.calibration)
    model, _ = pipeline.run(loaded.model.clone())
    shifts = _decode_shifts(model)
    assert shifts
    for s in shifts:
        np.testing.assert_array_equal(s, np.arange(8))
