"""Frontends: resolve MODEL (an .onnx path, `package.module:callable`, a Hugging Face folder, a
built-in name) to IR plus its float reference; ``load`` is in ``loader``, input checks in ``inputs``.
"""

from slimgraph.frontend.inputs import (
    InputShapes,
    check_feed,
    fit_calibration,
    for_single_input,
    parse_input_spec,
    random_feeds,
)
from slimgraph.frontend.loader import (
    DEFAULT_MODEL,
    LoadedModel,
    TextData,
    check_reference_finite,
    load,
)

__all__ = [
    "DEFAULT_MODEL",
    "InputShapes",
    "LoadedModel",
    "TextData",
    "check_feed",
    "check_reference_finite",
    "fit_calibration",
    "for_single_input",
    "load",
    "parse_input_spec",
    "random_feeds",
]
