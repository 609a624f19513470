"""fold-constants: constant folding, BatchNorm folding, identity and dead-node removal.

Constant folding is onnxscript's folder (nodes whose inputs are all constants are evaluated by
the ONNX reference implementation and become initializers), with two fixes for onnxscript 0.7.2:
its CastLike -> Cast rewrite drops ``saturate`` (restored here), and a partial evaluator that
raises (SplitToSequence with a scalar ``split`` graph input) aborts the whole pass (here the
node is left as it is and the failure is noted in the report). Where the ONNX reference
implementation itself fails on a node (onnx 1.23's GatherElements on MiniLM's position ids),
onnxscript logs a bare "Evaluation failed" warning per attempt; here it is one report note
naming the node.

BatchNormalization folding. In inference mode BN computes, per channel c,

    BN(y)_c = gamma_c * (y_c - mean_c) / sqrt(var_c + eps) + beta_c
            = s_c * y_c + (beta_c - s_c * mean_c)

with ``s = gamma / sqrt(var + eps)``. When ``y = W * x + b`` is linear in x with output channel
c owned by a slice of W (Conv: ``W[c]``; ConvTranspose: ``W[:, c]`` within its group; Gemm and
MatMul: column c of the right-hand matrix), the composition is again linear:

    W'_c = W_c * s_c        b'_c = (b_c - mean_c) * s_c + beta_c

(for Gemm, ``b = beta_attr * C`` and the ``beta`` attribute is dropped). The rewrite is exact up
to float rounding; it is computed in float64 and stored in the weight's dtype.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common
from onnxscript.optimizer import _constant_folding
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from slimgraph.passes.base import SlimgraphPass

logger = logging.getLogger(__name__)

_FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}
)
# onnxscript wraps any exception from a partial evaluator in a RuntimeError with this prefix.
_EVALUATOR_ERROR = "Error during constant folding for node"


class _ConstantFolder(_constant_folding.FoldConstantsPass):
    """onnxscript's folder (0.7.2), minus its two known bugs, counting what it folds."""

    def __init__(self) -> None:
        super().__init__(
            shape_inference=True,
            input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
            output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
        )
        self.folded = 0
        self.failures: list[str] = []
        self._node: ir.Node | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        _constant_folding.logger.addFilter(self._evaluator_failure)
        try:
            return super().call(model)
        finally:
            _constant_folding.logger.removeFilter(self._evaluator_failure)

    def _evaluator_failure(self, record: logging.LogRecord) -> bool:
        """Turn onnxscript's "Evaluation failed" warning into one failure note for the node."""
        if not record.getMessage().startswith("Evaluation failed") or self._node is None:
            return True
        reason = (f"{self._node.op_type} node {self._node.name!r} left unfolded: the ONNX "
                  f"reference implementation failed: {record.args[0] if record.args else ''}")
        if reason not in self.failures:
            logger.info("fold-constants: %s", reason)
            self.failures.append(reason)
        return False

    def process_node(
        self, node: ir.Node, is_function: bool
    ) -> _constant_folding.Replacement | None:
        self._node = node
        try:
            replacement = super().process_node(node, is_function)
        except RuntimeError as exc:
            if not str(exc).startswith(_EVALUATOR_ERROR):
                raise
            reason = f"{node.op_type} node {node.name!r} left unfolded: {exc.__cause__!r}"
            logger.warning("fold-constants: %s", reason)
            self.failures.append(reason)
            return None
        saturate = node.attributes.get("saturate")
        if replacement is not None and node.op_type == "CastLike" and saturate is not None:
            # onnxscript 0.7.2 rewrites CastLike into Cast(to=...) without ``saturate``, which
            # turns a non-saturating float8 cast into a saturating one.
            for new_node in replacement.new_nodes:
                if new_node.op_type == "Cast":
                    new_node.attributes["saturate"] = saturate
        return replacement

    def replace_node(
        self,
        node: ir.Node,
        replacement: _constant_folding.Replacement,
        root: ir.Graph | ir.Function,
    ) -> None:
        if node.op_type != "Identity" and all(
            v is not None and v.const_value is not None for v in replacement.new_outputs
        ):
            self.folded += 1
        super().replace_node(node, replacement, root)


