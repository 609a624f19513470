"""Renders the lowered layers into an HLS C++ project (Jinja2 templates + the layer headers).

    hls/firmware/model.h          types, formats and one config struct per layer
    hls/firmware/model.cpp        the top function ``model``: one call per layer
    hls/firmware/weights/*.h      weights, biases and requantization as const arrays
    hls/firmware/sg/*.h           the layer library (copied from slimgraph/backends/hls/include)
    hls/tb/tb_model.cpp           the testbench (raw integers in, raw integers out)
    hls/tb_data/inputs.txt        the verification inputs, quantized
    hls/Makefile                  ``make csim``: g++ builds and runs design + testbench
    hls/build.tcl                 Vitis HLS: csim, synthesis, IP export

Each layer kind has one emitter (``EMITTERS``) that fills the layer's config struct, const arrays
and calls from its typed parameters.

Every identifier comes from one ``codegen.Namespace`` (tensors first, so they keep their own
names where they can; then the per-layer configs, arrays and FIFOs) and every name from the model
in a comment from ``codegen.text``; the Jinja2 environment refuses any other text that could end
a comment, a string or a line.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from slimgraph import codegen
from slimgraph.backends.hls.layers import Layer, Tensor, Window
from slimgraph.backends.hls.lower import Lowered
from slimgraph.bits import pack_bits
from slimgraph.errors import BackendError

HERE = Path(__file__).resolve().parent
LIBRARY = ("sg_types.h", "sg_layers.h", "sg_stream.h")
VALUES_PER_LINE = 16
KIND = {"int8": 0, "fixed": 0, "binary": 1}
TOP_NAMES = ("in", "out", "model", "in_t", "out_t")  # the top function, its ports and their types
# What a rendered value may hold: generated code and codegen.text's output, never a newline,
# quote, backslash, '/', '*', '?', '#' or '$' (which could end a comment or string or splice a line).
RENDERABLE = re.compile(r"[A-Za-z0-9 _.,:;=+()<>\[\]{}@~^|!&%-]*\Z")


@dataclasses.dataclass
class Project:
    """What to render, besides the layers."""

    title: str
    source: str
    version: str
    io: str
    reuse: int
    part: str
    clock_ns: float


@dataclasses.dataclass
class LayerCode:
    """One layer's part of the project, filled by the emitter of its kind."""

    index: int
    cfg: str  # its config struct
    arrays: dict[str, str]  # role (w, b, rq, table) -> the const array's identifier
    ints: dict[str, int]  # the config struct's constants
    longs: dict[str, int]
    typedefs: dict[str, str] = dataclasses.field(default_factory=dict)
    weights: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # its const arrays
    note: str = ""  # what the weights header holds
    parts: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # more config structs
    calls: list[str] = dataclasses.field(default_factory=list)


def ctype(bits: int, signed: bool) -> str:
    return f"sg::{'sint' if signed else 'uint'}<{bits}>::type"


def _lines(values: np.ndarray, text=str) -> list[str]:
    flat = [text(v) for v in np.asarray(values).reshape(-1)]
    return [", ".join(flat[i:i + VALUES_PER_LINE]) + "," for i in range(0, len(flat), VALUES_PER_LINE)]


