"""fold-constants: constant folding, BatchNorm folding, identity and dead-node removal.

PLACEHOLDER (being replaced): runs onnx_ir's common cleanup passes only.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common

from slimgraph.passes.base import SlimgraphPass


class FoldConstantsPass(SlimgraphPass):
    name = "fold-constants"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = sum(1 for _ in model.graph)
        result = ir.passes.Sequential(
            common.IdentityEliminationPass(), common.RemoveUnusedNodesPass()
        )(model)
        self.report.count("nodes_removed", before - sum(1 for _ in model.graph))
        return ir.passes.PassResult(model, result.modified)
