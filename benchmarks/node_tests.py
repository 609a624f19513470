"""Semantic preservation of fold-constants on the ONNX backend node-test corpus.

Each node test (``onnx.backend.test.loader.load_node_model_tests()``) is run in onnxruntime CPU
before and after FoldConstantsPass. A case that matches its expected outputs before and not after
(or that the full ONNX checker accepted before and rejects after, or on which the pass raises) is
a regression.

    python benchmarks/node_tests.py        # whole corpus -> benchmarks/results/node_tests.{json,md}
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import platform
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx.backend.test.case.test_case import TestCase

from slimgraph.passes.fold_constants import FoldConstantsPass

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Outcomes of running one model on one case.
PASS = "pass"
MISMATCH = "mismatch"  # ran, but outputs differ from the expected ones
UNSUPPORTED = "unsupported"  # onnxruntime cannot create a session for it
RUN_ERROR = "run_error"  # the session was created but running it raised


@dataclasses.dataclass
class CaseResult:
    """What happened to one node test before and after the pass."""

    name: str
    before: str
    after: str | None = None  # None: not run after (it did not pass before, or the pass raised)
    checker_before: bool = True
    checker_after: bool | None = None
    pass_error: str | None = None
    detail: str | None = None
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def regression(self) -> bool:
        if self.pass_error is not None:
            return True
        if self.before == PASS and self.after != PASS:
            return True
        return self.checker_before and self.checker_after is False


def load_cases() -> list[TestCase]:
    """All node tests, sorted by name (the loader builds them in memory)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators overflow float8 casts on purpose
        from onnx.backend.test.loader import load_node_model_tests

        cases = load_node_model_tests()
    return sorted(cases, key=lambda c: c.name)


