"""Metrics and tolerance checks of verification."""

from __future__ import annotations

import numpy as np

from slimgraph.tolerance import Tolerance
from slimgraph.verify import compare_outputs, verify


def test_metrics_on_known_arrays():
    ref = np.array([[1.0, 2.0, 4.0], [3.0, 1.0, 0.0]], dtype=np.float32)
    out = ref.copy()
    out[0, 2] = 3.5  # still argmax; error 0.5 on scale 4
    out[1, 0] = 0.5  # argmax flips to column 1
    (m,) = compare_outputs(["y"], [[ref]], [[out]])
    assert m.max_abs_err == 2.5
    assert abs(m.max_rel_err - 2.5 / 4.0) < 1e-12
    r, o = ref.ravel().astype(np.float64), out.ravel().astype(np.float64)
    expected_cos = float(np.dot(r, o) / (np.linalg.norm(r) * np.linalg.norm(o)))
    assert abs(m.cosine - expected_cos) < 1e-9
    assert m.top1_agreement == 0.5


def test_nan_in_the_same_place_is_equal():
    ref = np.array([1.0, np.nan, np.inf])
    (m,) = compare_outputs(["y"], [[ref]], [[ref.copy()]])
    assert m.max_abs_err == 0.0
    (bad,) = compare_outputs(["y"], [[ref]], [[np.array([1.0, 0.0, np.inf])]])
    assert bad.max_abs_err == float("inf")


def test_verify_names_the_diverging_output():
    feeds = [{"x": np.ones((2, 3), np.float32)}]

    def reference(f):
        return [f["x"] * 2, f["x"] + 1]

    def broken(f):
        return [f["x"] * 2, f["x"] + 1.5]

    good = verify("b", reference, reference, feeds, ["double", "plus"], Tolerance())
    assert good.passed and good.samples == 2 and good.failures == []
    bad = verify("b", broken, reference, feeds, ["double", "plus"], Tolerance())
    assert not bad.passed
    assert len(bad.failures) == 1 and "output 'plus'" in bad.failures[0]


def test_top1_enforced_only_for_classifiers():
    feeds = [{"x": np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)}]

    def reference(f):
        return [f["x"]]

    def swapped(f):
        return [f["x"][:, ::-1].copy()]

    loose = Tolerance(max_rel_err=10, min_cosine=-1, min_top1=1.0)
    assert verify("b", swapped, reference, feeds, ["y"], loose).passed
    strict = verify("b", swapped, reference, feeds, ["y"], loose, check_top1=True)
    assert not strict.passed and "top-1 agreement 0.0000" in strict.failures[0]
