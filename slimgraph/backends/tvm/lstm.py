"""ONNX LSTM -> an unrolled loop of MatMul/Add/Sigmoid/Tanh/Mul, for TVM's Relax frontend (which
has no LSTM converter in apache-tvm 0.27).

Per direction, with ONNX's gate order (i, o, f, c), W_d = W[d], R_d = R[d], b_d = Wb[d] + Rb[d]:

    G_t = X_t W_d^T + H_{t-1} R_d^T + b_d              (the X part for all t in one MatMul)
    i = sigmoid(G_i + P_i * C_{t-1})    f = sigmoid(G_f + P_f * C_{t-1})    c = tanh(G_c)
    C_t = f * C_{t-1} + i * c           o = sigmoid(G_o + P_o * C_t)        H_t = o * tanh(C_t)

The same operations in the same order as the definition, so the result equals onnxruntime's up
to float summation order. Without initial states, H_0 = C_0 = 0 and the first step drops those
terms instead of building zeros of the batch's shape. Needs a static sequence length; refuses
``layout=1``, ``sequence_lens``, ``clip``, ``input_forget`` and non-default activations, naming
the reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

DEFAULT_ACTIVATIONS = ("Sigmoid", "Tanh", "Tanh")


class UnrollLSTM(RewriteRuleClassBase):
    """``LSTM(X, W, R[, B, sequence_lens, initial_h, initial_c, P])`` with ``outputs`` outputs
    -> the unrolled recurrence (see the module docstring)."""

    def __init__(self, outputs: int) -> None:
        super().__init__(name=f"UnrollLSTM{outputs}")
        self.outputs = outputs

    def pattern(self, op: Any, x: ir.Value, w: ir.Value, r: ir.Value) -> Any:
        return op.LSTM(x, w, r, _allow_other_inputs=True, _allow_other_attributes=True,
                       _outputs=[f"out{i}" for i in range(self.outputs)])

    def check(self, context: Any, x: ir.Value, **outputs: ir.Value) -> MatchResult:
        result = MatchResult()
        node = outputs["out0"].producer()
        if len(node.outputs) != self.outputs:
            return result.fail(f"the LSTM has {len(node.outputs)} outputs, not {self.outputs}")
        reason = refusal(node)
        return result.fail(reason) if reason else result

    def rewrite(self, op: Any, x: ir.Value, w: ir.Value, r: ir.Value,
                **outputs: ir.Value) -> list[ir.Value]:
        node = outputs["out0"].producer()
        inputs = [*node.inputs, *[None] * (8 - len(node.inputs))]
        bias, _, initial_h, initial_c, peephole = inputs[3:8]
        hidden = node.attributes.get_int("hidden_size")
        direction = node.attributes.get_string("direction", "forward")
        steps = x.shape[0]
        sizes = op.Constant(value_ints=[hidden] * 4)
        ys, hs, cs = [], [], []
        for d, reverse in enumerate(_directions(direction)):
            index = op.Constant(value=ir.tensor(np.array(d, np.int64)))

            def pick(value: ir.Value | None, index: ir.Value = index) -> ir.Value | None:
                return None if value is None else op.Gather(value, index, axis=0)

            projected = op.MatMul(x, op.Transpose(pick(w), perm=[1, 0]))  # [T, N, 4H]
            if bias is not None:
                wb, rb = op.Split(pick(bias), op.Constant(value_ints=[4 * hidden] * 2), _outputs=2)
                projected = op.Add(projected, op.Add(wb, rb))
            r_t = op.Transpose(pick(r), perm=[1, 0])
            p_i = p_o = p_f = None
            if peephole is not None:
                p_i, p_o, p_f = op.Split(pick(peephole), op.Constant(value_ints=[hidden] * 3),
                                         _outputs=3)
            h, c = pick(initial_h), pick(initial_c)
            y = [None] * steps
            for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
                gates = op.Gather(projected, op.Constant(value=ir.tensor(np.array(t, np.int64))),
                                  axis=0)
                if h is not None:
                    gates = op.Add(gates, op.MatMul(h, r_t))
                g_i, g_o, g_f, g_c = op.Split(gates, sizes, axis=-1, _outputs=4)
                if c is not None and p_i is not None:
                    g_i, g_f = op.Add(g_i, op.Mul(p_i, c)), op.Add(g_f, op.Mul(p_f, c))
                new_c = op.Mul(op.Sigmoid(g_i), op.Tanh(g_c))
                if c is not None:
                    new_c = op.Add(op.Mul(op.Sigmoid(g_f), c), new_c)
                c = new_c
                if p_o is not None:
                    g_o = op.Add(g_o, op.Mul(p_o, c))
                h = op.Mul(op.Sigmoid(g_o), op.Tanh(c))
                y[t] = op.Unsqueeze(h, op.Constant(value_ints=[0, 1]))  # [1, 1, N, H]
            ys.append(op.Concat(*y, axis=0))
            hs.append(op.Unsqueeze(h, op.Constant(value_ints=[0])))
            cs.append(op.Unsqueeze(c, op.Constant(value_ints=[0])))
        merged = [v[0] if len(v) == 1 else op.Concat(*v, axis=axis)
                  for v, axis in ((ys, 1), (hs, 0), (cs, 0))]
        return merged[: self.outputs]


def refusal(node: ir.Node) -> str | None:
    """Why ``node`` (an LSTM) cannot be unrolled, or None."""
    attributes = node.attributes
    x = node.inputs[0]
    if attributes.get_int("layout", 0) != 0:
        return "layout=1 (batch-major; onnxruntime has no kernel to check it against either)"
    if x.shape is None or x.shape.rank() != 3 or not isinstance(x.shape[0], int):
        return f"the sequence length of {x.name!r} is not static (shape {x.shape})"
    if len(node.inputs) > 4 and node.inputs[4] is not None:
        return "sequence_lens is given"
    if "clip" in attributes:
        return "clip is set"
    if attributes.get_int("input_forget", 0):
        return "input_forget=1"
    direction = attributes.get_string("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        return f"direction={direction!r}"
    activations = attributes.get_strings("activations", None)
    if activations is not None and tuple(activations) != DEFAULT_ACTIVATIONS * len(
        _directions(direction)
    ):
        return f"activations={list(activations)} are not the default {list(DEFAULT_ACTIVATIONS)}"
    return None


def _directions(direction: str) -> tuple[bool, ...]:
    """``reverse`` flags, one per direction."""
    return {"forward": (False,), "reverse": (True,), "bidirectional": (False, True)}[direction]


# most outputs first: a rule binding fewer outputs would leave the others dangling
rules = RewriteRuleSet([UnrollLSTM.rule(n) for n in (3, 2, 1)])