class Emitter:
    def __init__(self, lowered: Lowered, project: Project) -> None:
        self.input, self.output = lowered.inputs[0], lowered.outputs[0]
        self.layers = layers = lowered.layers
        self.project = project
        self.stream = project.io == "stream"
        consumers: dict[str, list[int]] = {}
        for index, layer in enumerate(layers):
            for tensor in layer.inputs:
                consumers.setdefault(tensor.name, []).append(index)
        self.consumers = consumers
        if self.output.name in consumers or self.output.name == self.input.name:
            raise BackendError("hls: the output tensor must be produced by the last of its readers")
        self.names = codegen.Namespace(TOP_NAMES)
        self.idents = {self.input.name: "in", self.output.name: "out"}
        for layer in layers:  # tensors first: they keep their own (mangled) names where they can
            if layer.output.name not in self.idents:
                self.idents[layer.output.name] = self.names.ident(layer.output.name, "tensor")
        self.types = {t.name: self.names.ident(t.name, "type", f"{t.name}_t")
                      for t in [self.input] + [layer.output for layer in layers]}

    def ident(self, tensor: Tensor) -> str:
        """The buffer (or FIFO) identifier of ``tensor``: ``in``, ``out`` or its mangled name."""
        return self.idents[tensor.name]

    def generated(self, role: str, index: int, hint: str) -> str:
        """A per-layer identifier (config struct, weight array), unique in the project."""
        return self.names.ident(str(index), role, hint)

    def type_name(self, tensor: Tensor) -> str:
        return self.types[tensor.name]

    # -- per layer ---------------------------------------------------------------------------
    def layer_dict(self, index: int, layer: Layer) -> dict[str, Any]:
        emit = EMITTERS.get(layer.kind)
        if emit is None:
            raise BackendError(f"hls: no emitter for layer kind {layer.kind!r}")
        cfg = self.generated("cfg", index, f"cfg{index}_{self.ident(layer.output)}")
        arrays = {role: self.generated(role, index, f"{role}_{index}")
                  for role in ("w", "b", "rq", "table")}
        code = LayerCode(index, cfg, arrays, {"reuse": self.project.reuse},
                         {"lo": layer.lo, "hi": layer.hi})
        emit(self, layer, code)
        if layer.requant is not None:
            rq = layer.requant
            code.weights.append({"ctype": "sg::rq_t", "name": arrays["rq"], "size": len(rq.m),
                                 "lines": [f"{{{m}, {s}, {q}}}," for m, s, q in zip(
                                     rq.m, rq.shift, rq.post, strict=True)]})
        structs = [{"name": cfg, "ints": code.ints.items(), "longs": code.longs.items(),
                    "typedefs": code.typedefs.items()}, *code.parts]
        return {"kind": layer.kind, "node": codegen.text(layer.node), "cfg": cfg, "index": index,
                "structs": structs, "weights": code.weights, "weight_note": code.note,
                "calls": code.calls}

    def streamed(self, function: str) -> str:
        """The layer library's function for the io mode: ``dense`` or ``dense_stream``."""
        return f"{function}_stream" if self.stream else function

    def call(self, layer: Layer, code: LayerCode, function: str, arrays: list[str]) -> None:
        """``sg::function<cfg>(inputs, output, arrays)`` as the layer's call."""
        operands = [self.buffer(t, code.index) for t in layer.inputs]
        operands += [self.buffer(layer.output, code.index)] + [code.arrays[a] for a in arrays]
        code.calls.append(f"sg::{function}<{code.cfg}>({', '.join(operands)})")

    # -- buffers and FIFOs -------------------------------------------------------------------
    def buffer(self, tensor: Tensor, reader: int) -> str:
        """The array or FIFO that ``reader`` (a layer index) uses for ``tensor``."""
        readers = self.consumers.get(tensor.name, [])
        if tensor.name == self.output.name or not self.stream or len(readers) < 2 \
                or reader not in readers:
            return self.ident(tensor)
        return self.copy(tensor, "r", readers.index(reader))

    def copy(self, tensor: Tensor, kind: str, j: int) -> str:
        """io=stream: FIFO copy ``j`` of a fork (``r``: a reader's, ``rest``: a link of the chain)."""
        return self.names.ident(tensor.name, f"{kind}{j}", f"{self.ident(tensor)}_{kind}{j}")

    def clones(self, tensor: Tensor) -> list[str]:
        """io=stream: copy a FIFO read by k layers into k FIFOs (a chain of two-way clones)."""
        readers = self.consumers.get(tensor.name, [])
        if not self.stream or len(readers) < 2:
            return []
        calls, source = [], self.ident(tensor)
        for j in range(len(readers) - 1):
            rest = self.copy(tensor, "r", j + 1) if j == len(readers) - 2 else self.copy(tensor, "rest", j)
            calls.append(f"sg::clone_stream<{self.type_name(tensor)}, {tensor.size}>({source}, "
                         f"{self.copy(tensor, 'r', j)}, {rest})")
            source = rest
        return calls

    def fifos(self) -> list[dict[str, Any]]:
        fifos = []
        for tensor in [self.input] + [layer.output for layer in self.layers]:
            readers = self.consumers.get(tensor.name, [])
            names = [] if tensor.name in (self.input.name, self.output.name) else [
                (self.ident(tensor), 2)]
            if len(readers) > 1:  # a fork: a branch may wait for the whole map (skip paths)
                names += [(self.copy(tensor, "r", j), tensor.size) for j in range(len(readers))]
                names += [(self.copy(tensor, "rest", j), tensor.size) for j in range(len(readers) - 2)]
            fifos += [{"name": n, "type": self.type_name(tensor), "depth": d} for n, d in names]
        return fifos

    def buffers(self) -> list[dict[str, Any]]:
        out = []
        for layer in self.layers:
            t = layer.output
            if t.name == self.output.name:
                continue
            partition = "complete" if t.size <= 4096 else "cyclic factor = 16"
            out.append({"name": self.ident(t), "type": self.type_name(t), "size": t.size,
                        "partition": partition})
        return out

    def memory_bits(self) -> tuple[int, int]:
        """(FIFO bits, activation buffer bits): io=stream holds FIFOs and line buffers."""
        if not self.stream:
            return 0, sum(b["size"] * layer.output.fmt.bits for b, layer in zip(
                self.buffers(), [lay for lay in self.layers if lay.output.name != self.output.name],
                strict=True))
        bits = {self.type_name(t): t.fmt.bits for t in [self.input] + [lay.output for lay in self.layers]}
        fifo = sum(f["depth"] * bits[f["type"]] for f in self.fifos())
        lines = 0
        for layer in self.layers:
            window = layer.window
            if window is not None:  # conv, maxpool, avgpool
                c, _, w = layer.inputs[0].shape
                pads = window.pads
                lines += window.kernel[0] * (w + pads[1] + pads[3]) * c * layer.inputs[0].fmt.bits
        return fifo, lines

    # -- the project -------------------------------------------------------------------------
    def render(self, root: Path) -> list[Path]:
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                 undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                                 trim_blocks=False, autoescape=False, finalize=_renderable)
        layers = [self.layer_dict(i, layer) for i, layer in enumerate(self.layers)]
        calls: list[str] = self.clones(self.input)
        for layer_dict, layer in zip(layers, self.layers, strict=True):
            calls += layer_dict["calls"] + self.clones(layer.output)
        tensors = [self.input] + [layer.output for layer in self.layers]
        context = {
            "title": codegen.text(self.project.title), "source": codegen.text(self.project.source),
            "version": codegen.text(self.project.version), "io": self.project.io,
            "reuse": self.project.reuse, "part": codegen.part(self.project.part),
            "clock_ns": codegen.clock_ns(self.project.clock_ns), "project": "slimgraph_prj",
            "tensors": [{"name": codegen.text(t.name), "type": self.type_name(t),
                         "ctype": ctype(t.fmt.bits, t.fmt.signed),
                         "shape": list(t.shape), "describe": t.fmt.describe()} for t in tensors],
            "input": {"type": self.type_name(self.input), "size": self.input.size},
            "output": {"type": self.type_name(self.output), "size": self.output.size},
            "layers": layers, "calls": calls,
            "fifos": self.fifos() if self.stream else [],
            "buffers": [] if self.stream else self.buffers(),
        }
        written = []
        targets = {"model.h.j2": "firmware/model.h", "model.cpp.j2": "firmware/model.cpp",
                   "tb_model.cpp.j2": "tb/tb_model.cpp", "Makefile.j2": "Makefile",
                   "build.tcl.j2": "build.tcl"}
        for template, target in targets.items():
            written.append(_write(root / target, env.get_template(template).render(context)))
        for layer in layers:
            if layer["weights"]:
                text = env.get_template("weights.h.j2").render(layer=layer)
                written.append(_write(root / "firmware" / "weights" / f"{layer['cfg']}.h", text))
        (root / "firmware" / "sg").mkdir(parents=True, exist_ok=True)
        for header in LIBRARY:
            shutil.copyfile(HERE / "include" / header, root / "firmware" / "sg" / header)
            written.append(root / "firmware" / "sg" / header)
        return written