class _FoldBatchNorm(RewriteRuleClassBase):
    """``BatchNormalization(Op(x, W[, b]))`` -> ``Op(x, W', b')`` for a linear ``Op``.

    Subclasses give the pattern (binding ``x``, ``w``, ``y`` = the linear op's output, and the
    BN inputs) and say which axis of W holds the output channels.
    """

    def channel_axis(self, node: ir.Node) -> int:
        raise NotImplementedError

    def check(
        self, context: Any, x: ir.Value, w: ir.Value, y: ir.Value, bn_out: ir.Value, **_: Any
    ) -> MatchResult:
        result = MatchResult()
        linear, bn = y.producer(), bn_out.producer()
        assert linear is not None and bn is not None
        if len(bn.outputs) != 1:
            return result.fail("BatchNormalization has training outputs")
        for attr_name, inference_value in (("training_mode", 0), ("spatial", 1)):
            attr = bn.attributes.get(attr_name)
            if attr is not None and (attr.is_ref() or attr.as_int() != inference_value):
                return result.fail(f"BatchNormalization {attr_name} is not {inference_value}")
        weight = _owned_constant(w, linear)
        if weight is None:
            return result.fail(f"weight {w.name!r} is not a constant used only by {linear.name!r}")
        if w.const_value.dtype not in _FLOAT_TYPES:
            return result.fail(f"weight {w.name!r} is not a float tensor")
        bias = self.bias(linear, bn_out)
        # The bias is added by the node feeding the BN: the linear op itself, or an Add.
        if bias is not None and _owned_constant(bias, bn.inputs[0].producer()) is None:
            return result.fail(f"bias {bias.name!r} is not a constant used only once")
        reason = self.check_shapes(linear, x, weight, bias)
        if reason:
            return result.fail(reason)
        channels = weight.shape[self.channel_axis(linear)] * self.channel_groups(linear)
        for param in bn.inputs[1:5]:
            if param is None or param.const_value is None or param.is_graph_input():
                return result.fail("BatchNormalization parameters are not all constants")
            if param.const_value.shape.dims != (channels,):
                return result.fail(f"BN parameter {param.name!r} is not of shape ({channels},)")
        return result

    def check_shapes(
        self, linear: ir.Node, x: ir.Value, weight: np.ndarray, bias: ir.Value | None
    ) -> str | None:
        """A reason not to fold, from the shapes involved, or None."""
        return None

    def channel_groups(self, linear: ir.Node) -> int:
        return 1

    def bias(self, linear: ir.Node, bn_out: ir.Value) -> ir.Value | None:
        """The value added to the linear op's output, if any."""
        return linear.inputs[2] if len(linear.inputs) > 2 else None

    def scale_weight(self, linear: ir.Node, weight: np.ndarray, s: np.ndarray) -> np.ndarray:
        shape = [1] * weight.ndim
        shape[self.channel_axis(linear)] = -1
        return weight * s.reshape(shape)

    def folded(self, linear: ir.Node, bn: ir.Node) -> tuple[ir.Tensor, ir.Tensor]:
        """W' and b' (see the module docstring), in the weight's dtype."""
        w = linear.inputs[1]
        weight = w.const_value.numpy()
        gamma, beta, mean, var = (v.const_value.numpy().astype(np.float64) for v in bn.inputs[1:5])
        eps = bn.attributes.get_float("epsilon", 1e-5)
        s = gamma / np.sqrt(var + eps)
        bias_value = self.bias(linear, bn.outputs[0])
        b = 0.0 if bias_value is None else bias_value.const_value.numpy().astype(np.float64)
        if linear.op_type == "Gemm":
            b = b * linear.attributes.get_float("beta", 1.0)
        new_w = self.scale_weight(linear, weight.astype(np.float64), s).astype(weight.dtype)
        new_b = ((b - mean) * s + beta).astype(weight.dtype)
        return ir.tensor(new_w), ir.tensor(new_b)

    def rewrite(
        self, op: Any, x: ir.Value, w: ir.Value, y: ir.Value, bn_out: ir.Value, **_: Any
    ) -> ir.Value:
        linear, bn = y.producer(), bn_out.producer()
        new_w, new_b = self.folded(linear, bn)
        w_value = op.initializer(new_w, name=_fresh_name(bn, f"{w.name}_bnfolded"))
        b_value = op.initializer(new_b, name=_fresh_name(bn, f"{bn_out.name}_bias"))
        attributes = {k: v for k, v in linear.attributes.items() if k != "beta"}
        if linear.op_type == "MatMul":
            return op.Add(op.MatMul(x, w_value), b_value)
        return op.op(linear.op_type, x, w_value, b_value, **attributes)