def fold(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The model after FoldConstantsPass, and the pass's counts."""
    model_ir = ir.serde.deserialize_model(model)
    fold_pass = FoldConstantsPass()
    fold_pass(model_ir)
    return ir.serde.serialize_model(model_ir), dict(fold_pass.report.counts)


def run_model(model: onnx.ModelProto, case: TestCase) -> tuple[str, str | None]:
    """Run ``model`` on every data set of ``case``; the outcome and a short reason."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # any session-creation failure means "ORT does not run this"
        return UNSUPPORTED, _short(exc)
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]
    for inputs, expected in case.data_sets:
        feeds = {
            n: _feed(_to_numpy(v))
            for n, v in zip(input_names, inputs, strict=False)
            if v is not None
        }
        try:
            outputs = _run(session, output_names, feeds)
        except Exception as exc:
            return RUN_ERROR, _short(exc)
        reason = compare(outputs, [_to_numpy(e) for e in expected], case.rtol, case.atol)
        if reason:
            return MISMATCH, reason
    return PASS, None


def _run(session: ort.InferenceSession, names: list[str], feeds: dict[str, Any]) -> list[Any]:
    try:
        return session.run(names, feeds)
    except RuntimeError as exc:
        if "No corresponding Numpy type" not in str(exc):
            raise
    # onnxruntime 1.32 cannot hand out some float8 outputs as numpy: copy their raw bits.
    ort_feeds = {
        k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v)
        for k, v in feeds.items()
    }
    values = session.run_with_ort_values(names, ort_feeds)
    return [_raw_tensor(v) if v.is_tensor() else v.numpy() for v in values]


def _raw_tensor(value: ort.OrtValue) -> np.ndarray:
    dtype = _ORT_TYPE_NAMES.get(value.data_type())
    if dtype is None:
        return value.numpy()
    nbytes = value.tensor_size_in_bytes()
    raw = (ctypes.c_uint8 * nbytes).from_address(value.data_ptr())
    return np.frombuffer(bytes(raw), dtype=dtype).reshape(value.shape())


_ORT_TYPE_NAMES = {
    f"tensor({onnx.TensorProto.DataType.Name(t).lower()})": onnx.helper.tensor_dtype_to_np_dtype(t)
    for t in (
        onnx.TensorProto.FLOAT8E4M3FN,
        onnx.TensorProto.FLOAT8E4M3FNUZ,
        onnx.TensorProto.FLOAT8E5M2,
        onnx.TensorProto.FLOAT8E5M2FNUZ,
    )
}


def compare(actual: Sequence[Any], expected: Sequence[Any], rtol: float, atol: float) -> str | None:
    """Why ``actual`` does not match ``expected`` (tensors, sequences, optionals), or None."""
    if len(actual) != len(expected):
        return f"{len(actual)} outputs, expected {len(expected)}"
    for i, (got, want) in enumerate(zip(actual, expected, strict=True)):
        reason = _compare_one(got, want, rtol, atol)
        if reason:
            return f"output {i}: {reason}"
    return None


def _compare_one(got: Any, want: Any, rtol: float, atol: float) -> str | None:
    if want is None or got is None:
        return None if want is None and got is None else f"got {type(got)}, expected {type(want)}"
    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            return f"sequence mismatch: got {type(got).__name__}, expected {len(want)} items"
        for g, w in zip(got, want, strict=True):
            reason = _compare_one(g, w, rtol, atol)
            if reason:
                return reason
        return None
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return f"shape {got.shape}, expected {want.shape}"
    if want.dtype == object or want.dtype.kind in "USb":
        return None if np.array_equal(got, want) else "values differ"
    if _is_ml_dtype(want.dtype) and got.dtype.kind == "u" and got.itemsize == want.itemsize:
        got = got.view(want.dtype)  # onnxruntime returns float8/bfloat16 tensors as raw bits
    if got.dtype != want.dtype:
        return f"dtype {got.dtype}, expected {want.dtype}"
    # float8/bfloat16/int4 (ml_dtypes) do not promote with Python floats: compare as float64.
    g, w = got.astype(np.float64), want.astype(np.float64)
    if not np.allclose(g, w, rtol=rtol, atol=atol, equal_nan=True):
        bad = ~np.isclose(g, w, rtol=rtol, atol=atol, equal_nan=True)
        return f"{bad.sum()} of {bad.size} values differ, e.g. {g[bad][0]} vs {w[bad][0]}"
    return None


def _to_numpy(value: Any) -> Any:
    """Test data as numpy: the cases keep float8/int4 tensors (and some others) as TensorProto."""
    if isinstance(value, onnx.TensorProto):
        return onnx.numpy_helper.to_array(value)
    if isinstance(value, (list, tuple)):
        return [_to_numpy(v) for v in value]
    return value


def _is_ml_dtype(dtype: np.dtype) -> bool:
    return dtype.type.__module__ != "numpy"


def _feed(value: Any) -> Any:
    """An onnxruntime feed; ml_dtypes arrays (float8, bfloat16, ...) go in as typed raw bits."""
    if isinstance(value, np.ndarray) and _is_ml_dtype(value.dtype):
        bits = value.view(np.dtype(f"u{value.itemsize}"))
        elem_type = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, elem_type)
    return value


def _checker_ok(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        return False
    return True


def check_case(
    case: TestCase,
    transform: Callable[[onnx.ModelProto], tuple[onnx.ModelProto, dict[str, int]]] = fold,
) -> CaseResult:
    """Run one node test before and after ``transform`` (FoldConstantsPass by default)."""
    before, detail = run_model(case.model, case)
    result = CaseResult(case.name, before, detail=detail, checker_before=_checker_ok(case.model))
    try:
        folded, result.counts = transform(case.model)
    except Exception as exc:  # the pass itself failing is the result being measured
        result.pass_error = _short(exc)
        return result
    result.checker_after = _checker_ok(folded)
    if before == PASS:
        result.after, detail = run_model(folded, case)
        if detail:
            result.detail = detail
    return result


def run_suite(cases: Sequence[TestCase]) -> list[CaseResult]:
    """Check every case; one result per case, in order."""
    return [check_case(case) for case in cases]


def summarize(results: Sequence[CaseResult], seconds: float) -> dict[str, Any]:
    """Totals for the results files."""
    before = Counter(r.before for r in results)
    changed = [
        r for r in results if r.counts.get("nodes_removed") or r.counts.get("constants_folded")
    ]
    return {
        "cases": len(results),
        "ort_pass_before": before[PASS],
        "ort_mismatch_before": before[MISMATCH],
        "ort_unsupported": before[UNSUPPORTED],
        "ort_run_error_before": before[RUN_ERROR],
        "pass_after": sum(r.after == PASS for r in results),
        "checker_ok_before": sum(r.checker_before for r in results),
        "checker_ok_after": sum(bool(r.checker_after) for r in results),
        "models_changed_by_pass": len(changed),
        "regressions": sorted(r.name for r in results if r.regression),
        "pass_errors": sorted(r.name for r in results if r.pass_error),
        "regression_details": {
            r.name: r.pass_error or r.detail or "checker rejects the folded model"
            for r in results
            if r.regression
        },
        "seconds": round(seconds, 1),
        "versions": {
            "python": platform.python_version(),
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "onnx_ir": ir.__version__,
        },
    }


def write_results(summary: dict[str, Any], results_dir: Path = RESULTS_DIR) -> None:
    """benchmarks/results/node_tests.json and .md."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "node_tests.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = [
        ("node-test cases", summary["cases"]),
        ("pass in onnxruntime before the pass", summary["ort_pass_before"]),
        (
            "  mismatch before (ORT differs from the expected outputs)",
            summary["ort_mismatch_before"],
        ),
        ("  unsupported (ORT cannot create a session)", summary["ort_unsupported"]),
        ("  run error before", summary["ort_run_error_before"]),
        ("pass after fold-constants", summary["pass_after"]),
        ("models changed by the pass", summary["models_changed_by_pass"]),
        (
            "full ONNX checker ok before / after",
            f"{summary['checker_ok_before']} / {summary['checker_ok_after']}",
        ),
        ("regressions", len(summary["regressions"])),
        ("pass errors", len(summary["pass_errors"])),
        ("time (s)", summary["seconds"]),
    ]
    lines = [
        "# fold-constants on the ONNX node-test corpus",
        "",
        "Produced by `python benchmarks/node_tests.py` (onnxruntime CPU, graph optimizations off).",
        "",
        "| | |",
        "|---|---:|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()) + ".",
        "",
    ]
    if summary["regressions"]:
        lines += ["## Regressions", ""]
        lines += [f"- `{n}`: {summary['regression_details'][n]}" for n in summary["regressions"]]
        lines.append("")
    (results_dir / "node_tests.md").write_text("\n".join(lines))


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text[:300]


def main() -> int:
    start = time.perf_counter()
    cases = load_cases()
    results = run_suite(cases)
    summary = summarize(results, time.perf_counter() - start)
    write_results(summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "regression_details"}, indent=2))
    return 1 if summary["regressions"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