# -- one emitter per layer kind: the config struct's constants, the const arrays, the call ------
def _array(ctype_: str, name: str, values: np.ndarray) -> dict[str, Any]:
    return {"ctype": ctype_, "name": name, "size": values.size, "lines": _lines(values)}


def _window_ints(window: Window) -> dict[str, int]:
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (ho, wo) = (window.kernel, window.strides, window.pads,
                                                      window.out)
    return {"kh": kh, "kw": kw, "sh": sh, "sw": sw, "pt": pt, "pl": pl, "pb": pb, "pr": pr,
            "ho": ho, "wo": wo}


def _weights(em: Emitter, layer: Layer, code: LayerCode) -> None:
    """conv and dense: the weight and bias arrays and their types."""
    weights, x = layer.weights, layer.inputs[0]
    kind = KIND[weights.kind]
    if kind == 1 and x.fmt.bits == 2 and x.fmt.zero_point == 0:
        kind = 2  # sign inputs: XNOR-popcount
    code.ints |= {"zp_in": x.fmt.zero_point, "kind": kind}
    code.typedefs["acc_t"] = ctype(max(layer.acc_bits, 2), True)
    if kind:
        code.typedefs["w_t"] = "uint8_t"
        signs = weights.q.reshape(len(weights.q), -1) > 0  # one packed run per output row
        code.weights.append(_array("uint8_t", code.arrays["w"], pack_bits(signs, axis=1)))
        code.note = "+1 or -1 weights packed 8 per byte, bit set = +1"
    else:
        code.typedefs["w_t"] = f"sg::wstore<{weights.bits}>::type"  # N bits in synthesis
        code.weights.append(_array(code.typedefs["w_t"], code.arrays["w"], weights.q))
        code.note = f"{weights.kind} weights, {weights.bits}-bit"
    code.weights.append(_array(code.typedefs["acc_t"], code.arrays["b"], weights.bias))


