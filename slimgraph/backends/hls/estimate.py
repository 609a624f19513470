"""Resource and latency estimate of the emitted design, from its shapes alone (no synthesis).

Formulas (per layer; K = multiply-accumulates per output value, R = the reuse factor):

- MACs: K x output values (equal to ``slimgraph inspect``'s count for Conv / Gemm / MatMul).
- multipliers: ceil(K / R) for int8 / fixed-point weights: the loop over outputs is pipelined
  with II = R, so the unrolled multiply-accumulate shares each multiplier over R cycles. +1 / -1
  weights need adders only (0).
- DSP: 1 per multiplier when weight and input fit a DSP48's 18 x 27 bits, else 2; plus 4 for the
  requantizer (an accumulator x 31-bit multiplier product, up to 64 bits) where there is one.
- weight memory: weights (1 bit each when binary), biases at accumulator width, 96 bits of
  requantization per channel; BRAM18 = ceil(bits / 18432) for each array over 1024 bits (smaller
  arrays go to LUTs or registers).
- lookup tables (sigmoid, softmax's exp): entries x output bits (17 for exp), in weight memory.
- cycles: io=parallel runs the layers one after another: each takes (output values x R) plus a
  pipeline depth of ceil(log2 K) + 4; the design's initiation interval is the latency (the sum).
  io=stream overlaps layers (DATAFLOW): a line-buffered layer takes (padded input tokens +
  output values x R) cycles; the interval is the slowest layer, the latency at most the sum.
"""

from __future__ import annotations

import math
from typing import Any

from slimgraph.backends.hls.layers import Layer, SigmoidParams, SoftmaxParams

BRAM18_BITS = 18432
SMALL_ARRAY_BITS = 1024
REQUANT_DSP = 4
VITIS_UNROLL_LIMIT = 4096


def macs_per_output(layer: Layer) -> int:
    out = layer.output.size
    return layer.macs // out if layer.macs else 0


def unroll(layer: Layer, reuse: int) -> int:
    return math.ceil(macs_per_output(layer) / reuse) if layer.macs else 0


def _array_bram(bits: int) -> int:
    return math.ceil(bits / BRAM18_BITS) if bits > SMALL_ARRAY_BITS else 0


def layer_estimate(layer: Layer, reuse: int, stream: bool) -> dict[str, Any]:
    weights, window = layer.weights, layer.window
    k = macs_per_output(layer)
    outputs = layer.output.size
    binary = weights is not None and weights.kind == "binary"
    multipliers = 0 if binary or not layer.macs else unroll(layer, reuse)
    x_bits = layer.inputs[0].fmt.bits
    weight_bits = bias_bits = per = 0
    arrays: list[int] = []
    if layer.macs:
        per = 1 if binary else weights.bits
        weight_bits = weights.q.size * per
        bias_bits = len(weights.bias) * layer.acc_bits
        arrays += [weight_bits, bias_bits]
    if isinstance(layer.params, SigmoidParams | SoftmaxParams):  # lookup tables
        table = layer.params.table
        weight_bits = len(table) * (17 if layer.kind == "softmax" else layer.output.fmt.bits)
        arrays.append(weight_bits)
    requant_bits = 0
    requantizes = layer.requant is not None and bool((layer.requant.m != 1).any() or
                                                    (layer.requant.shift != 0).any())
    if layer.requant is not None:
        requant_bits = 96 * len(layer.requant.m)
        arrays.append(requant_bits)
    per_mult = 1 if (not layer.macs or (per <= 18 and x_bits <= 27)) else 2
    dsp = multipliers * per_mult + (REQUANT_DSP if requantizes else 0)
    depth = (math.ceil(math.log2(k)) if k > 1 else 0) + 4
    if stream and window is not None:  # conv, maxpool, avgpool
        c, h, w = layer.inputs[0].shape
        pads = window.pads
        tokens = (h + pads[0] + pads[2]) * (w + pads[1] + pads[3]) * c
        cycles = tokens + outputs * reuse + depth
    else:
        cycles = outputs * reuse + depth
    return {
        "layer": layer.node, "kind": layer.kind, "weights": weights.kind if weights else None,
        "output_shape": list(layer.output.shape), "macs": layer.macs, "macs_per_output": k,
        "multipliers": multipliers, "dsp": dsp, "weight_bits": weight_bits + bias_bits + requant_bits,
        "bram18": sum(_array_bram(b) for b in arrays), "cycles": cycles,
    }


def estimate(layers: list[Layer], reuse: int, io: str, clock_ns: float,
             fifo_bits: int = 0, buffer_bits: int = 0) -> dict[str, Any]:
    stream = io == "stream"
    rows = [layer_estimate(layer, reuse, stream) for layer in layers]
    total_cycles = sum(r["cycles"] for r in rows)
    interval = max((r["cycles"] for r in rows), default=0) if stream else total_cycles
    return {
        "io": io, "reuse": reuse, "clock_ns": clock_ns,
        "layers": rows,
        "total": {
            "macs": sum(r["macs"] for r in rows),
            "multipliers": sum(r["multipliers"] for r in rows),
            "dsp": sum(r["dsp"] for r in rows),
            "weight_bits": sum(r["weight_bits"] for r in rows),
            "bram18": sum(r["bram18"] for r in rows) + _array_bram(fifo_bits + buffer_bits),
            "activation_bits": fifo_bits + buffer_bits,
            "latency_cycles": total_cycles,
            "interval_cycles": interval,
            "latency_us": round(total_cycles * clock_ns / 1000, 3),
            "throughput_per_s": round(1e9 / (interval * clock_ns), 1) if interval else None,
        },
        "formulas": __doc__.split("Formulas (per layer; ")[1].strip(),
    }


def markdown(est: dict[str, Any]) -> list[str]:
    lines = ["| layer | kind | weights | MACs | multipliers | DSP | weight bits | BRAM18 | cycles |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in est["layers"]:
        lines.append(f"| `{r['layer']}` | {r['kind']} | {r['weights'] or '-'} | {r['macs']:,} | "
                     f"{r['multipliers']} | {r['dsp']} | {r['weight_bits']:,} | {r['bram18']} | "
                     f"{r['cycles']:,} |")
    t = est["total"]
    lines.append(f"| **total** | | | {t['macs']:,} | {t['multipliers']} | {t['dsp']} | "
                 f"{t['weight_bits']:,} | {t['bram18']} | {t['latency_cycles']:,} |")
    lines += ["", f"io={est['io']}, reuse={est['reuse']}, clock {est['clock_ns']} ns: latency "
              f"{t['latency_cycles']:,} cycles ({t['latency_us']} µs), interval "
              f"{t['interval_cycles']:,} cycles; activations {t['activation_bits']:,} bits."]
    return lines
