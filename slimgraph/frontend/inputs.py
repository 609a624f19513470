"""A model's inputs: ``--input NAME=DxD`` specs and their shape checks, and feeds checked against,
cast to or made for the inputs of a model."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from slimgraph.calibration import Calibration, Feeds, check_feed_array
from slimgraph.errors import DataError, InputSpecError

InputShapes = Mapping[str, Sequence[int]]


def parse_input_spec(spec: str) -> tuple[str, tuple[int, ...]]:
    """``image=1x3x32x32`` -> ("image", (1, 3, 32, 32))."""
    name, eq, dims = spec.partition("=")
    if not eq or not name or not re.fullmatch(r"\d+(x\d+)*", dims.strip()):
        raise InputSpecError(f"--input {spec!r}: expected NAME=DxDxD, e.g. image=1x3x32x32")
    return name.strip(), tuple(int(d) for d in dims.strip().split("x"))


def _check_input_names(model: ir.Model, inputs: dict, label: str) -> None:
    names = [v.name for v in model.graph.inputs]
    for name, shape in inputs.items():
        value = next((v for v in model.graph.inputs if v.name == name), None)
        if value is None:
            raise InputSpecError(f"--input {name}: {label} has no input {name!r}; inputs: {names}")
        _check_shape(value, shape, label, f"--input {name}={'x'.join(map(str, shape))}")


def _check_shape(value: ir.Value, shape: Sequence[int], label: str, subject: str) -> None:
    """Refuse ``shape`` (given by ``subject``) where it contradicts the input's static dims."""
    dims = list(value.shape) if value.shape is not None else None
    if dims is None:
        return
    if len(dims) != len(shape):
        raise InputSpecError(
            f"{subject}: {label} input {value.name!r} has rank {len(dims)} "
            f"(shape {_shape_text(dims)}), not {len(shape)}"
        )
    for i, (d, s) in enumerate(zip(dims, shape, strict=True)):
        if isinstance(d, int) and d != s:
            raise InputSpecError(
                f"{subject}: dim {i} is {s} but {label} input {value.name!r} "
                f"has shape {_shape_text(dims)}"
            )


def _check_builtin_inputs(builtin, inputs: dict) -> None:
    for name, shape in inputs.items():
        if name not in builtin.input_names:
            raise InputSpecError(
                f"--input {name}: built-in {builtin.name!r} has inputs {builtin.input_names}"
            )
        example = builtin.example_inputs[builtin.input_names.index(name)]
        if tuple(shape[1:]) != tuple(example.shape[1:]):
            raise InputSpecError(
                f"--input {name}={'x'.join(map(str, shape))}: built-in {builtin.name!r} takes "
                f"{name} of shape Nx{'x'.join(map(str, example.shape[1:]))}"
            )


def _shape_text(dims: Sequence) -> str:
    return "x".join(str(d) if isinstance(d, int) else str(d or "?") for d in dims)


def for_single_input(model: ir.Model, calib: Calibration | None) -> Calibration | None:
    """A single-input model takes the only array of each calibration feed whatever its name
    (an .npz saved as ``x`` for a torch callable whose input is ``input_0``); else ``calib``."""
    inputs = model.graph.inputs
    if calib is None or len(inputs) != 1 or not calib.feeds:
        return calib
    name = inputs[0].name
    if all(len(f) == 1 and name not in f for f in calib.feeds):
        return Calibration([{name: next(iter(f.values()))} for f in calib.feeds], calib.source)
    return calib


def fit_calibration(model: ir.Model, calib: Calibration | None) -> Calibration | None:
    """``calib`` with every feed checked against the model's inputs and cast to their types."""
    calib = for_single_input(model, calib)
    if calib is None:
        return None
    if not calib.feeds:
        raise DataError(f"{calib.source}: holds no samples")
    return Calibration([check_feed(model, f, calib.source) for f in calib.feeds], calib.source)


def check_feed(model: ir.Model, feed: Feeds, label: str) -> Feeds:
    """The model's inputs taken from ``feed`` (named by ``label`` in messages), each checked by
    ``check_feed_array``, of a shape the model accepts and cast to the input's element type."""
    fitted = {}
    for value in model.graph.inputs:
        if value.name not in feed:
            raise InputSpecError(f"{label}: no array for input {value.name!r}; arrays: "
                                 f"{', '.join(sorted(feed)) or 'none'}")
        array = check_feed_array(label, value.name, np.asarray(feed[value.name]))
        shape = "x".join(map(str, array.shape))
        _check_shape(value, array.shape, "the model", f"{label}: array {value.name!r} of shape {shape}")
        fitted[value.name] = _as_input_type(value, array, label)
    return fitted


def _as_input_type(value: ir.Value, array: np.ndarray, label: str) -> np.ndarray:
    """``array`` cast to the input's type where that keeps every value: any number into a float
    input (finite after the cast), integers that fit into an integer input."""
    want = _NUMPY_DTYPES.get(value.dtype) if value.dtype is not None else None
    if want is None or array.dtype == want:
        return array
    want = np.dtype(want)
    if want.kind == "f" and array.dtype.kind in "biuf":
        cast = array.astype(want)
        if not np.isfinite(cast).all():
            raise DataError(f"{label}: array {value.name!r} holds values beyond the {want} range "
                            f"of the model's input")
        return cast
    if want.kind in "iu" and array.dtype.kind in "biu":
        info = np.iinfo(want)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise DataError(f"{label}: array {value.name!r} holds values outside the {want} range "
                            f"of the model's input ({array.min()} .. {array.max()})")
        return array.astype(want)
    raise InputSpecError(f"{label}: array {value.name!r} is {array.dtype} but the model's input "
                         f"{value.name!r} takes {want}")



_NUMPY_DTYPES = {
    ir.DataType.FLOAT: np.float32, ir.DataType.DOUBLE: np.float64,
    ir.DataType.FLOAT16: np.float16, ir.DataType.INT64: np.int64, ir.DataType.INT32: np.int32,
    ir.DataType.INT8: np.int8, ir.DataType.UINT8: np.uint8, ir.DataType.BOOL: np.bool_,
}


def random_feeds(model: ir.Model, inputs: InputShapes | None = None, seed: int = 0,
                 batch: int = 2) -> Feeds:
    """Deterministic inputs for a model without data: N(0,1) floats, small non-negative ints.

    Shapes come from ``inputs`` where given, else the graph's; symbolic dims read as ``batch``.
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        if inputs and value.name in inputs:
            shape = tuple(inputs[value.name])
        elif value.shape is not None:
            shape = tuple(d if isinstance(d, int) else batch for d in value.shape)
        else:
            raise InputSpecError(f"input {value.name!r} has no shape: pass --input {value.name}=...")
        dtype = value.dtype
        np_dtype = _NUMPY_DTYPES.get(dtype) if dtype is not None else None
        if np_dtype is None:
            raise InputSpecError(
                f"input {value.name!r} has type {dtype}; pass real data with --calib FILE.npz"
            )
        if np.issubdtype(np_dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(np_dtype)
        elif np_dtype is np.bool_:
            feeds[value.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[value.name] = rng.integers(0, 10, shape).astype(np_dtype)
    return feeds
