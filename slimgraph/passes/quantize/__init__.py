"""quantize: QuantizeLinear/DequantizeLinear insertion (int8 static or dynamic, int4, binary).

The pass is ``insert_qdq.InsertQDQPass``; each mode's math lives in its own module.
"""

from slimgraph.passes.quantize.calibrate import collect_ranges
from slimgraph.passes.quantize.divergence import Divergence, first_divergence
from slimgraph.passes.quantize.insert_qdq import InsertQDQPass
from slimgraph.passes.quantize.int8 import (
    Int8Target,
    QParams,
    activation_qparams,
    cpu_flags,
    int8_target,
    quantize_weight,
)
from slimgraph.passes.quantize.latency import latency_ratio
from slimgraph.passes.quantize.layers import quantizable_layers, weight_axis
from slimgraph.passes.quantize.weight_only import (
    BINARY_WEIGHT_TAG,
    binary_weight,
    quantize_int4_blocks,
)

__all__ = [
    "BINARY_WEIGHT_TAG",
    "Divergence",
    "InsertQDQPass",
    "Int8Target",
    "QParams",
    "activation_qparams",
    "binary_weight",
    "collect_ranges",
    "cpu_flags",
    "first_divergence",
    "int8_target",
    "latency_ratio",
    "quantizable_layers",
    "quantize_int4_blocks",
    "quantize_weight",
    "weight_axis",
]
