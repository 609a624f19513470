"""GraphModule: an onnx_ir graph as a trainable torch.nn.Module, and the write-back of its weights.

The module interprets the graph's nodes in order with the torch functions of ``ops``. What the
passes decided stays fixed while the weights move:

- float initializers (more than one element, not a quantization scale) are ``nn.Parameter``s keyed
  by initializer name; a rank >= 2 one with exact zeros keeps them (a fixed sparsity mask), and so
  does entry 0 of a share-weights codebook tagged ``slimgraph.codebook_zero``;
- ``DequantizeLinear`` of a constant int8 / int4 / int32 tensor reads a float master weight through
  fake-quant at the pass's scales and zero points (straight-through estimator), and is written
  back as integers of the same type with the same scales;
- a binary weight (the pass's packed-sign decode, tagged ``slimgraph.binary_weight``) is a latent
  float weight whose forward is ``sign(w)`` with the gradient passed where ``|w| <= 1``
  (BinaryConnect); its signs are repacked into the same bits;
- quantization scales stay fixed unless ``learn_scales`` (then they train, LSQ style);
- everything else (integer weights of MatMulInteger, int8 embedding rows, shapes) is a buffer.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from slimgraph.bits import pack_signs
from slimgraph.errors import UnsupportedOpError
from slimgraph.heal.ops import QUANT_RANGES, as_list, bind, expand_qparam, fake_quant, resolve
from slimgraph.tags import BINARY_WEIGHT_TAG, CODEBOOK_ZERO_TAG

_INTEGER_TYPES = frozenset({ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4,
                            ir.DataType.UINT4, ir.DataType.INT32, ir.DataType.INT16})
_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
# Latent binary weights start at +-0.5: inside BinaryConnect's [-1, 1] gradient window, and a
# sign flips once the updates have moved a weight by half its range.
BINARY_LATENT_START = 0.5


class BinarySign(torch.autograd.Function):
    """sign(w) with +1 at 0 (the packed format's convention); gradient passed where |w| <= 1."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1).to(grad.dtype)


@dataclasses.dataclass
class _Step:
    """One node to run, or a stand-in (``run`` set) that computes ``outputs[0]`` instead."""

    outputs: list[str]
    inputs: list[str | None]
    node: ir.Node | None = None
    op: Callable | None = None
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)
    run: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None


@dataclasses.dataclass
class QuantizedWeight:
    """A DequantizeLinear of a constant integer tensor, trained through fake-quant."""

    node: ir.Node
    value: ir.Value  # the integer initializer written back
    key: str  # parameter key of the float master weight
    qrange: tuple[int, int]
    axis: int
    block: int


@dataclasses.dataclass
class BinaryWeight:
    """A packed-sign decode: latent float weight -> sign, repacked into ``bits`` on write-back."""

    signs: str  # the value holding +-1 (input of the tagged Mul)
    bits: ir.Value
    key: str


