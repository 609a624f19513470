"""Renders the lowered layers into an HLS C++ project (Jinja2 templates + the layer headers).

    hls/firmware/model.h          types, formats and one config struct per layer
    hls/firmware/model.cpp        the top function ``model``: one call per layer
    hls/firmware/weights/*.h      weights, biases and requantization as const arrays
    hls/firmware/sg/*.h           the layer library (copied from slimgraph/backends/hls/include)
    hls/tb/tb_model.cpp           the testbench (raw integers in, raw integers out)
    hls/tb_data/inputs.txt        the verification inputs, quantized
    hls/Makefile                  ``make csim``: g++ builds and runs design + testbench
    hls/build.tcl                 Vitis HLS: csim, synthesis, IP export
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from slimgraph.backends.hls.lower import Layer, Lowered, Tensor

HERE = Path(__file__).resolve().parent
LIBRARY = ("sg_types.h", "sg_layers.h", "sg_stream.h")
VALUES_PER_LINE = 16
KIND = {"int8": 0, "fixed": 0, "binary": 1}


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


def type_name(tensor: Tensor) -> str:
    return f"{tensor.name}_t"


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
        self.rendered: list[dict[str, Any]] = []
        consumers: dict[str, list[int]] = {}
        for index, layer in enumerate(layers):
            for tensor in layer.inputs:
                consumers.setdefault(tensor.name, []).append(index)
        self.consumers = consumers
        if self.output.name in consumers or self.output.name == self.input.name:
            raise ValueError("hls: the output tensor must be produced by the last of its readers")

    # -- per layer ---------------------------------------------------------------------------
    def layer_dict(self, index: int, layer: Layer) -> dict[str, Any]:
        cfg = f"cfg{index}_{layer.output.name}"[:60]
        ints: dict[str, int] = {"reuse": self.project.reuse}
        longs = {"lo": layer.lo, "hi": layer.hi}
        typedefs: dict[str, str] = {}
        weights: list[dict[str, Any]] = []
        p = layer.params
        x = layer.inputs[0]
        extra_structs: list[dict[str, Any]] = []
        if layer.requant is not None:
            rq = layer.requant
            weights.append({"ctype": "sg::rq_t", "name": f"rq_{index}", "size": len(rq.m),
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
                weights.insert(0, {"ctype": "uint8_t", "name": f"w_{index}", "size": packed.size,
                                   "lines": _lines(packed)})
                note = "+1/-1 weights packed 8 per byte, bit set = +1"
            else:
                wbits = bits_of(p["weight"])
                typedefs["w_t"] = f"sg::wstore<{wbits}>::type"  # N bits in synthesis
                weights.insert(0, {"ctype": typedefs["w_t"], "name": f"w_{index}",
                                   "size": p["weight"].size, "lines": _lines(p["weight"])})
                note = f"{p['weight_kind']} weights, {wbits}-bit"
            weights.insert(1, {"ctype": typedefs["acc_t"], "name": f"b_{index}",
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
                weights.append({"ctype": "sg::rq_t", "name": f"rq_{index}", "size": 1,
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
                    raise ValueError("hls: io=stream concatenates two maps at a time")
                a, b = layer.inputs
                ints |= {"pixels": int(np.prod(a.shape[1:])), "ca": a.shape[0], "cb": b.shape[0],
                         "zp_a": a.fmt.zero_point, "zp_b": b.fmt.zero_point}
                longs |= {"m_a": p["m"][0], "m_b": p["m"][1]}
                call, args = "concat_stream", ["rq"]
            else:
                offset = 0
                calls = []
                for j, part in enumerate(layer.inputs):
                    name = f"{cfg}_part{j}"
                    extra_structs.append({"name": name, "ints": {
                        "size": part.size, "zp_in": part.fmt.zero_point, "offset": offset,
                        "reuse": self.project.reuse}.items(), "longs": (
                        {"m": p["m"][j]} | longs).items(), "typedefs": {}.items()})
                    offset += part.size
                    calls.append(f"sg::concat_part<{name}>({self.buffer(part, index)}, "
                                 f"{self.buffer(layer.output, index)}, rq_{index})")
                return self.finish(index, layer, cfg, ints, longs, typedefs, weights, note,
                                   extra_structs, calls)
        elif layer.kind == "sigmoid":
            ints |= {"size": layer.output.size, "in_low": x.fmt.low, "drop": p["drop"]}
            weights.append({"ctype": type_name(layer.output), "name": f"table_{index}",
                            "size": len(p["table"]), "lines": _lines(p["table"])})
            call, args = ("sigmoid_stream" if self.stream else "sigmoid"), ["table"]
            note = "sigmoid lookup table"
        elif layer.kind == "softmax":
            ints |= {"n": layer.output.size, "drop": p["drop"], "entries": len(p["table"]),
                     "zp_out": layer.output.fmt.zero_point}
            longs |= {"divider": p["divider"]}
            weights.append({"ctype": "uint32_t", "name": f"table_{index}",
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
            raise ValueError(f"hls: no emitter for layer kind {layer.kind!r}")
        operands = [self.buffer(t, index) for t in layer.inputs] + [self.buffer(layer.output, index)]
        operands += [f"{a}_{index}" for a in args]
        call_text = f"sg::{call}<{cfg}>({', '.join(operands)})"
        return self.finish(index, layer, cfg, ints, longs, typedefs, weights, note, extra_structs,
                           [call_text])

    def finish(self, index: int, layer: Layer, cfg: str, ints: dict, longs: dict, typedefs: dict,
               weights: list, note: str, extra: list, calls: list[str]) -> dict[str, Any]:
        structs = [{"name": cfg, "ints": ints.items(), "longs": longs.items(),
                    "typedefs": typedefs.items()}, *extra]
        return {"kind": layer.kind, "node": layer.node, "cfg": cfg, "structs": structs,
                "weights": weights, "weight_note": note, "calls": calls}

    # -- buffers and FIFOs -------------------------------------------------------------------
    def buffer(self, tensor: Tensor, reader: int) -> str:
        """The array or FIFO that ``reader`` (a layer index) uses for ``tensor``."""
        if tensor.name == self.output.name:
            return "out"
        base = "in" if tensor.name == self.input.name else tensor.name
        readers = self.consumers.get(tensor.name, [])
        if not self.stream or len(readers) < 2 or reader not in readers:
            return base
        return f"{base}_r{readers.index(reader)}"

    def clones(self, tensor: Tensor) -> list[str]:
        """io=stream: copy a FIFO read by k layers into k FIFOs (a chain of two-way clones)."""
        readers = self.consumers.get(tensor.name, [])
        if not self.stream or len(readers) < 2:
            return []
        base = "in" if tensor.name == self.input.name else tensor.name
        calls, source = [], base
        for j in range(len(readers) - 1):
            rest = f"{base}_r{j + 1}" if j == len(readers) - 2 else f"{base}_rest{j}"
            calls.append(f"sg::clone_stream<{type_name(tensor)}, {tensor.size}>({source}, "
                         f"{base}_r{j}, {rest})")
            source = rest
        return calls

    def fifos(self) -> list[dict[str, Any]]:
        fifos = []
        for tensor in [self.input] + [layer.output for layer in self.layers]:
            readers = self.consumers.get(tensor.name, [])
            base = "in" if tensor.name == self.input.name else tensor.name
            names = [] if tensor.name in (self.input.name, self.output.name) else [(base, 2)]
            if len(readers) > 1:  # a fork: a branch may wait for the whole map (skip paths)
                names += [(f"{base}_r{j}", tensor.size) for j in range(len(readers))]
                names += [(f"{base}_rest{j}", tensor.size) for j in range(len(readers) - 2)]
            fifos += [{"name": n, "type": type_name(tensor), "depth": d} for n, d in names]
        return fifos

    def buffers(self) -> list[dict[str, Any]]:
        out = []
        for layer in self.layers:
            t = layer.output
            if t.name == self.output.name:
                continue
            partition = "complete" if t.size <= 4096 else "cyclic factor = 16"
            out.append({"name": t.name, "type": type_name(t), "size": t.size,
                        "partition": partition})
        return out

    def memory_bits(self) -> tuple[int, int]:
        """(FIFO bits, activation buffer bits): io=stream holds FIFOs and line buffers."""
        if not self.stream:
            return 0, sum(b["size"] * layer.output.fmt.bits for b, layer in zip(
                self.buffers(), [lay for lay in self.layers if lay.output.name != self.output.name],
                strict=True))
        bits = {type_name(t): t.fmt.bits for t in [self.input] + [lay.output for lay in self.layers]}
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
                                 trim_blocks=False)
        layers = [self.layer_dict(i, layer) for i, layer in enumerate(self.layers)]
        calls: list[str] = self.clones(self.input)
        for layer_dict, layer in zip(layers, self.layers, strict=True):
            calls += layer_dict["calls"] + self.clones(layer.output)
        tensors = [self.input] + [layer.output for layer in self.layers]
        context = {
            "title": self.project.title, "source": self.project.source,
            "version": self.project.version, "io": self.project.io, "reuse": self.project.reuse,
            "part": self.project.part, "clock_ns": self.project.clock_ns, "project": "slimgraph_prj",
            "tensors": [{"name": t.name, "type": type_name(t), "ctype": ctype(t.fmt.bits, t.fmt.signed),
                         "shape": list(t.shape), "describe": t.fmt.describe()} for t in tensors],
            "input": {"type": type_name(self.input), "size": self.input.size},
            "output": {"type": type_name(self.output), "size": self.output.size},
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


def bits_of(values: np.ndarray) -> int:
    top = int(np.abs(values).max()) if values.size else 0
    return max(2, math.ceil(math.log2(top + 1)) + 1)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
