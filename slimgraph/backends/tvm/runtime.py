"""Loading a built `.so` with the TVM runtime alone and running it on numpy feeds."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from slimgraph.errors import BackendError
from slimgraph.verify import Runner

LIBRARY_FILE = "model.so"
IO_FILE = "io.json"


@dataclasses.dataclass
class TensorSpec:
    """One input or output as io.json records it."""

    name: str
    shape: list[int | str | None] | None  # str: a symbolic dim, None: unknown
    dtype: str

    @classmethod
    def of(cls, value: ir.Value) -> TensorSpec:
        shape = None if value.shape is None else [
            d if isinstance(d, int) else (str(d) if d.value is not None else None)
            for d in value.shape
        ]
        dtype = np.dtype(value.dtype.numpy()).name if value.dtype is not None else "float32"
        return cls(value.name, shape, dtype)


def load_runner(io_path: Path) -> Runner:
    """A numpy runner for the artifact described by ``io.json``; uses only the TVM runtime."""
    import tvm_ffi
    from tvm.runtime import cpu, cuda, load_module, tensor
    from tvm.runtime.vm import VirtualMachine

    io = json.loads(Path(io_path).read_text())
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        if io.get("threads"):
            # TVM's thread pool is per process: this applies to every TVM model in it.
            tvm_ffi.get_global_func("runtime.config_threadpool")(0, int(io["threads"]))
        device = cpu(0) if io["device"] == "cpu" else cuda(0)
        try:
            vm = VirtualMachine(load_module(str(Path(io_path).parent / io["library"])), device)
        except Exception as exc:
            raise BackendError(f"the TVM runtime cannot load {io_path.parent / io['library']}: "
                               f"{exc}") from exc
    finally:
        if cores is not None:
            # TVM 0.27 pins the calling thread to one core the first time its thread pool is
            # configured, and every thread started later inherits that (torch, onnxruntime ...):
            # give the cores back. Calls do not pin again; TVM's own workers keep theirs.
            os.sched_setaffinity(0, cores)
    main = vm[io["function"]]
    inputs = [TensorSpec(**s) for s in io["inputs"]]
    names = [s.name for s in inputs]
    dtypes = [(s.name, np.dtype(s.dtype)) for s in inputs]
    batch = io["batch"]
    valid_shapes: set[tuple[str, tuple[int, ...]]] = set()  # checked once per input and shape

    on_cpu = io["device"] == "cpu"

    def as_tensor(array: np.ndarray):
        if on_cpu and array.ctypes.data % 64 == 0:
            # zero-copy where the array is as aligned as TVM's own allocations (~15 us saved
            # per input at batch 1, where onnxruntime takes ~40 us in all)
            return tvm_ffi.from_dlpack(array, require_alignment=64, require_contiguous=True)
        return tensor(array, device)

    def run_static(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        arrays = [np.ascontiguousarray(feeds[n], dtype=d) for n, d in dtypes]
        result = main(*[as_tensor(a) for a in arrays])
        results = [result] if isinstance(result, tvm_ffi.Tensor) else list(result)
        if not on_cpu:
            return [r.numpy() for r in results]
        # each call allocates its outputs, so numpy may keep them without a copy; but an output
        # that is a view of a zero-copy input (a Reshape of it) must not alias the caller's array
        outputs = [np.from_dlpack(r) for r in results]
        return [o.copy() if any(np.may_share_memory(o, a) for a in arrays) else o
                for o in outputs]

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        for spec in inputs:
            if spec.name not in feeds:
                raise BackendError(f"TVM model: missing input {spec.name!r}")
            key = (spec.name, feeds[spec.name].shape)
            if key not in valid_shapes:
                _check_shape(spec, key[1], batch)
                valid_shapes.add(key)
        if batch is None or all(feeds[n].shape[0] == batch for n in names):
            return run_static(feeds)
        return _run_in_batches(run_static, feeds, names, batch)

    return run


def _check_shape(spec: TensorSpec, shape: tuple[int, ...], batch: int | None) -> None:
    expected = list(spec.shape)
    ok = len(shape) == len(expected) and all(
        isinstance(e, str) or e is None or e == s or (i == 0 and batch is not None)
        for i, (e, s) in enumerate(zip(expected, shape, strict=False))
    )
    if not ok:
        raise BackendError(f"TVM model: input {spec.name!r} has shape {list(shape)}, the "
                           f"compiled model takes {expected}" +
                           (f" (any batch, run {batch} at a time)" if batch else ""))


def _run_in_batches(run_static, feeds: dict[str, np.ndarray], names: list[str],
                    batch: int) -> list[np.ndarray]:
    """Run a fixed-batch model on any batch: slices of ``batch`` rows, the last one padded."""
    total = feeds[names[0]].shape[0]
    pieces: list[list[np.ndarray]] = []
    for start in range(0, total, batch):
        chunk = {n: feeds[n][start:start + batch] for n in names}
        rows = chunk[names[0]].shape[0]
        if rows < batch:
            chunk = {n: np.concatenate([v, np.repeat(v[-1:], batch - rows, axis=0)])
                     for n, v in chunk.items()}
        pieces.append([o[:rows] for o in run_static(chunk)])
    return [np.concatenate(outs) for outs in zip(*pieces, strict=True)]


