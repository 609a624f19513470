"""Renders the lowered layers into an HLS C++ project (Jinja2 templates + the layer headers).

    hls/firmware/model.h          types, formats and one config struct per layer
    hls/firmware/model.cpp        the top function ``model``: one call per layer
    hls/firmware/weights/*.h      weights, biases and requantization as const arrays
    hls/firmware/sg/*.h           the layer library (copied from slimgraph/backends/hls/include)
    hls/tb/tb_model.cpp           the testbench (raw integers in, raw integers out)
    hls/tb_data/inputs.txt        the verification inputs, quantized
    hls/Makefile                  ``make csim``: g++ builds and runs design + testbench
    hls/build.tcl                 Vitis HLS: csim, synthesis, IP export

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
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from slimgraph import codegen
from slimgraph.backends.hls.lower import Layer, Lowered, Tensor
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


def ctype(bits: int, signed: bool) -> str:
    return f"sg::{'sint' if signed else 'uint'}<{bits}>::type"


def _lines(values: np.ndarray, text=str) -> list[str]:
    flat = [text(v) for v in np.asarray(values).reshape(-1)]
    return [", ".join(flat[i:i + VALUES_PER_LINE]) + "," for i in range(0, len(flat), VALUES_PER_LINE)]


def pack_signs(weight: np.ndarray) -> np.ndarray:
    """+1 / -1 weights [O, ...] -> bytes [O, ceil(K / 8)], bit k of row o set where w[o, k] = +1."""
    rows = (weight.reshape(len(weight), -1) > 0).astype(np.uint8)
    return np.packbits(rows, axis=1, bitorder="little")


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
        cfg = self.generated("cfg", index, f"cfg{index}_{self.ident(layer.output)}")
        arrays = {role: self.generated(role, index, f"{role}_{index}")
                  for role in ("w", "b", "rq", "table")}
        ints: dict[str, int] = {"reuse": self.project.reuse}
        longs = {"lo": layer.lo, "hi": layer.hi}
        typedefs: dict[str, str] = {}
        weights: list[dict[str, Any]] = []
        p = layer.params
        x = layer.inputs[0]
        extra_structs: list[dict[str, Any]] = []
        if layer.requant is not None:
            rq = layer.requant
            weights.append({"ctype": "sg::rq_t", "name": arrays["rq"], "size": len(rq.m),
                            "lines": [f"{{{m}, {s}, {q}}}," for m, s, q in zip(rq.m, rq.shift, rq.post,
                                                                               strict=True)]})
        note = ""
        if layer.kind in ("conv", "dense"):
            kind = KIND[p["weight_kind"]]
            if kind == 1 and x.fmt.bits == 2 and x.fmt.zero_point == 0:
                kind = 2  # sign inputs: XNOR-popcount
            ints |= {"zp_in": x.fmt.zero_point, "kind": kind}
            acc_bits = max(p["acc_bits"], 2)
            typedefs["acc_t"] = ctype(acc_bits, True)
            if kind:
                typedefs["w_t"] = "uint8_t"
                packed = pack_signs(p["weight"])
                weights.insert(0, {"ctype": "uint8_t", "name": arrays["w"], "size": packed.size,
                                   "lines": _lines(packed)})
                note = "+1 or -1 weights packed 8 per byte, bit set = +1"
            else:
                wbits = bits_of(p["weight"])
                typedefs["w_t"] = f"sg::wstore<{wbits}>::type"  # N bits in synthesis
                weights.insert(0, {"ctype": typedefs["w_t"], "name": arrays["w"],
                                   "size": p["weight"].size, "lines": _lines(p["weight"])})
                note = f"{p['weight_kind']} weights, {wbits}-bit"
            weights.insert(1, {"ctype": typedefs["acc_t"], "name": arrays["b"],
                               "size": len(p["bias"]), "lines": _lines(p["bias"])})
        if layer.kind == "conv":
            ci, h, w = x.shape
            kh, kw = p["kernel"]
            ints |= {"ci": ci, "h": h, "w": w, "co": layer.output.shape[0], "kh": kh, "kw": kw,
                     "sh": p["strides"][0], "sw": p["strides"][1], "pt": p["pads"][0],
                     "pl": p["pads"][1], "pb": p["pads"][2], "pr": p["pads"][3],
                     "ho": p["out"][0], "wo": p["out"][1], "groups": p["groups"],
                     "pad_value": x.fmt.zero_point}
            call = "conv2d_stream" if self.stream else "conv2d"
            args = ["w", "b", "rq"]
        elif layer.kind == "dense":
            ints |= {"n_in": x.size, "n_out": layer.output.size}
            call, args = ("dense_stream" if self.stream else "dense"), ["w", "b", "rq"]
        elif layer.kind in ("maxpool", "avgpool"):
            average = layer.kind == "avgpool"
            c, h, w = x.shape
            kh, kw = p["kernel"]
            ints |= {"c": c, "ci": c, "h": h, "w": w, "kh": kh, "kw": kw, "sh": p["strides"][0],
                     "sw": p["strides"][1], "pt": p["pads"][0], "pl": p["pads"][1],
                     "pb": p["pads"][2], "pr": p["pads"][3], "ho": p["out"][0], "wo": p["out"][1],
                     "zp_in": x.fmt.zero_point, "average": int(average),
                     "pad_value": x.fmt.zero_point if average else x.fmt.low}
            typedefs["acc_t"] = ctype(max(p.get("acc_bits", 32), 2), True)
            if not average:
                weights.append({"ctype": "sg::rq_t", "name": arrays["rq"], "size": 1,
                                "lines": ["{1, 0, 0},"]})
                longs = {"lo": x.fmt.low, "hi": x.fmt.high}
            if self.stream:
                call, args = "pool2d_stream", ["rq"]
            else:
                call, args = ("avg_pool2d", ["rq"]) if average else ("max_pool2d", [])
        elif layer.kind == "add":
            a, b = layer.inputs
            channels = layer.output.shape[0]
            ints |= {"size": layer.output.size, "zp_a": a.fmt.zero_point, "zp_b": b.fmt.zero_point,
                     "channels": channels, "per_channel": layer.output.size // channels}
            longs |= {"m_a": p["m"][0], "m_b": p["m"][1]}
            call, args = ("add_stream" if self.stream else "add"), ["rq"]
        elif layer.kind == "concat":
            if self.stream:
                if len(layer.inputs) != 2:
                    raise BackendError(f"hls: {codegen.text(layer.node)!r}: io=stream concatenates "
                                       f"two maps at a time, not {len(layer.inputs)}; use io=parallel")
                a, b = layer.inputs
                ints |= {"pixels": int(np.prod(a.shape[1:])), "ca": a.shape[0], "cb": b.shape[0],
                         "zp_a": a.fmt.zero_point, "zp_b": b.fmt.zero_point}
                longs |= {"m_a": p["m"][0], "m_b": p["m"][1]}
                call, args = "concat_stream", ["rq"]
            else:
                offset = 0
                calls = []
                for j, part in enumerate(layer.inputs):
                    name = self.generated(f"part{j}", index, f"{cfg}_part{j}")
                    extra_structs.append({"name": name, "ints": {
                        "size": part.size, "zp_in": part.fmt.zero_point, "offset": offset,
                        "reuse": self.project.reuse}.items(), "longs": (
                        {"m": p["m"][j]} | longs).items(), "typedefs": {}.items()})
                    offset += part.size
                    calls.append(f"sg::concat_part<{name}>({self.buffer(part, index)}, "
                                 f"{self.buffer(layer.output, index)}, {arrays['rq']})")
                return self.finish(index, layer, cfg, ints, longs, typedefs, weights, note,
                                   extra_structs, calls)
        elif layer.kind == "sigmoid":
            ints |= {"size": layer.output.size, "in_low": x.fmt.low, "drop": p["drop"]}
            weights.append({"ctype": self.type_name(layer.output), "name": arrays["table"],
                            "size": len(p["table"]), "lines": _lines(p["table"])})
            call, args = ("sigmoid_stream" if self.stream else "sigmoid"), ["table"]
            note = "sigmoid lookup table"
        elif layer.kind == "softmax":
            ints |= {"n": layer.output.size, "drop": p["drop"], "entries": len(p["table"]),
                     "zp_out": layer.output.fmt.zero_point}
            longs |= {"divider": p["divider"]}
            weights.append({"ctype": "uint32_t", "name": arrays["table"],
                            "size": len(p["table"]), "lines": _lines(p["table"])})
            call, args = ("softmax_stream" if self.stream else "softmax"), ["table"]
            note = "exp lookup table, 16-bit fixed point"
        elif layer.kind in ("requant", "clamp", "sign"):
            channels = layer.output.shape[0]
            ints |= {"size": layer.output.size, "zp_in": x.fmt.zero_point, "channels": channels,
                     "per_channel": layer.output.size // channels}
            call = f"{layer.kind}_stream" if self.stream else layer.kind
            args = ["rq"] if layer.kind == "requant" else []
        else:
            raise BackendError(f"hls: no emitter for layer kind {layer.kind!r}")
        operands = [self.buffer(t, index) for t in layer.inputs] + [self.buffer(layer.output, index)]
        operands += [arrays[a] for a in args]
        call_text = f"sg::{call}<{cfg}>({', '.join(operands)})"
        return self.finish(index, layer, cfg, ints, longs, typedefs, weights, note, extra_structs,
                           [call_text])

    def finish(self, index: int, layer: Layer, cfg: str, ints: dict, longs: dict, typedefs: dict,
               weights: list, note: str, extra: list, calls: list[str]) -> dict[str, Any]:
        structs = [{"name": cfg, "ints": ints.items(), "longs": longs.items(),
                    "typedefs": typedefs.items()}, *extra]
        return {"kind": layer.kind, "node": codegen.text(layer.node), "cfg": cfg, "index": index,
                "structs": structs, "weights": weights, "weight_note": note, "calls": calls}

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
            if layer.kind in ("conv", "maxpool", "avgpool"):
                c, _, w = layer.inputs[0].shape
                pads = layer.params["pads"]
                lines += layer.params["kernel"][0] * (w + pads[1] + pads[3]) * c * \
                    layer.inputs[0].fmt.bits
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


def _renderable(value: Any) -> Any:
    """Jinja2's finalize: numbers pass; text must be generated code or codegen.text's output."""
    if isinstance(value, str) and not RENDERABLE.match(value):
        raise BackendError(f"hls: refusing to render {codegen.text(value)!r} into the project")
    if isinstance(value, float) and not math.isfinite(value):
        raise BackendError(f"hls: refusing to render the non-finite number {value}")
    return value


def bits_of(values: np.ndarray) -> int:
    top = int(np.abs(values).max()) if values.size else 0
    return max(2, math.ceil(math.log2(top + 1)) + 1)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
