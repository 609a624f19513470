"""The `hls` backend: an int8 QDQ, binary or fixed-point graph -> a Vitis HLS C++ project.

The backend and its options are in ``backend``; the C simulation that proves it in ``csim``.
"""

from slimgraph.backends.hls.backend import HLS, HlsBackend
from slimgraph.backends.hls.csim import CsimRunner, compile_csim, find_ap_types

__all__ = ["HLS", "CsimRunner", "HlsBackend", "compile_csim", "find_ap_types"]