def _conv(em: Emitter, layer: Layer, code: LayerCode) -> None:
    _weights(em, layer, code)
    p, x = layer.params, layer.inputs[0]
    ci, h, w = x.shape
    code.ints |= {"ci": ci, "h": h, "w": w, "co": layer.output.shape[0], **_window_ints(p.window),
                  "groups": p.groups, "pad_value": x.fmt.zero_point}
    em.call(layer, code, em.streamed("conv2d"), ["w", "b", "rq"])


def _dense(em: Emitter, layer: Layer, code: LayerCode) -> None:
    _weights(em, layer, code)
    code.ints |= {"n_in": layer.inputs[0].size, "n_out": layer.output.size}
    em.call(layer, code, em.streamed("dense"), ["w", "b", "rq"])


def _pool(em: Emitter, layer: Layer, code: LayerCode) -> None:
    """maxpool and avgpool."""
    average = layer.kind == "avgpool"
    x = layer.inputs[0]
    c, h, w = x.shape
    code.ints |= {"c": c, "ci": c, "h": h, "w": w, **_window_ints(layer.params.window),
                  "zp_in": x.fmt.zero_point, "average": int(average),
                  "pad_value": x.fmt.zero_point if average else x.fmt.low}
    code.typedefs["acc_t"] = ctype(max(layer.acc_bits, 2), True)
    if not average:
        code.weights.append({"ctype": "sg::rq_t", "name": code.arrays["rq"], "size": 1,
                             "lines": ["{1, 0, 0},"]})
    if em.stream:
        em.call(layer, code, "pool2d_stream", ["rq"])
    else:
        em.call(layer, code, "avg_pool2d" if average else "max_pool2d", ["rq"] if average else [])


