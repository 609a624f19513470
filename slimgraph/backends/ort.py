"""onnxruntime backends: `ort-cpu` and `ort-cuda` (CUDA execution provider).

The artifact is the optimised model.onnx plus `<backend>/session.json`, the session options and
providers that run it best; `load` rebuilds the session from exactly that file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from slimgraph.artifact import write_json
from slimgraph.backends.base import BuiltArtifact
from slimgraph.calibration import Feeds
from slimgraph.errors import BackendError
from slimgraph.verify import Runner

MODEL_FILE = "model.onnx"

# Fusions whose CPU kernels are slower than the ops they replace (onnxruntime 1.32, measured by
# benchmarks/ort_fusions.py): SkipLayerNormalization takes 1.1-2.0 ms on a 16x64x384 tensor where
# Add + Add + LayerNormalization take ~0.4 ms, which cost int8 MiniLM 15-20% of its run time.
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
MAX_THREADS = 4096


def session_options(config: dict[str, Any]) -> ort.SessionOptions:
    """SessionOptions from a session.json dict."""
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[config.get("graph_optimization_level", "all")]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = int(config.get("intra_op_num_threads", 0))
    so.inter_op_num_threads = 1
    # Spinning threads win latency for one session but steal the cores from any other session in
    # the process (measured: the same model against itself read 0.68x with spinning on).
    so.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if config.get("allow_spinning", True) else "0"
    )
    so.log_severity_level = 3
    return so


def session_for(model: bytes | str | Path, config: dict[str, Any] | None = None,
                providers: list | None = None, profile_prefix: str | None = None) -> ort.InferenceSession:
    """An InferenceSession on a serialized model or a path, CPU unless ``providers`` say otherwise.

    ``config["disabled_optimizers"]`` names onnxruntime graph transformers to skip; without it, a
    CPU-only session skips ``CPU_DISABLED_OPTIMIZERS``.
    """
    config = config or {}
    providers = providers or ["CPUExecutionProvider"]
    cpu_only = all((p[0] if isinstance(p, tuple) else p) == "CPUExecutionProvider" for p in providers)
    disabled = config.get("disabled_optimizers", list(CPU_DISABLED_OPTIMIZERS) if cpu_only else [])
    source = model if isinstance(model, bytes) else str(model)
    options = session_options(config)
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(
        source, sess_options=options, providers=providers, disabled_optimizers=list(disabled) or None,
    )


def serialize(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


def inputs_of(session: ort.InferenceSession, feed: Feeds) -> Feeds:
    """The entries of ``feed`` that ``session`` takes (a probe of a pruned graph may take fewer)."""
    wanted = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feed.items() if k in wanted}


def run_feeds(model: ir.Model, feeds: Sequence[Feeds]) -> list[list[np.ndarray]]:
    """Every graph output of ``model`` for each feed (one session, spinning off)."""
    session = session_for(serialize(model), {"allow_spinning": False})
    return [session.run(None, inputs_of(session, f)) for f in feeds]


def probe_session(model: ir.Model, names: Sequence[str], config: dict[str, Any] | None = None,
                  ) -> tuple[ort.InferenceSession, list[str]]:
    """A session on a copy of ``model`` that also returns the named values: the one way slimgraph
    looks inside a graph with onnxruntime (calibration ranges, divergence, dead channels, the cut
    search's value sizes, the hls comparison). Returns the session and the names it can return, in
    the order given (unknown names are left out; a graph output or input is returned as it is).
    ``config``: session settings (``session_for``'s), spinning off by default."""
    probe = model.clone()
    values = {k: v for k, v in ir.convenience.create_value_mapping(
        probe.graph, include_subgraphs=False).items() if not v.is_initializer() or v.is_graph_input()}
    present = {v.name for v in probe.graph.outputs}
    for name in names:
        value = values.get(name)
        if value is not None and name not in present:
            probe.graph.outputs.append(value)
            present.add(name)
    session = session_for(serialize(probe), {"allow_spinning": False} | (config or {}))
    return session, [n for n in names if n in present]


def kernel_time_by_op(model: bytes | str | Path, feed: dict[str, np.ndarray], runs: int = 20,
                      config: dict[str, Any] | None = None) -> dict[str, float]:
    """Microseconds per run spent in each op type's kernels, from onnxruntime's profiler (CPU),
    after five warm-up runs; op types as onnxruntime ran them (after its fusions), costliest first."""
    per_op: dict[str, float] = {}
    for e in _kernel_events(model, feed, runs, config):
        op = e["args"]["op_name"]
        per_op[op] = per_op.get(op, 0.0) + e["dur"] / runs
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def kernel_time_by_node(model: bytes | str | Path, feed: dict[str, np.ndarray], runs: int = 20,
                        config: dict[str, Any] | None = None) -> dict[str, float]:
    """Microseconds per run of each node's kernel, by node name, after five warm-up runs. With
    ``graph_optimization_level="disabled"`` in ``config`` the names are the graph's own."""
    per_node: dict[str, float] = {}
    for e in _kernel_events(model, feed, runs, config):
        name = e["name"].removesuffix("_kernel_time")
        per_node[name] = per_node.get(name, 0.0) + e["dur"] / runs
    return per_node


def _kernel_events(model: bytes | str | Path, feed: dict[str, np.ndarray], runs: int,
                   config: dict[str, Any] | None) -> list[dict[str, Any]]:
    """onnxruntime's profiler events of every kernel in ``runs`` runs after five warm-up runs."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        session = session_for(model, config, profile_prefix=str(Path(tmp) / "profile"))
        wanted = {i.name for i in session.get_inputs()}
        inputs = {k: v for k, v in feed.items() if k in wanted}
        for _ in range(5 + runs):
            session.run(None, inputs)
        events = json.loads(Path(session.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return kernels[len(kernels) * 5 // (5 + runs):]  # the warm-up runs come first


def runner_for(session: ort.InferenceSession) -> Runner:
    names = [o.name for o in session.get_outputs()]
    input_names = {i.name for i in session.get_inputs()}

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return session.run(names, {k: v for k, v in feeds.items() if k in input_names})

    return run


class OrtBackend:
    """Runs model.onnx on onnxruntime with one execution provider (CPU fallback for CUDA)."""

    def __init__(self, name: str, provider: str, description: str) -> None:
        self.name = name
        self.provider = provider
        self.description = description

    def available(self) -> bool:
        return self.unavailable_reason() is None

    def unavailable_reason(self) -> str | None:
        if self.provider not in ort.get_available_providers():
            return f"onnxruntime {ort.__version__} here has no {self.provider}"
        if self.provider == "CUDAExecutionProvider" and not _cuda_device_present():
            return "no CUDA GPU on this machine"
        return None

    def buildable(self) -> bool:
        """A session file is pointless to build where it cannot be verified."""
        return self.available()

    def default_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "graph_optimization_level": "all",
            "intra_op_num_threads": 0,  # 0: onnxruntime's default, one thread per physical core
            "allow_spinning": True,
            "disabled_optimizers": (list(CPU_DISABLED_OPTIMIZERS)
                                    if self.provider == "CPUExecutionProvider" else []),
        }
        if self.provider == "CUDAExecutionProvider":
            # TF32 matmuls drift ~1e-3 relative from fp32, past the exact passes' tolerance;
            # a user who accepts that sets use_tf32=1 for the speed.
            options["cuda"] = {"cudnn_conv_algo_search": "EXHAUSTIVE", "device_id": 0,
                               "use_tf32": 0}
        return options

    def options(self, given: dict[str, Any]) -> dict[str, Any]:
        """The defaults updated by ``given``, or BackendError naming the unknown or mistyped one."""
        defaults = self.default_options()
        unknown = set(given) - set(defaults)
        if unknown:
            raise BackendError(
                f"{self.name}: unknown option(s) {', '.join(sorted(unknown))}; "
                f"valid: {', '.join(defaults)}"
            )
        options = {**defaults, **given}
        threads = options["intra_op_num_threads"]
        if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= MAX_THREADS:
            raise BackendError(f"{self.name}: intra_op_num_threads={threads!r} must be an integer from 0 "
                               f"to {MAX_THREADS}")
        if not isinstance(options["allow_spinning"], bool):
            raise BackendError(f"{self.name}: allow_spinning={options['allow_spinning']!r} must be "
                               "true or false")
        return options

    def build(self, model: ir.Model, root: Path, options: dict[str, Any],
              feeds: Sequence[Feeds] | None = None) -> BuiltArtifact:
        config = {**self.options(options), "model": f"../{MODEL_FILE}",
                  "providers": self._providers_names()}
        out = root / self.name
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "session.json", config)
        return BuiltArtifact(self.name, root, [f"{self.name}/session.json"], config,
                             f"{self.name}/session.json")

    def _providers_names(self) -> list[str]:
        if self.provider == "CPUExecutionProvider":
            return ["CPUExecutionProvider"]
        return [self.provider, "CPUExecutionProvider"]

    def load(self, built: BuiltArtifact) -> Runner:
        if not self.available():
            raise BackendError(f"{self.name} is unavailable: {self.unavailable_reason()}")
        config = json.loads(built.entry_path.read_text())
        model_path = (built.entry_path.parent / config["model"]).resolve()
        providers: list = []
        for name in config["providers"]:
            if name == "CUDAExecutionProvider":
                providers.append((name, dict(config.get("cuda", {}))))
            else:
                providers.append(name)
        try:
            session = session_for(model_path, config, providers)
        except Exception as exc:  # onnxruntime's own exception types
            raise BackendError(f"{self.name}: onnxruntime cannot load {model_path}: {exc}") from exc
        return runner_for(session)


def _cuda_device_present() -> bool:
    return Path("/dev/nvidiactl").exists() or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


ORT_CPU = OrtBackend("ort-cpu", "CPUExecutionProvider", "onnxruntime, CPU execution provider")
ORT_CUDA = OrtBackend("ort-cuda", "CUDAExecutionProvider", "onnxruntime, CUDA execution provider")
