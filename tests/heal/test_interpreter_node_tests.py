"""The heal interpreter on the ONNX backend node tests: right answers or a clear refusal, never a
wrong number.

Every node test whose ops the interpreter maps and whose inputs torch can hold (no float16, bfloat16,
float8, int4 or strings) runs through GraphModule and is compared with the expected outputs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

from slimgraph.errors import UnsupportedOpError
from slimgraph.heal.module import GraphModule
from slimgraph.heal.ops import op_types

HARNESS = Path(__file__).resolve().parents[2] / "benchmarks" / "node_tests.py"
_TORCH_DTYPES = {np.dtype(t) for t in (np.float32, np.float64, np.int8, np.int16, np.int32,
                                        np.int64, np.uint8, np.bool_)}


def _harness():
    spec = importlib.util.spec_from_file_location("node_tests", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _outcome(harness, case) -> str:
    model = ir.from_proto(case.model)
    try:
        module = GraphModule(model)
    except UnsupportedOpError:
        return "refused"
    for inputs, expected in case.data_sets:
        arrays = [harness._to_numpy(x) for x in (*inputs, *expected)]
        if any(not isinstance(a, np.ndarray) or a.dtype not in _TORCH_DTYPES for a in arrays):
            return "skipped"
        feeds = {v.name: torch.from_numpy(np.array(a))
                 for v, a in zip(model.graph.inputs, arrays[: len(inputs)], strict=False)}
        if len(feeds) < len(model.graph.inputs):
            return "skipped"
        try:
            with torch.no_grad():
                out = [o.numpy() for o in module(**feeds)]
        except UnsupportedOpError:
            return "refused"
        for got, want in zip(out, (harness._to_numpy(e) for e in expected), strict=True):
            if got.shape != want.shape or not np.allclose(
                    got.astype(np.float64), want.astype(np.float64), equal_nan=True,
                    rtol=max(case.rtol, 1e-4), atol=max(case.atol, 1e-5)):
                return "WRONG"
    return "pass"


@pytest.mark.slow
def test_interpreter_never_gives_a_wrong_answer() -> None:
    harness = _harness()
    known = op_types()
    cases = [c for c in harness.load_cases()
             if c.model.graph.node and all(n.op_type in known and n.domain in ("", "ai.onnx")
                                           for n in c.model.graph.node)]
    outcomes = {c.name: _outcome(harness, c) for c in cases}
    wrong = sorted(name for name, o in outcomes.items() if o == "WRONG")
    assert not wrong
    passed = sum(o == "pass" for o in outcomes.values())
    assert passed >= 700, f"only {passed} of {len(cases)} node tests pass"