def _add(em: Emitter, layer: Layer, code: LayerCode) -> None:
    a, b = layer.inputs
    channels = layer.output.shape[0]
    code.ints |= {"size": layer.output.size, "zp_a": a.fmt.zero_point, "zp_b": b.fmt.zero_point,
                  "channels": channels, "per_channel": layer.output.size // channels}
    code.longs |= {"m_a": layer.params.m[0], "m_b": layer.params.m[1]}
    em.call(layer, code, em.streamed("add"), ["rq"])


def _concat(em: Emitter, layer: Layer, code: LayerCode) -> None:
    m = layer.params.m
    if em.stream:
        if len(layer.inputs) != 2:
            raise BackendError(f"hls: {codegen.text(layer.node)!r}: io=stream concatenates "
                               f"two maps at a time, not {len(layer.inputs)}; use io=parallel")
        a, b = layer.inputs
        code.ints |= {"pixels": int(np.prod(a.shape[1:])), "ca": a.shape[0], "cb": b.shape[0],
                      "zp_a": a.fmt.zero_point, "zp_b": b.fmt.zero_point}
        code.longs |= {"m_a": m[0], "m_b": m[1]}
        em.call(layer, code, "concat_stream", ["rq"])
        return
    offset = 0  # io=parallel: one call per input, each with its own config struct
    for j, part in enumerate(layer.inputs):
        name = em.generated(f"part{j}", code.index, f"{code.cfg}_part{j}")
        code.parts.append({"name": name, "ints": {
            "size": part.size, "zp_in": part.fmt.zero_point, "offset": offset,
            "reuse": em.project.reuse}.items(), "longs": ({"m": m[j]} | code.longs).items(),
            "typedefs": {}.items()})
        offset += part.size
        code.calls.append(f"sg::concat_part<{name}>({em.buffer(part, code.index)}, "
                          f"{em.buffer(layer.output, code.index)}, {code.arrays['rq']})")


def _sigmoid(em: Emitter, layer: Layer, code: LayerCode) -> None:
    p = layer.params
    code.ints |= {"size": layer.output.size, "in_low": layer.inputs[0].fmt.low, "drop": p.drop}
    code.weights.append(_array(em.type_name(layer.output), code.arrays["table"], p.table))
    code.note = "sigmoid lookup table"
    em.call(layer, code, em.streamed("sigmoid"), ["table"])


def _softmax(em: Emitter, layer: Layer, code: LayerCode) -> None:
    p = layer.params
    code.ints |= {"n": layer.output.size, "drop": p.drop, "entries": len(p.table),
                  "zp_out": layer.output.fmt.zero_point}
    code.longs |= {"divider": p.divider}
    code.weights.append(_array("uint32_t", code.arrays["table"], p.table))
    code.note = "exp lookup table, 16-bit fixed point"
    em.call(layer, code, em.streamed("softmax"), ["table"])


def _elementwise(em: Emitter, layer: Layer, code: LayerCode) -> None:
    """requant, clamp and sign."""
    channels = layer.output.shape[0]
    code.ints |= {"size": layer.output.size, "zp_in": layer.inputs[0].fmt.zero_point,
                  "channels": channels, "per_channel": layer.output.size // channels}
    em.call(layer, code, em.streamed(layer.kind), ["rq"] if layer.kind == "requant" else [])


EMITTERS: dict[str, Callable[[Emitter, Layer, LayerCode], None]] = {
    "conv": _conv, "dense": _dense, "maxpool": _pool, "avgpool": _pool, "add": _add,
    "concat": _concat, "sigmoid": _sigmoid, "softmax": _softmax, "requant": _elementwise,
    "clamp": _elementwise, "sign": _elementwise,
}


def _renderable(value: Any) -> Any:
    """Jinja2's finalize: numbers pass; text must be generated code or codegen.text's output."""
    if isinstance(value, str) and not RENDERABLE.match(value):
        raise BackendError(f"hls: refusing to render {codegen.text(value)!r} into the project")
    if isinstance(value, float) and not math.isfinite(value):
        raise BackendError(f"hls: refusing to render the non-finite number {value}")
    return value


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
