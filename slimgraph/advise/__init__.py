"""advise: which device, precision and backend serve a model cheapest, bounded by the roofline:
the device catalogue (``catalogue``), this machine (``host``), per-layer bounds (``roofline``),
calibration and ranking (``ranking``), ``advise`` itself (``advice``) and its figure (``plot``)."""

from slimgraph.advise.advice import Advice, advise, check_request
from slimgraph.advise.catalogue import (
    CATALOGUE,
    GBPS_RANGE,
    KINDS,
    MAX_PRICE,
    MEMORY_GB_RANGE,
    TOPS_RANGE,
    Check,
    load_catalogue,
)
from slimgraph.advise.device import BITS, Device
from slimgraph.advise.host import (
    HOST,
    cpu_flags,
    gpu_entry,
    host_device,
    lent_gpu,
    measure_bandwidth,
    measure_host,
)
from slimgraph.advise.plot import plot_roofline
from slimgraph.advise.ranking import Choice, choices_for, footprint_bytes, rank
from slimgraph.advise.roofline import BACKEND_PRECISIONS, LayerBound, layer_bounds

__all__ = [
    "BACKEND_PRECISIONS", "BITS", "CATALOGUE", "GBPS_RANGE", "HOST", "KINDS", "MAX_PRICE",
    "MEMORY_GB_RANGE", "TOPS_RANGE", "Advice", "Check", "Choice", "Device", "LayerBound", "advise",
    "check_request", "choices_for", "cpu_flags", "footprint_bytes", "gpu_entry", "host_device",
    "layer_bounds", "lent_gpu", "load_catalogue", "measure_bandwidth", "measure_host",
    "plot_roofline", "rank",
]
