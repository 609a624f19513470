"""The base class of every slimgraph pass: an onnx_ir in-place pass that fills a PassReport."""

from __future__ import annotations

import inspect
import time
from typing import Any, ClassVar

import onnx_ir as ir

from slimgraph.calibration import Calibration
from slimgraph.errors import PipelineSpecError
from slimgraph.model_stats import weight_bytes
from slimgraph.passes.report import PassReport
from slimgraph.tolerance import EXACT, Tolerance


class SlimgraphPass(ir.passes.InPlacePass):
    """An in-place pass with a registry name, a declared tolerance and a report of what it did.

    Subclasses take their options as keyword arguments of ``__init__`` (annotated, so the spec
    parser can coerce CLI strings), implement ``call(model)`` and count into ``self.report``.
    """

    name: ClassVar[str]
    tolerance: ClassVar[Tolerance] = EXACT
    needs_calibration: ClassVar[bool] = False  # export() binds its Calibration before running
    calibration: Calibration | None = None
    needs_training: ClassVar[bool] = False  # export() binds heal.data.TrainingData before running
    training: Any = None
    # Passes that judge their own result (quantize's accuracy guard) get the data the artifact is
    # verified on, and whether top-1 agreement binds there (classification), from export().
    wants_verification: ClassVar[bool] = False
    verification: list | None = None
    check_top1: bool = False

    def __init__(self) -> None:
        self.report = PassReport(self.name, options=self.options())

    def options(self) -> dict[str, Any]:
        """The pass's options as given to ``__init__`` (read back from same-named attributes)."""
        params = inspect.signature(type(self).__init__).parameters
        return {k: getattr(self, k) for k in params if k != "self" and hasattr(self, k)}

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> ir.passes.PassResult:
        model = (
            model_or_result.model
            if isinstance(model_or_result, ir.passes.PassResult)
            else model_or_result
        )
        self.report = PassReport(self.name, options=self.options())
        self.report.nodes_before = _node_count(model.graph)
        self.report.weight_bytes_before = weight_bytes(model)
        start = time.perf_counter()
        result = super().__call__(model)
        self.report.seconds = round(time.perf_counter() - start, 4)
        self.report.modified = result.modified
        self.report.nodes_after = _node_count(result.model.graph)
        self.report.weight_bytes_after = weight_bytes(result.model)
        return result

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


def _node_count(graph: ir.Graph) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(graph))


def one_of(where: str, option: str, value: object, choices: tuple) -> None:
    """Refuse an option value outside ``choices`` with the message every pass gives."""
    if value not in choices:
        raise PipelineSpecError(f"{where}: {option} must be one of "
                                f"{', '.join(map(str, choices))}, got {value!r}")