class FoldBatchNormIntoConv(_FoldBatchNorm):
    """``BatchNormalization(Conv(x, W[, b]))`` -> ``Conv(x, W', b')``."""

    def pattern(
        self,
        op: Any,
        x: ir.Value,
        w: ir.Value,
        scale: ir.Value,
        beta: ir.Value,
        mean: ir.Value,
        var: ir.Value,
    ) -> ir.Value:
        y = op.Conv(x, w, _allow_other_inputs=True, _outputs=["y"])
        return op.BatchNormalization(y, scale, beta, mean, var, _outputs=["bn_out"])

    def channel_axis(self, node: ir.Node) -> int:
        return 0


class FoldBatchNormIntoConvTranspose(_FoldBatchNorm):
    """``BatchNormalization(ConvTranspose(x, W[, b]))`` -> ``ConvTranspose(x, W', b')``."""

    def pattern(
        self,
        op: Any,
        x: ir.Value,
        w: ir.Value,
        scale: ir.Value,
        beta: ir.Value,
        mean: ir.Value,
        var: ir.Value,
    ) -> ir.Value:
        y = op.ConvTranspose(x, w, _allow_other_inputs=True, _outputs=["y"])
        return op.BatchNormalization(y, scale, beta, mean, var, _outputs=["bn_out"])

    def channel_axis(self, node: ir.Node) -> int:
        return 1

    def channel_groups(self, linear: ir.Node) -> int:
        return linear.attributes.get_int("group", 1)

    def check_shapes(
        self, linear: ir.Node, x: ir.Value, weight: np.ndarray, bias: ir.Value | None
    ) -> str | None:
        if weight.shape[0] % self.channel_groups(linear):
            return "ConvTranspose input channels are not divisible by group"
        return None

    def scale_weight(self, linear: ir.Node, weight: np.ndarray, s: np.ndarray) -> np.ndarray:
        # W is (C_in, C_out / group, k...); output channel g * C_out/group + j is W[g-th block, j].
        group = self.channel_groups(linear)
        c_in, c_out_per_group, *kernel = weight.shape
        blocks = weight.reshape(group, c_in // group, c_out_per_group, *kernel)
        factors = s.reshape(group, 1, c_out_per_group, *[1] * len(kernel))
        return (blocks * factors).reshape(weight.shape)


class FoldBatchNormIntoGemm(_FoldBatchNorm):
    """``BatchNormalization(Gemm(x, W[, C]))`` -> ``Gemm(x, W', C')`` (``beta`` folded into C')."""

    def pattern(
        self,
        op: Any,
        x: ir.Value,
        w: ir.Value,
        scale: ir.Value,
        beta: ir.Value,
        mean: ir.Value,
        var: ir.Value,
    ) -> ir.Value:
        y = op.Gemm(x, w, _allow_other_inputs=True, _outputs=["y"])
        return op.BatchNormalization(y, scale, beta, mean, var, _outputs=["bn_out"])

    def channel_axis(self, node: ir.Node) -> int:
        return 0 if node.attributes.get_int("transB", 0) else 1


class FoldBatchNormIntoMatMul(_FoldBatchNorm):
    """``BatchNormalization(MatMul(x, W))`` -> ``MatMul(x, W') + b'`` for 2-D x and W."""

    def pattern(
        self,
        op: Any,
        x: ir.Value,
        w: ir.Value,
        scale: ir.Value,
        beta: ir.Value,
        mean: ir.Value,
        var: ir.Value,
    ) -> ir.Value:
        y = op.MatMul(x, w, _outputs=["y"])
        return op.BatchNormalization(y, scale, beta, mean, var, _outputs=["bn_out"])

    def channel_axis(self, node: ir.Node) -> int:
        return 1

    def check_shapes(
        self, linear: ir.Node, x: ir.Value, weight: np.ndarray, bias: ir.Value | None
    ) -> str | None:
        # BN normalises axis 1; that is the column axis of W only when the product is 2-D.
        if weight.ndim != 2 or x.shape is None or x.shape.rank() != 2:
            return "MatMul operands are not both 2-D"
        return None

    def bias(self, linear: ir.Node, bn_out: ir.Value) -> ir.Value | None:
        return None


class FoldBatchNormIntoMatMulAdd(FoldBatchNormIntoMatMul):
    """``BatchNormalization(MatMul(x, W) + b)`` -> ``MatMul(x, W') + b'`` for 2-D x and W."""

    def pattern(
        self,
        op: Any,
        x: ir.Value,
        w: ir.Value,
        b: ir.Value,
        scale: ir.Value,
        beta: ir.Value,
        mean: ir.Value,
        var: ir.Value,
    ) -> ir.Value:
        y = op.MatMul(x, w, _outputs=["y"])
        return op.BatchNormalization(op.Add(y, b), scale, beta, mean, var, _outputs=["bn_out"])

    def check_shapes(
        self, linear: ir.Node, x: ir.Value, weight: np.ndarray, bias: ir.Value | None
    ) -> str | None:
        reason = super().check_shapes(linear, x, weight, bias)
        if reason is None and bias is not None and bias.const_value.shape.rank() > 2:
            return "the bias would broadcast the product beyond 2-D"
        return reason

    def bias(self, linear: ir.Node, bn_out: ir.Value) -> ir.Value | None:
        add = bn_out.producer().inputs[0].producer()
        a, b = add.inputs
        return b if a is linear.outputs[0] else a


BATCHNORM_RULES = RewriteRuleSet(
    [
        FoldBatchNormIntoConv().rule(),
        FoldBatchNormIntoConvTranspose().rule(),
        FoldBatchNormIntoGemm().rule(),
        FoldBatchNormIntoMatMulAdd().rule(),
        FoldBatchNormIntoMatMul().rule(),
    ],
    commute=True,
)


class FoldConstantsPass(SlimgraphPass):
    """Folds constants and BatchNorms, removes identities, dead nodes and unused initializers."""

    name = "fold-constants"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        identities_before = _count_ops(model.graph, "Identity")
        nodes_before = _count_ops(model.graph)
        initializers_before = len(model.graph.initializers)

        folder = _ConstantFolder()
        modified = folder(model).modified
        batchnorms = BATCHNORM_RULES.apply_to_model(model)
        modified |= bool(batchnorms)
        # The folder already forwards Identity outputs to their inputs (dead Identities are then
        # removed below); onnx_ir 1.1's IdentityEliminationPass is not used because it merges two
        # graph outputs into one when an Identity connects them (Scan bodies, test_scan_sum).
        modified |= common.RemoveUnusedNodesPass()(model).modified

        self.report.count("constants_folded", folder.folded)
        self.report.count("batchnorms_folded", batchnorms)
        self.report.count(
            "identities_removed", identities_before - _count_ops(model.graph, "Identity")
        )
        self.report.count("nodes_removed", nodes_before - _count_ops(model.graph))
        self.report.count(
            "initializers_removed", initializers_before - len(model.graph.initializers)
        )
        if folder.failures:
            self.report.count("fold_failures", len(folder.failures))
            self.report.notes.extend(folder.failures)
        logger.info("fold-constants: %s", self.report.counts)
        return ir.passes.PassResult(model, modified)


def _count_ops(graph: ir.Graph, op_type: str | None = None) -> int:
    return sum(
        1
        for node in ir.traversal.RecursiveGraphIterator(graph)
        if op_type is None or (node.op_type == op_type and node.domain in ("", "ai.onnx"))
    )


def _owned_constant(value: ir.Value | None, owner: ir.Node) -> np.ndarray | None:
    """The value's array if it is a constant (not a graph input) consumed by ``owner`` alone."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    if value.is_graph_output() or any(user is not owner for user, _ in value.uses()):
        return None
    return value.const_value.numpy()


def _fresh_name(node: ir.Node, base: str) -> str:
    """``base`` or ``base_<n>``: a name no value of the node's graph uses yet."""
    graph = node.graph
    if graph is None:
        return base
    taken = set(graph.initializers) | {v.name for v in graph.inputs}
    taken |= {v.name for n in graph for v in n.outputs}
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


__all__ = [
    "BATCHNORM_RULES",
    "FoldBatchNormIntoConv",
    "FoldBatchNormIntoConvTranspose",
    "FoldBatchNormIntoGemm",
    "FoldBatchNormIntoMatMul",
    "FoldBatchNormIntoMatMulAdd",
    "FoldConstantsPass",
]
