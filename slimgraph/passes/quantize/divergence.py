"""Where a quantized model first leaves its float original: the first tensor, in the float graph's
order, whose cosine to its float counterpart falls below a threshold.

Values keep their names through quantization (QDQ pairs are inserted beside them), so the two
graphs are compared name by name; values that only one graph has are skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from slimgraph.backends.ort import inputs_of, probe_session
from slimgraph.calibration import Feeds
from slimgraph.passes.quantize.layers import FLOAT


@dataclasses.dataclass(frozen=True)
class Divergence:
    """One tensor of the float graph and how far the quantized one has moved from it."""

    tensor: str
    node: str  # the producer in the float graph
    op_type: str
    cosine: float

    def describe(self) -> str:
        return f"{self.tensor} (output of {self.op_type} {self.node}), cosine {self.cosine:.5f}"


def tensor_cosines(reference: ir.Model, candidate: ir.Model, feeds: Sequence[Feeds],
                   dtypes: dict[str, ir.DataType]) -> list[Divergence]:
    """Cosine of every float tensor both graphs compute, in the reference graph's order."""
    theirs = ir.convenience.create_value_mapping(candidate.graph, include_subgraphs=False)
    names, producers = [], {}
    for node in reference.graph:
        for v in node.outputs:
            if v.name in theirs and dtypes.get(v.name) == FLOAT:
                names.append(v.name)
                producers[v.name] = node
    ref_session, ref_names = probe_session(reference, names)
    cand_session, cand_names = probe_session(candidate, names)
    names = [n for n in ref_names if n in set(cand_names)]
    dot = dict.fromkeys(names, 0.0)
    ref_sq = dict.fromkeys(names, 0.0)
    cand_sq = dict.fromkeys(names, 0.0)
    for feed in feeds:
        ref = dict(zip(names, ref_session.run(names, inputs_of(ref_session, feed)), strict=True))
        got = dict(zip(names, cand_session.run(names, inputs_of(cand_session, feed)), strict=True))
        for n in names:
            a, b = ref[n].astype(np.float64).ravel(), got[n].astype(np.float64).ravel()
            if a.shape != b.shape:
                continue
            dot[n] += float(a @ b)
            ref_sq[n] += float(a @ a)
            cand_sq[n] += float(b @ b)
    result = []
    for n in names:
        norms = np.sqrt(ref_sq[n] * cand_sq[n])
        cosine = dot[n] / norms if norms else float(ref_sq[n] == cand_sq[n])
        node = producers[n]
        result.append(Divergence(n, node.name or node.op_type, node.op_type, float(cosine)))
    return result


def first_divergence(reference: ir.Model, candidate: ir.Model, feeds: Sequence[Feeds],
                     dtypes: dict[str, ir.DataType], min_cosine: float) -> Divergence | None:
    """The first tensor whose cosine to the reference is below ``min_cosine``, or None."""
    return next(
        (d for d in tensor_cosines(reference, candidate, feeds, dtypes) if d.cosine < min_cosine),
        None,
    )
