"""Apache TVM backends: `tvm-llvm` (CPU) and `tvm-cuda`, compiled through Relax.

The artifact is `<backend>/model.so` (weights inside, loadable by the bare TVM runtime with
`tvm.runtime.load_module` + `tvm.runtime.vm.VirtualMachine`) and `<backend>/io.json` (names,
shapes, dtypes, the fixed batch if any). TVM is imported lazily, so slimgraph works without it.

Untuned builds use TVM's default schedules, which are far slower than onnxruntime on CPU;
`tune=N` runs MetaSchedule for N trials (static shapes only: the batch is fixed to `batch=`,
default 1) and keeps the tuning database under ~/.cache/slimgraph/tvm/<key>/, keyed by the model
and target, so a second export of the same model reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.backends.base import BuiltArtifact
from slimgraph.errors import BackendError, UnsupportedOpError
from slimgraph.verify import Runner

LIBRARY_FILE = "model.so"
IO_FILE = "io.json"
DEFAULT_CACHE = Path.home() / ".cache" / "slimgraph" / "tvm"
DEFAULT_CUDA_ARCH = "sm_90"
TUNE_SEED = 0

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


@dataclasses.dataclass
class TensorSpec:
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


class TvmBackend:
    """Compiles the graph with TVM Relax for one target kind ("llvm" or "cuda")."""

    def __init__(self, name: str, kind: str, description: str) -> None:
        self.name = name
        self.kind = kind
        self.description = description

    def default_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"tune": 0, "batch": None, "cache_dir": str(DEFAULT_CACHE)}
        if self.kind == "llvm":
            options |= {"mcpu": "host", "threads": 0}  # 0: the TVM runtime's default
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

    def build(self, model: ir.Model, root: Path, options: dict[str, Any]) -> BuiltArtifact:
        reason = tvm_unavailable_reason()
        if reason is not None:
            raise BackendError(f"{self.name}: {reason}")
        config = self._resolve_options(options)
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
        config["batch"] = batch
        target = self._target(config)
        mod = import_onnx(model, inputs, batch, self.name)
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
        (out / IO_FILE).write_text(json.dumps(io, indent=2, sort_keys=True) + "\n")
        config.pop("cache_dir")  # a local path; the tuning record says where the database is keyed
        config["target"] = json.loads(str(target))  # Target prints as its JSON dict
        config["untuned"] = not config["tune"]
        if config["untuned"] and self.kind == "llvm":
            # measured (benchmarks/results/tvm_vs_ort*.md): 5-40x slower than ort-cpu untuned
            logger.warning("%s: untuned build (TVM default schedules), typically 5-40x slower "
                           "than ort-cpu; add tune=N (e.g. tune=200) to run MetaSchedule", self.name)
        files = [f"{self.name}/{IO_FILE}", f"{self.name}/{LIBRARY_FILE}"]
        return BuiltArtifact(self.name, root, files, config, f"{self.name}/{IO_FILE}")

    def load(self, built: BuiltArtifact) -> Runner:
        if not self.available():
            raise BackendError(f"{self.name} is unavailable: {self.unavailable_reason()}")
        return load_runner(built.entry_path)

    def _resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        defaults = self.default_options()
        unknown = set(options) - set(defaults)
        if unknown:
            raise BackendError(
                f"{self.name}: unknown option(s) {', '.join(sorted(unknown))}; "
                f"valid: {', '.join(defaults)}"
            )
        config = {**defaults, **options}
        for key in ("tune", "threads"):
            if key in config and (not isinstance(config[key], int) or config[key] < 0):
                raise BackendError(f"{self.name}: {key}={config[key]!r} must be an integer >= 0")
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


def import_onnx(model: ir.Model, inputs: list[TensorSpec], batch: int | None, backend: str):
    """The Relax module of ``model``; with ``batch``, the symbolic batch dim becomes that number."""
    from tvm.relax.frontend.onnx import from_onnx

    shape_dict = None
    if batch is not None:
        shape_dict = {s.name: [batch, *s.shape[1:]] for s in inputs}
    proto = ir.to_proto(model)
    try:
        return from_onnx(proto, shape_dict=shape_dict, keep_params_in_input=False)
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


# --- tuning -------------------------------------------------------------------------------------


def load_cpu_tensor_intrinsics() -> None:
    """Import the x86 tensor intrinsics MetaSchedule needs, without the rest of the package.

    apache-tvm 0.27's `tvm.s_tir.tensor_intrin/__init__` parses the intrinsics of every target
    (~30 s, CUDA alone ~19 s), and MetaSchedule imports it in every tuning context and every
    builder process it starts per batch of candidates: that made 16 trials take minutes here.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    import tvm.s_tir  # noqa: F401  (the parent package must exist before the stub)

    spec = importlib.util.find_spec(name)
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules[name] = package
    importlib.import_module(f"{name}.x86")


