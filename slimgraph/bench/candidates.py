"""What a bench run times: a runner per (variant, backend), built by slimgraph's export, by
onnxruntime's own quantizers, or as a torch peer, with what it cost to build."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimgraph.backends import BACKENDS
from slimgraph.backends.ort import OrtBackend, runner_for, session_for
from slimgraph.bench.results import FP32, Row
from slimgraph.export import export
from slimgraph.frontend import LoadedModel
from slimgraph.verify import Runner


@dataclasses.dataclass
class _Candidate:
    """Something to time: a runner for one (variant, backend), plus what it cost to build."""

    variant: str
    backend: str
    runner: Runner
    build_s: float
    artifact_bytes: int | None
    peer: bool = False
    # An export dir, a bare .onnx file (onnxruntime's quantizers), or for torch peers the
    # "builtin:NAME" / "torch:package.module:callable" the probe process rebuilds the module from.
    artifact_dir: Path | str | None = None
    make_worker: Callable[[int], Runner] | None = None  # a fresh runner with N threads


def _backend_options(backend_name: str, threads: int) -> dict[str, Any]:
    """Options that make a backend share the machine fairly with the other candidates."""
    if isinstance(BACKENDS.get(backend_name), OrtBackend):
        # Interleaved sessions must not spin: idle spinning threads steal the cores.
        return {"intra_op_num_threads": threads, "allow_spinning": False}
    if backend_name.startswith("tvm"):
        return {"threads": threads}
    return {}


def _build_variant(loaded, variant, pipeline, usable, threads, dest, rows, batches):
    specs = []
    for backend in usable:
        opts = ",".join(f"{k}={v}" for k, v in _backend_options(backend.name, threads).items())
        specs.append(f"{backend.name}:{opts}" if opts else backend.name)
    try:
        result = export(loaded, dest, passes=pipeline, backends=specs, allow_mismatch=True)
    except Exception as exc:  # a variant that cannot be built is a row, not a crash
        for backend in usable:
            for batch in batches:
                rows.append(Row(variant, backend.name, batch, "failed",
                                f"{type(exc).__name__}: {exc}"))
        return []
    pass_s = result.timings.get("passes", 0.0)
    candidates = []
    for backend in usable:
        built = result.built[backend.name]
        size = sum((dest / f).stat().st_size for f in result.manifest["backends"][backend.name]
                   ["files"])
        make_worker = None
        if isinstance(backend, OrtBackend) and backend.provider == "CPUExecutionProvider":
            model_path = dest / "model.onnx"

            def make_worker(n: int, model_path: Path = model_path) -> Runner:
                return runner_for(session_for(model_path, {"intra_op_num_threads": n,
                                                           "allow_spinning": False}))
        candidates.append(_Candidate(
            variant, backend.name, backend.load(built),
            pass_s + result.timings.get(f"build {backend.name}", 0.0), size,
            artifact_dir=dest, make_worker=make_worker,
        ))
    return candidates


def _ort_quantizer_peers(fp32_onnx: Path, loaded: LoadedModel, threads: int, work: Path,
                         rows: list[Row], batches) -> list[_Candidate]:
    """onnxruntime's own quantize_dynamic and quantize_static, the peers int8 rows must beat."""
    from slimgraph.bench.peers import ort_quantize

    candidates = []
    for kind in ("quantize_dynamic", "quantize_static"):
        name = f"ort-{kind}"
        try:
            t0 = time.perf_counter()
            path = ort_quantize(kind, fp32_onnx, work / f"{name}.onnx", loaded)
            build_s = time.perf_counter() - t0
            session = session_for(path, {"intra_op_num_threads": threads, "allow_spinning": False})
        except Exception as exc:  # the peer's own failure is a finding, recorded as a row
            for batch in batches:
                rows.append(Row(name, "ort-cpu", batch, "failed", f"{type(exc).__name__}: {exc}",
                                peer=True))
            continue

        def make_worker(n: int, path: Path = path) -> Runner:
            return runner_for(session_for(path, {"intra_op_num_threads": n,
                                                 "allow_spinning": False}))

        candidates.append(_Candidate(name, "ort-cpu", runner_for(session), build_s,
                                     path.stat().st_size, peer=True, artifact_dir=path,
                                     make_worker=make_worker))
    return candidates


def _torch_peer(peer: str, loaded: LoadedModel, threads: int, rows: list[Row],
                batches) -> list[_Candidate]:
    from slimgraph.bench.peers import torch_runner

    try:
        t0 = time.perf_counter()
        runner = torch_runner(loaded, threads, compiled=peer == "torch-compile")
        build_s = time.perf_counter() - t0
    except Exception as exc:  # torch.compile does not work everywhere; say why, keep going
        for batch in batches:
            rows.append(Row(FP32, peer, batch, "skipped", f"{type(exc).__name__}: {exc}",
                            peer=True))
        return []
    weight_bytes = sum(t.numel() * t.element_size() for t in loaded.module.state_dict().values())
    source = loaded.source
    rebuild = f"{source['kind']}:{source['name']}" if source["kind"] in ("builtin", "torch") else None
    return [_Candidate(FP32, peer, runner, build_s, weight_bytes, peer=True,
                       artifact_dir=rebuild)]