def _key(name: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", name) or "_"
    key, i = base, 0
    while key in taken:
        i += 1
        key = f"{base}_{i}"
    taken.add(key)
    return key


def _attrs(node: ir.Node) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, attr in node.attributes.items():
        if attr.type == ir.AttributeType.TENSOR:
            out[name] = torch.from_numpy(np.array(attr.value.numpy()))
        elif attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            raise UnsupportedOpError(f"node {node.name!r} ({node.op_type}) has a subgraph")
        else:
            value = attr.value
            out[name] = list(value) if isinstance(value, (tuple, list)) else (
                int(value) if isinstance(value, ir.DataType) else value)
    return out


def _to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype.name in ("int4", "uint4"):
        array = array.astype(np.int8 if array.dtype.name == "int4" else np.uint8)
    return torch.from_numpy(np.array(array, copy=True))


def layer_taps(student: ir.Model, teacher: ir.Model) -> list[str]:
    """LayerNormalization outputs that both graphs compute under the same name (the hidden states
    a pruned transformer keeps at full width), in the student's order."""
    produced = {v.name for n in teacher.graph if n.op_type == "LayerNormalization" for v in n.outputs}
    return [n.outputs[0].name for n in student.graph
            if n.op_type == "LayerNormalization" and n.outputs[0].name in produced]


def _opset(model: ir.Model, domain: str) -> int | None:
    if domain in ("", "ai.onnx"):
        return model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    return model.opset_imports.get(domain)


def _bound(model: ir.Model, node: ir.Node) -> tuple[Callable, dict[str, Any]] | str:
    """The op for ``node`` under the model's opset with its keyword arguments, or why not."""
    op = resolve(node.op_type, node.domain, _opset(model, node.domain))
    if op is None:
        return ""
    try:
        return op, bind(op, _attrs(node), len(node.outputs))
    except ValueError as exc:  # an attribute the op does not declare
        return str(exc)


def _refusals(nodes: list[ir.Node], bound: list) -> list[str]:
    out = []
    for n, b in zip(nodes, bound, strict=True):
        if isinstance(b, str):
            domain = n.domain + "." if n.domain not in ("", "ai.onnx") else ""
            out.append(f"{domain}{n.op_type} ({n.name}{': ' + b if b else ''})")
    return out


def unsupported_nodes(model: ir.Model) -> list[str]:
    """``OpType (node name)`` for every node the interpreter cannot run under the model's opset,
    with the reason where it is an attribute, in graph order."""
    nodes = list(model.graph)
    return _refusals(nodes, [_bound(model, n) for n in nodes])


def _consumers(value: ir.Value) -> list[tuple[ir.Node, int]]:
    return [(use.node, use.idx) for use in value.uses()]


def _is_scale(value: ir.Value) -> bool:
    """Whether a float initializer is a quantization parameter: it reaches input 1 or 2 of a Q/DQ
    node through Cast/Mul (a bias scale is ``s_x * s_w``), or it is an int8 embedding's row scales.
    """
    frontier, seen = [value], set()
    while frontier:
        v = frontier.pop()
        for node, idx in _consumers(v):
            if node.op_type in _QDQ and idx >= 1:
                return True
            if node.op_type in ("Cast", "Mul") and id(node) not in seen:
                seen.add(id(node))
                if node.op_type == "Cast" or all(
                        i is not None and i.const_value is not None or i is v for i in node.inputs):
                    frontier.extend(node.outputs)
            if node.op_type == "Gather" and idx == 0 and _row_scales(node):
                return True
    return False


def _row_scales(gather: ir.Node) -> bool:
    """``Gather(s, ids)`` multiplied into ``Cast(Gather(int8 table, ids))``: per-row scales."""
    for mul, _ in _consumers(gather.outputs[0]):
        if mul.op_type != "Mul":
            continue
        for other in mul.inputs:
            producer = other.producer() if other is not None else None
            if producer is not None and producer.op_type == "Cast":
                inner = producer.inputs[0].producer()
                if inner is not None and inner.op_type == "Gather" and \
                        inner.inputs[0].const_value is not None and \
                        inner.inputs[0].const_value.dtype in _INTEGER_TYPES:
                    return True
    return False


def _bits_of(signs: ir.Value) -> ir.Value | None:
    """The uint8 initializer a binary decode starts from (walking producers' first inputs)."""
    value: ir.Value | None = signs
    while value is not None and value.producer() is not None:
        value = value.producer().inputs[0]
    if value is not None and value.const_value is not None and \
            value.const_value.dtype == ir.DataType.UINT8:
        return value
    return None


def _static_shape(name: str | None, static: dict[str, torch.Tensor]) -> tuple[int, ...]:
    value = static.get(name) if name else None
    return tuple(value.shape) if value is not None else ()


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return torch.addmm(b, x, w)
    return torch.addmm(b, x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[1])


class GraphModule(nn.Module):
    """Run an onnx_ir graph in torch; float weights, fake-quant masters and binary latents train."""

    def __init__(self, model: ir.Model, *, learn_scales: bool = False) -> None:
        super().__init__()
        nodes = list(model.graph)
        bound = [_bound(model, n) for n in nodes]  # resolved and bound once, refused or used
        bad = _refusals(nodes, bound)
        if bad:
            raise UnsupportedOpError(
                f"heal cannot train {len(bad)} node(s) of op types "
                f"{', '.join(sorted({b.split(' ')[0] for b in bad}))}: {', '.join(bad)}"
            )
        graph = model.graph
        self.input_names = [v.name for v in graph.inputs]
        self.output_names = [v.name for v in graph.outputs]
        self.weights = nn.ParameterDict()  # trainable tensors, by sanitized initializer name
        self.constants = nn.Module()  # buffers
        self._taken: set[str] = set()
        self._dtype: dict[str, torch.dtype] = {}  # initializer -> dtype it has in the graph
        self._param_of: dict[str, str] = {}  # initializer name -> weights key
        self._buffer_of: dict[str, str] = {}
        self._mask_of: dict[str, str] = {}  # weights key -> buffer key of its sparsity mask
        self.quantized: list[QuantizedWeight] = []
        self.binary: list[BinaryWeight] = []
        self._initializers = dict(graph.initializers)

        raw = {name: _to_torch(v.const_value.numpy()) for name, v in self._initializers.items()
               if v.const_value is not None}
        steps = [_Step([o.name for o in n.outputs],
                       [i.name if i is not None else None for i in n.inputs], n, *b)
                 for n, b in zip(nodes, bound, strict=True)]
        static = self._static_env(steps, raw)

        standins: dict[str, _Step] = {}
        for node in graph:
            if node.metadata_props.get(BINARY_WEIGHT_TAG) and node.op_type == "Mul":
                self._add_binary(node, static, standins)
        for node in graph:
            if node.op_type == "DequantizeLinear":
                self._add_quantized(node, static, standins, learn_scales)
        for name, value in self._initializers.items():
            if name in self._param_of or name not in raw:
                continue
            tensor = raw[name]
            trainable = tensor.dtype.is_floating_point and (
                (learn_scales and _is_scale(value)) or (tensor.numel() > 1 and not _is_scale(value))
            )
            self._dtype[name] = tensor.dtype
            if trainable:
                key = self._add_param(name, tensor.float())
                if tensor.dim() >= 2 and bool((tensor == 0).any()):
                    self._mask_of[key] = self._add_buffer(f"{name}__mask", (tensor != 0).float())
            else:
                self._buffer_of[name] = self._add_buffer(name, tensor)
        for node in graph:  # share-weights' codebooks whose entry 0 is a sparse weight's zero
            key = self._param_of.get(node.inputs[0].name) if node.inputs else None
            if node.metadata_props.get(CODEBOOK_ZERO_TAG) and key and key not in self._mask_of:
                mask = torch.ones_like(self.weights[key])
                mask[0] = 0
                self._mask_of[key] = self._add_buffer(f"{node.inputs[0].name}__mask", mask)
        special = {q.value.name for q in self.quantized} | {b.bits.name for b in self.binary}
        self.frozen_integer = [  # dynamic int8 MatMulInteger weights, int8 embedding rows
            name for name, value in self._initializers.items()
            if value.const_value is not None and value.const_value.dtype in _INTEGER_TYPES
            and name not in special
            and any(n.op_type in ("MatMulInteger", "Gather") for n, _ in _consumers(value))
        ]
        self._graph_initializers = [n for n in self._initializers if n not in special and (
            n in self._param_of or n in self._buffer_of)]
        self.taps: list[str] = []  # values on the way to the outputs that forward() also returns
        # Sparse weights' zeros: masked in every forward, unless the training loop calls project()
        # after each optimizer step instead (heal.train does: no full-size multiply each step).
        self.mask_in_forward = True
        self.steps = self._fuse_linear(
            self._live([standins.get(s.outputs[0], s) if s.outputs else s for s in steps]), static)
        self.project()

    # -- construction ------------------------------------------------------------------------

    def _add_param(self, name: str, tensor: torch.Tensor) -> str:
        key = _key(name, self._taken)
        self.weights[key] = nn.Parameter(tensor.clone())
        self._param_of[name] = key
        return key

    def _add_buffer(self, name: str, tensor: torch.Tensor) -> str:
        key = _key(name, self._taken)
        self.constants.register_buffer(key, tensor)
        return key

    @staticmethod
    def _static_env(steps: list[_Step], env: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every value computable from initializers alone (decoded weights, scales)."""
        out = dict(env)
        with torch.no_grad():
            for step in steps:
                if step.node is not None and step.node.op_type == "Constant":
                    out[step.outputs[0]] = step.op(**step.attrs)
                    continue
                if step.inputs and all(i is None or i in out for i in step.inputs):
                    results = as_list(step.op(*[out.get(i) if i else None for i in step.inputs],
                                              **step.attrs))
                    out.update(zip(step.outputs, results, strict=False))
        return out

    def _add_binary(self, mul: ir.Node, static: dict, standins: dict[str, _Step]) -> None:
        signs = mul.inputs[0]
        bits = _bits_of(signs) if signs is not None else None
        if bits is None or signs.name not in static or bits.name in self._param_of:
            return
        decoded = static[signs.name].float()
        key = self._add_param(bits.name, decoded * BINARY_LATENT_START)
        self.binary.append(BinaryWeight(signs.name, bits, key))

        def run(env: dict, key: str = key) -> torch.Tensor:
            return BinarySign.apply(self.weights[key])

        standins[signs.name] = _Step([signs.name], [], run=run)

    def _add_quantized(self, node: ir.Node, static: dict, standins: dict[str, _Step],
                       learn_scales: bool) -> None:
        x = node.inputs[0]
        if x is None or x.const_value is None or x.const_value.dtype not in _INTEGER_TYPES or \
                not x.is_initializer() or node.outputs[0].name not in static:
            return
        scale = node.inputs[1]
        zp = node.inputs[2] if len(node.inputs) > 2 else None
        if not learn_scales and (scale.name not in static or (zp is not None and zp.name not in static)):
            return
        if x.name in self._param_of:
            key = self._param_of[x.name]
        else:
            key = self._add_param(x.name, static[node.outputs[0].name].float())
            self._dtype[x.name] = static[x.name].dtype
        attrs = _attrs(node)
        q = QuantizedWeight(node, x, key, QUANT_RANGES[x.const_value.dtype],
                            attrs.get("axis", 1), attrs.get("block_size", 0))
        self.quantized.append(q)
        names = [scale.name, zp.name if zp is not None else None]

        def run(env: dict, q: QuantizedWeight = q) -> torch.Tensor:
            s, z = env[names[0]], env[names[1]] if names[1] else None
            return fake_quant(self.weights[q.key], s.float(), z, q.qrange, q.axis, q.block)

        standins[node.outputs[0].name] = _Step([node.outputs[0].name], names, run=run)

    def _live(self, steps: list[_Step]) -> list[_Step]:
        """Drop steps whose outputs nothing needs (a binary decode's bit unpacking)."""
        needed = set(self.output_names)
        kept: list[_Step] = []
        for step in reversed(steps):
            if any(o in needed for o in step.outputs):
                kept.append(step)
                needed.update(i for i in step.inputs if i)
        return kept[::-1]

    def _fuse_linear(self, steps: list[_Step], static: dict[str, torch.Tensor]) -> list[_Step]:
        """A MatMul by a 2-D weight whose only reader is an Add of a 1-D bias runs as one
        ``addmm`` (a Linear layer's kernel: the bias add and its gradient fold into the matmul)."""
        readers: dict[str, int] = {}
        for step in steps:
            for name in step.inputs:
                if name:
                    readers[name] = readers.get(name, 0) + 1
        producer = {step.outputs[0]: step for step in steps
                    if step.run is None and step.node is not None and step.node.op_type == "MatMul"}
        fused: dict[int, _Step] = {}  # id of the Add step -> its stand-in
        dropped: set[int] = set()
        for step in steps:
            if step.run is not None or step.node is None or step.node.op_type != "Add" or \
                    len(step.inputs) != 2 or None in step.inputs:
                continue
            for out, bias in (step.inputs, step.inputs[::-1]):
                matmul = producer.get(out)
                if matmul is None or readers.get(out) != 1 or out in self.output_names:
                    continue
                x, w = matmul.inputs
                shape_w, shape_b = _static_shape(w, static), _static_shape(bias, static)
                if len(shape_w) != 2 or shape_b != (shape_w[1],):
                    continue
                fused[id(step)] = _Step(step.outputs, [x, w, bias], step.node,
                                        run=lambda env, x=x, w=w, b=bias: _linear(env[x], env[w],
                                                                                  env[b]))
                dropped.add(id(matmul))
                break
        return [fused.get(id(s), s) for s in steps if id(s) not in dropped]

    # -- running -----------------------------------------------------------------------------

    def initializer_tensor(self, name: str) -> torch.Tensor:
        """The current value of an initializer as the graph sees it (masked, in its own dtype)."""
        key = self._param_of.get(name)
        if key is None:
            return getattr(self.constants, self._buffer_of[name])
        tensor = self.weights[key]
        if self.mask_in_forward and key in self._mask_of:
            tensor = tensor * getattr(self.constants, self._mask_of[key])
        dtype = self._dtype.get(name, torch.float32)
        return tensor.to(dtype) if dtype.is_floating_point else tensor

    def forward(self, *args: torch.Tensor, **feeds: torch.Tensor) -> list[torch.Tensor]:
        env: dict[str, torch.Tensor] = dict(zip(self.input_names, args, strict=False))
        env.update(feeds)
        for name in self._graph_initializers:
            env[name] = self.initializer_tensor(name)
        for step in self.steps:
            if step.run is not None:
                env[step.outputs[0]] = step.run(env)
                continue
            try:
                results = as_list(step.op(*[env[i] if i else None for i in step.inputs],
                                          **step.attrs))
            except torch.OutOfMemoryError:  # the machine's limit, not the node's: keep its type
                raise
            except (NotImplementedError, RuntimeError, TypeError, IndexError, ValueError,
                    KeyError) as exc:
                raise UnsupportedOpError(f"heal cannot run node {step.node.name!r} "
                                         f"({step.node.op_type}) as given: {exc}") from exc
            if len(results) < len(step.outputs) and any(step.outputs[len(results):]):
                raise UnsupportedOpError(f"heal cannot compute output(s) {step.outputs[len(results):]} "
                                         f"of node {step.node.name!r} ({step.node.op_type})")
            env.update(zip(step.outputs, results, strict=False))
        return [env[name] for name in (*self.output_names, *self.taps)]

    @torch.no_grad()
    def project(self) -> None:
        """Zero the masked entries of sparse weights again (after every optimizer step, with
        ``mask_in_forward`` off). Adam updates each entry on its own, so this trains the unmasked
        entries exactly as masking in the forward does, without a full-size multiply forward and
        backward each step."""
        for key, mask in self._mask_of.items():
            self.weights[key].mul_(getattr(self.constants, mask))

    @torch.no_grad()
    def load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Set parameters from arrays keyed like ``self.weights`` (another rank's result)."""
        for key, array in weights.items():
            self.weights[key].copy_(torch.from_numpy(array))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by kind: ``binary`` latents train at their own rate."""
        binary = {b.key for b in self.binary}
        return {
            "binary": [p for k, p in self.weights.items() if k in binary],
            "weights": [p for k, p in self.weights.items() if k not in binary],
        }

    def summary(self) -> dict[str, int]:
        """Counts of what trains and what stays fixed."""
        quantized = {q.key for q in self.quantized}
        binary = {b.key for b in self.binary}
        float_keys = set(self.weights) - quantized - binary
        return {
            "float_weights": len(float_keys),
            "fake_quant_weights": len(quantized),
            "binary_weights": len(binary),
            "sparsity_masks": len(self._mask_of),
            "frozen_integer_weights": len(self.frozen_integer),
            "trainable_parameters": sum(p.numel() for p in self.weights.values()),
        }

    # -- write-back --------------------------------------------------------------------------

    def static_values(self) -> dict[str, torch.Tensor]:
        """Every value computable from the current initializers (scales, decoded constants)."""
        return self._static_env([s for s in self.steps if s.run is None],
                                {n: self.initializer_tensor(n) for n in self._graph_initializers})

    @torch.no_grad()
    def write_back(self) -> int:
        """Store the trained weights into the model's initializers in their formats; returns how
        many initializers changed. Float ones (learned scales first) go first, so integer weights
        are rounded at the scales the file will hold."""
        changed = 0
        special = {q.value.name for q in self.quantized} | {b.bits.name for b in self.binary}
        for name in self._param_of:
            if name in special:
                continue
            value = self._initializers[name]
            old = value.const_value.numpy()
            new = self.initializer_tensor(name).detach().float().numpy().astype(old.dtype)
            changed += self._store(value, new)
        env = self.static_values()
        for q in self.quantized:
            scale = env[q.node.inputs[1].name].double()
            zp_value = q.node.inputs[2] if len(q.node.inputs) > 2 else None
            master = self.weights[q.key].detach().double()
            s = expand_qparam(scale, master, q.axis, q.block)
            z = 0.0 if zp_value is None else expand_qparam(env[zp_value.name].double(), master,
                                                           q.axis, q.block)
            ints = torch.clamp(torch.round(master / s) + z, *q.qrange).numpy()
            changed += self._store(q.value, ints.astype(q.value.const_value.numpy().dtype))
        for b in self.binary:
            changed += self._store(b.bits, pack_signs(self.weights[b.key].detach().numpy()))
        return changed

    @staticmethod
    def _store(value: ir.Value, array: np.ndarray) -> int:
        old = value.const_value.numpy()
        if old.shape == array.shape and old.dtype == array.dtype and np.array_equal(old, array):
            return 0
        value.const_value = ir.tensor(array, name=value.name)
        return 1


