"""TvmBackend: import with the Relax ONNX frontend, compile, export_library to model.so.

Untuned builds use TVM's default schedules, which are far slower than onnxruntime on CPU;
`tune=N` runs MetaSchedule for N trials (static shapes only: the batch is fixed to `batch=`,
default 1) and keeps the tuning database under ~/.cache/slimgraph/tvm/<key>/, keyed by the model
and target, so a second export of the same model reuses it. On CPU, ``prepack`` (default on) lets
the tuner choose packed weight layouts, which are computed at build time and stored in the `.so`,
and ``layout`` (default NHWC) is the activation layout its convolutions are tuned in.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from slimgraph.artifact import write_json
from slimgraph.backends.base import BuiltArtifact
from slimgraph.backends.tvm.lower import prepare_for_import
from slimgraph.backends.tvm.runtime import IO_FILE, LIBRARY_FILE, TensorSpec, load_runner
from slimgraph.backends.tvm.tuning import tune
from slimgraph.calibration import Feeds
from slimgraph.errors import BackendError, UnsupportedOpError
from slimgraph.verify import Runner

DEFAULT_CACHE = Path.home() / ".cache" / "slimgraph" / "tvm"
DEFAULT_CUDA_ARCH = "sm_90"
LAYOUTS = ("NCHW", "NHWC")  # of the convolutions a tuned CPU build schedules
MAX_THREADS = 4096
MAX_TRIALS = 10_000_000  # MetaSchedule trials: far past any tuning budget

logger = logging.getLogger(__name__)


def tvm_unavailable_reason() -> str | None:
    """None when TVM imports, else why not (never raises)."""
    if importlib.util.find_spec("tvm") is None:
        return "apache-tvm is not installed (pip install 'slimgraph[tvm]')"
    try:
        importlib.import_module("tvm")
    except Exception as exc:  # a broken install can fail in many ways
        return f"apache-tvm is installed but does not import: {exc}"
    return None


class TvmBackend:
    """Compiles the graph with TVM Relax for one target kind ("llvm" or "cuda")."""

    def __init__(self, name: str, kind: str, description: str) -> None:
        self.name = name
        self.kind = kind
        self.description = description

    def default_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"tune": 0, "batch": None, "cache_dir": str(DEFAULT_CACHE)}
        if self.kind == "llvm":
            options |= {"mcpu": "host", "threads": 0,  # 0: the TVM runtime's default
                        "prepack": True, "layout": "NHWC"}
        else:
            options |= {"arch": DEFAULT_CUDA_ARCH}
        return options

    def available(self) -> bool:
        return self.unavailable_reason() is None

    def unavailable_reason(self) -> str | None:
        reason = tvm_unavailable_reason()
        if reason is not None or self.kind == "llvm":
            return reason
        return cuda_unavailable_reason()

    def buildable(self) -> bool:
        """Can it build here? tvm-cuda generates code without a GPU."""
        if tvm_unavailable_reason() is not None:
            return False
        import tvm_ffi

        return tvm_ffi.get_global_func(f"target.build.{self.kind}", allow_missing=True) is not None

    def build(self, model: ir.Model, root: Path, options: dict[str, Any],
              feeds: Sequence[Feeds] | None = None) -> BuiltArtifact:
        reason = tvm_unavailable_reason()
        if reason is not None:
            raise BackendError(f"{self.name}: {reason}")
        config = self.options(options)
        import tvm

        inputs = [TensorSpec.of(v) for v in model.graph.inputs if v.const_value is None]
        for spec in inputs:
            if spec.shape is None:
                raise BackendError(f"{self.name}: input {spec.name!r} has no shape; TVM needs its "
                                   "rank (give the shape with --input)")
        outputs = [TensorSpec.of(v) for v in model.graph.outputs]
        batch_dim = _shared_batch_dim(inputs, outputs)
        batch = config["batch"]
        if config["tune"] and batch is None and batch_dim is not None:
            batch = 1  # MetaSchedule tunes static shapes; the runner splits bigger batches
        if batch is not None and batch_dim is None:
            raise BackendError(
                f"{self.name}: batch={batch} needs a symbolic first dimension shared by every "
                f"input and output; inputs are {[(s.name, s.shape) for s in inputs]}"
            )
        try:
            mod = import_onnx(model, batch, self.name)
        except UnsupportedOpError:
            raise
        except BackendError as exc:
            if batch is not None or batch_dim is None:
                raise
            # e.g. attention masks built from Shape ops: without a static batch the frontend
            # loses shapes that a later Reshape needs
            mod = import_onnx(model, 1, self.name)
            batch = 1
            config["dynamic_batch_failed"] = str(exc)
            logger.warning("%s: the graph does not import with a dynamic batch (%s); compiled "
                           "for batch=1 instead, bigger batches run 1 row at a time (give "
                           "batch=N to compile for N rows)", self.name, exc)
        config["batch"] = batch
        target = self._target(config)
        if config["tune"]:
            _reject_symbolic(mod, self.name)
            config["tuning"] = tune(mod, target, config, self.name)
            mod = config.pop("_tuned_mod")
        try:
            with tvm.transform.PassContext(opt_level=3):
                executable = tvm.compile(mod, target=target)
        except Exception as exc:
            raise BackendError(f"{self.name}: tvm.compile failed for {target}: {exc}") from exc
        out = root / self.name
        out.mkdir(parents=True, exist_ok=True)
        try:
            executable.export_library(str(out / LIBRARY_FILE))
        except Exception as exc:
            raise BackendError(f"{self.name}: export_library failed: {exc}") from exc
        io = {
            "library": LIBRARY_FILE,
            "function": "main",
            "device": "cpu" if self.kind == "llvm" else "cuda",
            "batch": batch,
            "batch_dim": batch_dim,
            "inputs": [dataclasses.asdict(s) for s in inputs],
            "outputs": [dataclasses.asdict(s) for s in outputs],
            "threads": config.get("threads", 0),
        }
        write_json(out / IO_FILE, io)
        config.pop("cache_dir")  # a local path; the tuning record says where the database is keyed
        config["target"] = json.loads(str(target))  # Target prints as its JSON dict
        config["untuned"] = not config["tune"]
        if config["untuned"] and self.kind == "llvm":
            # measured (benchmarks/results/tvm_vs_ort.md): 2-90x slower than ort-cpu untuned;
            # tuned with 384-1280 trials 0.75-1.15x, resnet-tiny at batch 64 2.5x
            logger.warning("%s: untuned build (TVM default schedules), measured 2-90x slower "
                           "than ort-cpu; add tune=N (e.g. tune=640, ~40-64 trials per tuning "
                           "task) to run MetaSchedule", self.name)
        files = [f"{self.name}/{IO_FILE}", f"{self.name}/{LIBRARY_FILE}"]
        return BuiltArtifact(self.name, root, files, config, f"{self.name}/{IO_FILE}")

    def load(self, built: BuiltArtifact) -> Runner:
        if not self.available():
            raise BackendError(f"{self.name} is unavailable: {self.unavailable_reason()}")
        return load_runner(built.entry_path)

    def options(self, options: dict[str, Any]) -> dict[str, Any]:
        defaults = self.default_options()
        unknown = set(options) - set(defaults)
        if unknown:
            raise BackendError(
                f"{self.name}: unknown option(s) {', '.join(sorted(unknown))}; "
                f"valid: {', '.join(defaults)}"
            )
        config = {**defaults, **options}
        for key, most in (("tune", MAX_TRIALS), ("threads", MAX_THREADS)):
            value = config.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
                raise BackendError(f"{self.name}: {key}={value!r} must be an integer from 0 to {most}")
        if not isinstance(config.get("prepack", False), bool):
            raise BackendError(f"{self.name}: prepack={config['prepack']!r} must be true or false")
        if config.get("layout", "NCHW") not in LAYOUTS:
            raise BackendError(f"{self.name}: layout={config['layout']!r} must be one of "
                               f"{', '.join(LAYOUTS)}")
        if config["batch"] is not None and (not isinstance(config["batch"], int)
                                            or config["batch"] < 1):
            raise BackendError(f"{self.name}: batch={config['batch']!r} must be an integer >= 1")
        if self.kind == "llvm":
            config["mcpu"] = resolve_mcpu(config["mcpu"], self.name)
        elif not (isinstance(config["arch"], str) and config["arch"].startswith("sm_")):
            raise BackendError(f"{self.name}: arch={config['arch']!r} must look like sm_90")
        return config

    def _target(self, config: dict[str, Any]):
        import tvm

        if self.kind == "llvm":
            spec: dict[str, Any] = {"kind": "llvm"}
            if config["mcpu"] != "generic":
                spec["mcpu"] = config["mcpu"]
            if config["tune"]:
                # MetaSchedule's parallel schedules read the core count from the target
                spec["num-cores"] = config["threads"] or os.cpu_count() or 1
            return tvm.target.Target(spec)
        host = {"kind": "llvm"}
        return tvm.target.Target({"kind": "cuda", "arch": config["arch"], "host": host})


def resolve_mcpu(mcpu: str, backend: str) -> str:
    """``host`` -> the CPU LLVM detects here, or ``generic`` where LLVM does not know it."""
    from tvm.target import Target, codegen

    with Target({"kind": "llvm"}) as target:
        known = set(codegen.llvm_get_cpu_archlist(target))
    if mcpu == "host":
        detected = codegen.llvm_get_system_cpu()
        return detected if detected in known else "generic"
    if mcpu != "generic" and mcpu not in known:
        raise BackendError(
            f"{backend}: mcpu={mcpu!r} is not a CPU this LLVM knows; use host, generic or one "
            f"of e.g. {', '.join(sorted(known)[:8])} ..."
        )
    return mcpu


def cuda_unavailable_reason() -> str | None:
    """None when a CUDA GPU is visible to the TVM runtime."""
    import tvm

    # enabled("cuda") is False where the CUDA driver is missing, even in a CUDA-enabled wheel
    if not tvm.runtime.enabled("cuda") or not tvm.cuda(0).exist:
        return "no CUDA GPU or driver on this machine (tvm-cuda still builds: code generation only)"
    return None


def import_onnx(model: ir.Model, batch: int | None, backend: str):
    """The Relax module of ``model`` (lowered first, see ``lower``); with ``batch``, the symbolic
    batch dim becomes that number."""
    from tvm.relax.frontend.onnx import from_onnx

    proto = ir.to_proto(prepare_for_import(model, batch, backend))
    try:
        return from_onnx(proto, keep_params_in_input=False)
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if type(exc).__name__ == "OpNotImplemented":
            raise UnsupportedOpError(f"{backend}: the TVM Relax ONNX frontend: {message}") from exc
        raise BackendError(f"{backend}: the TVM Relax ONNX frontend cannot import the graph: "
                           f"{type(exc).__name__}: {message}") from exc


def _shared_batch_dim(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> str | None:
    """The symbolic first dim every input and output shares (the batch), if there is one."""
    firsts = {s.shape[0] if s.shape else None for s in [*inputs, *outputs]}
    if len(firsts) == 1:
        (first,) = firsts
        if isinstance(first, str):
            return first
    return None


def _reject_symbolic(mod, backend: str) -> None:
    import tvm

    for param in mod["main"].params:
        shape = getattr(param.ty, "shape", None)
        values = getattr(shape, "values", None)
        if values is None or not all(isinstance(d, tvm.tirx.IntImm) for d in values):
            raise BackendError(
                f"{backend}: tuning needs static shapes, but input {param.name_hint!r} has shape "
                f"{shape}; fix its symbolic dims (batch=N fixes the batch)"
            )


TVM_LLVM = TvmBackend("tvm-llvm", "llvm", "Apache TVM Relax, compiled for this CPU (LLVM)")
TVM_CUDA = TvmBackend("tvm-cuda", "cuda", "Apache TVM Relax, compiled for CUDA (dlight schedules)")