def tuning_key(mod, target) -> str:
    """A key for the tuning database: the Relax module's structural hash and the target."""
    import tvm_ffi

    text = f"{tvm_ffi.structural_hash(mod)}|{json.dumps(json.loads(str(target)), sort_keys=True)}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def tune(mod, target, config: dict[str, Any], backend: str) -> dict[str, Any]:
    """Run (or reuse) MetaSchedule for ``config["tune"]`` trials; returns the tuning record and
    leaves the scheduled module in ``config["_tuned_mod"]``."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    if target.kind.name == "llvm":
        load_cpu_tensor_intrinsics()
    trials = config["tune"]
    with target:
        mod = tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            relax.get_pipeline("zero"),
        ])(mod)
    key = tuning_key(mod, target)
    work_dir = Path(config["cache_dir"]).expanduser() / key
    record_file = work_dir / "slimgraph_tuning.json"
    record = json.loads(record_file.read_text()) if record_file.exists() else None
    if record is None or record.get("trials", 0) < trials:
        if work_dir.exists():
            shutil.rmtree(work_dir)  # a smaller or interrupted run: tune afresh
        work_dir.mkdir(parents=True)
        tasks = ms.relax_integration.extract_tasks(mod, target)
        started = time.perf_counter()
        try:
            ms.relax_integration.tune_relax(
                mod, {}, target, str(work_dir),
                max_trials_global=trials,
                max_trials_per_task=max(16, -(-trials // max(len(tasks), 1))),
                num_trials_per_iter=16,
                builder=ms.builder.LocalBuilder(
                    initializer=load_cpu_tensor_intrinsics if target.kind.name == "llvm" else None,
                    timeout_sec=120,
                ),
                runner=ms.runner.LocalRunner() if target.kind.name == "llvm" else "local",
                seed=TUNE_SEED,
            )
        except Exception as exc:
            raise BackendError(f"{backend}: MetaSchedule tuning failed: {exc}") from exc
        record = {"trials": trials, "tasks": len(tasks), "key": key,
                  "seconds": round(time.perf_counter() - started, 1)}
        record_file.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        cache = "miss"
    else:
        cache = "hit"
    database = ms.database.JSONDatabase(work_dir=str(work_dir), allow_missing=False)
    with target, database:
        config["_tuned_mod"] = relax.transform.MetaScheduleApplyDatabase()(mod)
    return {**record, "trials_requested": trials, "cache": cache}


# --- runtime (only tvm.runtime from here on) ----------------------------------------------------


def load_runner(io_path: Path) -> Runner:
    """A numpy runner for the artifact described by ``io.json``; uses only the TVM runtime."""
    import tvm_ffi
    from tvm.runtime import cpu, cuda, load_module, tensor
    from tvm.runtime.vm import VirtualMachine

    io = json.loads(Path(io_path).read_text())
    if io.get("threads"):
        # TVM's thread pool is per process: this applies to every TVM model in it.
        tvm_ffi.get_global_func("runtime.config_threadpool")(0, int(io["threads"]))
    device = cpu(0) if io["device"] == "cpu" else cuda(0)
    try:
        vm = VirtualMachine(load_module(str(Path(io_path).parent / io["library"])), device)
    except Exception as exc:
        raise BackendError(f"the TVM runtime cannot load {io_path.parent / io['library']}: {exc}") \
            from exc
    main = vm[io["function"]]
    inputs = [TensorSpec(**s) for s in io["inputs"]]
    batch = io["batch"]

    def run_static(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [tensor(np.ascontiguousarray(feeds[s.name], dtype=s.dtype), device) for s in inputs]
        result = main(*args)
        results = [result] if hasattr(result, "numpy") else list(result)
        return [r.numpy() for r in results]

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        for spec in inputs:
            if spec.name not in feeds:
                raise BackendError(f"TVM model: missing input {spec.name!r}")
            _check_shape(spec, feeds[spec.name].shape, batch)
        if batch is None:
            return run_static(feeds)
        return _run_in_batches(run_static, feeds, [s.name for s in inputs], batch)

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


TVM_LLVM = TvmBackend("tvm-llvm", "llvm", "Apache TVM Relax, compiled for this CPU (LLVM)")
TVM_CUDA = TvmBackend("tvm-cuda", "cuda", "Apache TVM Relax, compiled for CUDA (dlight schedules)")
