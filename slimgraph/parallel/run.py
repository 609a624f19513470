"""run: batch inference over a dataset, in one process or over Ray actors.

- Local (the default): one onnxruntime session, batches in order.
- ``workers=W``: data parallel over W Ray actors, each holding a session whose intra-op threads are
  its share of the CPUs (Ray leaves onnxruntime's thread pool alone, and W sessions each sized for
  the whole machine oversubscribe it).
- A partitioned artifact (``pipeline.json``): one Ray actor per stage, micro-batches in flight
  (GPipe's forward schedule: stage s works on micro-batch m while stage s+1 works on m-1), numpy
  passed between actors through Ray's object store by plain actor calls.

Actors restart when they die (``max_restarts``) and Ray retries their calls
(``max_task_retries``); results are kept by batch index, so a retried batch fills its own slot and
no sample is lost or written twice.

Everything is checked before a session or actor exists: a file named in a folder is read only if
it stays inside the folder and matches the sha256 in its manifest.json, models go through the
safe loader, pipeline.json's fields and wiring are typed and checked, the data against the inputs,
and the actor count against what the cluster can place. Outputs are written to a staged file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.artifact import MANIFEST, check_output_path, staged_file
from slimgraph.calibration import read_arrays
from slimgraph.errors import (
    BackendError,
    DataError,
    InputSpecError,
    ModelLoadError,
    PartitionError,
    SlimgraphError,
)

PIPELINE = "pipeline.json"
PIPELINE_FORMAT = "slimgraph-pipeline/1"
INSTALL_RAY = "pip install 'slimgraph[ray]'"
MAX_JSON_BYTES = 64 << 20  # pipeline.json, manifest.json
MAX_FILE_BYTES = 2**31 - 1  # protobuf's limit: no model file is larger
MIN_CPU_SHARE = 0.1  # an actor is a process holding a session: at most ten to a CPU
MAX_THREADS = 1024
IN_FLIGHT_PER_ACTOR = 2  # batches queued on each replica: one running, one waiting


@dataclasses.dataclass
class RunResult:
    out: Path | None
    outputs: dict[str, np.ndarray]
    samples: int
    seconds: float  # from the sessions (actors) being ready to the last output
    mode: str  # "local", "local pipeline", "ray replicas", "ray pipeline"
    actors: int
    setup_seconds: float = 0.0  # starting Ray, the actors and their sessions

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else float("nan")


@dataclasses.dataclass
class _Artifact:
    """What runs: one model, or the stages of a pipeline with their wiring."""

    inputs: list[tuple[str, np.dtype, list | None]]  # name, dtype, shape (None: a dynamic dim)
    outputs: list[str]
    models: list[bytes]
    stages: list[dict[str, Any]] | None  # pipeline stages: inputs, outputs, forward


def open_artifact(path: str | Path) -> _Artifact:
    """An export artifact directory, a partition directory, or an .onnx file; every file read from
    a directory stays inside it and matches the sha256 its manifest.json lists."""
    path = Path(path)
    if path.is_dir() and _present(path / PIPELINE):
        return _open_partition(path)
    if path.is_dir() and _present(path / MANIFEST):
        from slimgraph.backends.ort import MODEL_FILE

        file, data = verified_file(path, MODEL_FILE, read_manifest(path, ModelLoadError)["files"],
                                   ModelLoadError)
        model = _safe_model(file)
        return _Artifact(_model_inputs(model, file), _model_outputs(model), [data], None)
    if not path.is_file():
        raise InputSpecError(f"{path}: not an artifact directory (manifest.json or pipeline.json) "
                             "or an .onnx file")
    model = _safe_model(path)
    return _Artifact(_model_inputs(model, path), _model_outputs(model), [path.read_bytes()], None)


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _open_partition(root: Path) -> _Artifact:
    hashes = read_manifest(root, PartitionError)["files"]
    where = root / PIPELINE
    pipeline = _parse_json(where, verified_file(root, PIPELINE, hashes, PartitionError)[1],
                           PartitionError)
    check_pipeline(where, pipeline)
    models, loaded = [], []
    for stage in pipeline["stages"]:
        file, data = verified_file(root, stage["file"], hashes, PartitionError)
        models.append(data)
        loaded.append((file, _safe_model(file)))
    inputs: dict[str, tuple[str, np.dtype, list | None]] = {}
    for file, model in loaded:
        for value in _model_inputs(model, file):
            if value[0] in pipeline["inputs"]:
                inputs.setdefault(value[0], value)
    if unused := [n for n in pipeline["inputs"] if n not in inputs]:
        raise PartitionError(f"{where}: inputs {unused} are taken by no stage")
    _check_wiring(where, pipeline, [m for _, m in loaded])
    return _Artifact([inputs[n] for n in dict.fromkeys(pipeline["inputs"])], pipeline["outputs"],
                     models, pipeline["stages"])


def file_inside(root: Path, name: str, error: type[SlimgraphError]) -> Path:
    """``root / name`` resolved, refused unless ``name`` is a relative path that stays inside
    ``root`` (no absolute path, no ``..``, no symlink leading out) and names a regular file."""
    pure = PurePosixPath(name)
    if not name or "\x00" in name or "\\" in name or pure.is_absolute() or ".." in pure.parts:
        raise error(f"{root}: {name!r} is not a relative path inside the folder")
    candidate = root / pure
    try:
        resolved = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise error(f"{candidate}: no such file in the folder") from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise error(f"{candidate}: cannot be resolved ({exc})") from None
    if not resolved.is_relative_to(root.resolve()):
        raise error(f"{candidate}: resolves to {resolved}, outside the folder {root}")
    if not resolved.is_file():
        raise error(f"{candidate}: not a regular file")
    return resolved


def verified_file(root: Path, name: str, hashes: dict[str, str],
                  error: type[SlimgraphError]) -> tuple[Path, bytes]:
    """The path and bytes of the file ``name`` inside ``root``, refused unless ``hashes`` (the
    manifest's table) lists it with the sha256 of exactly these bytes."""
    path = file_inside(root, name, error)
    key = PurePosixPath(name).as_posix()
    if key not in hashes:
        raise error(f"{root / key}: not listed in {root / MANIFEST}, so its hash cannot be checked")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise error(f"{root / key}: larger than {MAX_FILE_BYTES} bytes, beyond any file a "
                    "partition or artifact holds")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"{root / key}: cannot be read ({exc.strerror})") from None
    if hashlib.sha256(data).hexdigest() != hashes[key]:
        raise error(f"{root / key}: sha256 does not match {root / MANIFEST}; the file was changed "
                    "or damaged after it was written")
    return path, data


def read_manifest(root: Path, error: type[SlimgraphError]) -> dict[str, Any]:
    """``root``'s manifest.json as an object whose ``files`` maps relative paths to sha256."""
    path = file_inside(root, MANIFEST, error)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise error(f"{root / MANIFEST}: larger than {MAX_JSON_BYTES} bytes")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"{root / MANIFEST}: cannot be read ({exc.strerror})") from None
    manifest = _parse_json(root / MANIFEST, data, error)
    if not isinstance(manifest, dict):
        raise error(f"{root / MANIFEST}: expected a JSON object, got {type(manifest).__name__}")
    files = manifest.get("files")
    if not (isinstance(files, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())):
        raise error(f"{root / MANIFEST}: 'files' must map each file's relative path to its sha256")
    return manifest


def _parse_json(where: Path, data: bytes, error: type[SlimgraphError]) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise error(f"{where}: not valid JSON ({_first_line(exc)})") from None


def check_pipeline(where: Path, pipeline: Any) -> None:
    """The fields of pipeline.json that ``run`` uses, with their types: the format tag, the input
    and output names, and each stage's file and value names."""
    if not isinstance(pipeline, dict):
        raise PartitionError(f"{where}: expected a JSON object, got {type(pipeline).__name__}")
    if pipeline.get("format") != PIPELINE_FORMAT:
        raise PartitionError(f"{where}: 'format' is {pipeline.get('format')!r}, expected "
                             f"{PIPELINE_FORMAT!r}")
    _check_names(where, pipeline, "inputs", "")
    _check_names(where, pipeline, "outputs", "")
    stages = pipeline.get("stages")
    if not isinstance(stages, list) or not stages:
        raise PartitionError(f"{where}: 'stages' must be a non-empty list")
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise PartitionError(f"{where}: stages[{i}] must be an object")
        if not isinstance(stage.get("file"), str):
            raise PartitionError(f"{where}: stages[{i}].file must be a string")
        for key in ("inputs", "outputs", "forward"):
            _check_names(where, stage, key, f"stages[{i}].")


def _check_names(where: Path, entry: dict[str, Any], key: str, prefix: str) -> None:
    names = entry.get(key)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise PartitionError(f"{where}: {prefix}{key} must be a list of value names (strings)")
    if not names and key != "forward":
        raise PartitionError(f"{where}: {prefix}{key} is empty")


def _check_wiring(where: Path, pipeline: dict[str, Any], models: list[ir.Model]) -> None:
    """Every value a stage takes or forwards reaches it (the first from the pipeline's inputs),
    every output it names is one of its model's, and the pipeline's outputs come out of the last
    stage."""
    env = set(pipeline["inputs"])
    for i, (stage, model) in enumerate(zip(pipeline["stages"], models, strict=True)):
        takes = [n for n, _, _ in _model_inputs(model, where)]
        if missing := sorted(set(takes + stage["forward"]) - env):
            raise PartitionError(f"{where}: stages[{i}] needs {missing}, which no earlier stage "
                                 "passes on")
        if unknown := sorted(set(stage["outputs"]) - set(_model_outputs(model))):
            raise PartitionError(f"{where}: stages[{i}].outputs names {unknown}, which its model "
                                 f"{stage['file']} does not produce")
        env = set(stage["forward"]) | set(stage["outputs"])
    if missing := sorted(set(pipeline["outputs"]) - env):
        raise PartitionError(f"{where}: outputs {missing} do not come out of the last stage")


def _safe_model(path: Path) -> ir.Model:
    """The model at ``path`` through the safe loader, refused when it keeps tensors in external
    files: ``run`` hands sessions the bytes, and onnxruntime would look for those files
    relative to the working directory."""
    from slimgraph.frontend.onnx_file import load_onnx

    model = load_onnx(path)
    if external := _external_tensors(model):
        raise ModelLoadError(f"{path}: tensors {external[:3]} are stored in external data files; "
                             "run takes models with their weights inline")
    return model


def _external_tensors(model: ir.Model) -> list[str]:
    graphs = [*model.graphs(), *model.functions.values()]
    tensors = [v.const_value for g in model.graphs() for v in g.initializers.values()]
    for attr in (a for g in graphs for node in g for a in node.attributes.values()):
        if isinstance(attr, ir.Attr) and attr.type == ir.AttributeType.TENSOR:
            tensors.append(attr.value)
        elif isinstance(attr, ir.Attr) and attr.type == ir.AttributeType.TENSORS:
            tensors.extend(attr.value)
    return [t.name for t in tensors if isinstance(t, ir.ExternalTensor)]


def _model_inputs(model: ir.Model, where: Path) -> list[tuple[str, np.dtype, list | None]]:
    """(name, numpy dtype, shape or None) of each input that is not an initializer."""
    out = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if not isinstance(value.type, ir.TensorType):
            raise ModelLoadError(f"{where}: input {value.name!r} is {value.type}; run feeds tensors")
        try:
            dtype = np.dtype(value.dtype.numpy())
        except (TypeError, ValueError, NotImplementedError) as exc:
            raise ModelLoadError(f"{where}: input {value.name!r} has type {value.dtype}, which "
                                 f"numpy arrays cannot hold ({_first_line(exc)})") from None
        shape = None if value.shape is None else [d if isinstance(d, int) else None
                                                 for d in value.shape]
        out.append((value.name, dtype, shape))
    return out


def _model_outputs(model: ir.Model) -> list[str]:
    return [v.name for v in model.graph.outputs]


def load_data(data: str | Path | dict[str, np.ndarray], artifact: _Artifact) -> dict[str, np.ndarray]:
    """The dataset's arrays, checked against the model's inputs: every input present by name, no
    array the model does not take, one sample count (at least one), matching dtype kind and
    static dims, integers in the input type's range, and floats finite."""
    arrays = read_arrays(data) if isinstance(data, (str, Path)) else dict(data)
    where = str(data) if isinstance(data, (str, Path)) else "data"
    if odd := sorted(n for n, a in arrays.items() if not isinstance(a, np.ndarray)):
        raise DataError(f"{where}: {odd} are not numpy arrays (.npy members)")
    names = [n for n, _, _ in artifact.inputs]
    missing = [n for n in names if n not in arrays]
    extra = sorted(set(arrays) - set(names))
    if missing or extra:
        raise InputSpecError(f"{where}: arrays {sorted(arrays)} do not match the model's inputs "
                             f"{names}" + (f"; missing {missing}" if missing else "")
                             + (f"; not inputs {extra}" if extra else ""))
    counts = {n: arrays[n].shape[0] if arrays[n].ndim else None for n in names}
    if len(set(counts.values())) != 1 or None in counts.values():
        raise DataError(f"{where}: every array needs the same number of samples on axis 0, "
                        f"got {counts}")
    if not next(iter(counts.values())):
        raise DataError(f"{where}: no samples (axis 0 of every array is 0)")
    return {name: _input_array(where, name, arrays[name], dtype, shape)
            for name, dtype, shape in artifact.inputs}


def _input_array(where: str, name: str, a: np.ndarray, dtype: np.dtype,
                 shape: list | None) -> np.ndarray:
    if dtype.kind != a.dtype.kind and not (dtype.kind in "iu" and a.dtype.kind in "iu"):
        raise InputSpecError(f"{where}: {name!r} is {a.dtype}, the model takes {dtype}")
    if shape is not None and (len(shape) != a.ndim or any(
            d is not None and d != s for d, s in zip(shape[1:], a.shape[1:], strict=True))):
        raise InputSpecError(f"{where}: {name!r} has shape {list(a.shape)}, the model takes "
                             f"{['N' if d is None else d for d in shape]}")
    if dtype.kind in "iu" and a.size:
        info = np.iinfo(dtype)
        if a.min() < info.min or a.max() > info.max:
            raise DataError(f"{where}: {name!r} holds values outside {dtype}'s range "
                            f"[{info.min}, {info.max}]")
    with np.errstate(over="ignore"):
        a = a.astype(dtype, copy=False)
    if dtype.kind in "fc" and not np.isfinite(a).all():
        raise DataError(f"{where}: {name!r} holds {int(np.size(a) - np.isfinite(a).sum())} "
                        f"NaN or infinite values (as {dtype})")
    return a


def check_run_options(batch: int, workers: int | None, threads: int | None) -> None:
    for flag, value in (("--batch", batch), ("--workers", workers), ("--threads", threads)):
        if value is not None and value < 1:
            raise InputSpecError(f"run: {flag} must be >= 1, got {value}")
    check_threads("run", threads)


def check_threads(command: str, threads: int | None) -> None:
    """Each thread is created when the session starts: refuse counts no machine has cores for."""
    if threads is not None and threads > MAX_THREADS:
        raise InputSpecError(f"{command}: --threads {threads} is more than {MAX_THREADS} intra-op "
                             "threads per session")


def check_batch(where: str | Path, artifact: _Artifact, batch: int, samples: int) -> None:
    """A model with a fixed batch dimension takes batches of exactly that size."""
    for name, _, shape in artifact.inputs:
        fixed = shape[0] if shape else None
        if fixed is not None and (batch != fixed or samples % fixed):
            raise InputSpecError(f"{where}: input {name!r} takes batches of exactly {fixed}; "
                                 f"pass --batch {fixed} and a multiple of {fixed} samples (got "
                                 f"--batch {batch}, {samples} samples)")


def save_outputs(out: str | Path, outputs: dict[str, np.ndarray], force: bool = False) -> None:
    """Write the .npz through a temporary sibling renamed into place: never half-written. The
    zip is written member by member (as np.savez does), so no output name can collide with
    np.savez's own keyword arguments."""
    with staged_file(out, force=force) as tmp, zipfile.ZipFile(tmp, "w") as npz:
        for name, array in outputs.items():
            with npz.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()),
                type(exc).__name__)


def _batches(arrays: dict[str, np.ndarray], batch: int) -> list[dict[str, np.ndarray]]:
    n = next(iter(arrays.values())).shape[0]
    return [{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, n, batch)]


class StageRunner:
    """One session (a whole model or a pipeline stage) and the env it passes on."""

    def __init__(self, model: bytes, threads: int, stage: dict[str, Any] | None = None) -> None:
        from slimgraph.backends.ort import session_for

        self.session = session_for(model, {"intra_op_num_threads": threads,
                                           "allow_spinning": False})
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = stage["outputs"] if stage else [o.name for o in self.session.get_outputs()]
        self.forward = stage["forward"] if stage else []

    def run(self, env: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        got = self.session.run(self.outputs, {k: env[k] for k in self.inputs})
        return {k: env[k] for k in self.forward} | dict(zip(self.outputs, got, strict=True))

    def pid(self) -> int:
        return os.getpid()


def run(artifact: str | Path, data: str | Path | dict[str, np.ndarray], out: str | Path | None = None,
        *, batch: int = 16, workers: int | None = None, ray_address: str | None = None,
        local: bool = False, threads: int | None = None, progress: bool = False,
        force: bool = False, on_result: Callable[[int, list], None] | None = None) -> RunResult:
    """Run ARTIFACT over DATA (an .npz of arrays named after the inputs, samples on axis 0) and
    write the outputs, in input order, to OUT (.npz). See the module docstring for the modes.

    ``threads`` is the intra-op threads of each session (default: all cores locally, the CPU share
    of each actor under Ray). ``on_result(done, actors)`` is called after every finished batch
    (tests use it to kill an actor mid-run)."""
    check_run_options(batch, workers, threads)
    if out is not None and Path(out).parent.is_dir():  # a missing folder is made only on success
        check_output_path(out, force=force, kind="output file")
    art = open_artifact(artifact)
    arrays = load_data(data, art)
    samples = next(iter(arrays.values())).shape[0]
    check_batch(artifact, art, batch, samples)
    batches = _batches(arrays, batch)
    use_ray = workers is not None or ray_address is not None or (art.stages and not local)
    if art.stages is None and workers is None and ray_address is not None:
        workers = 1
    if use_ray and art.stages is not None and workers is not None:
        raise InputSpecError("run: a partitioned artifact runs one actor per stage; --workers "
                             "applies to a single model")
    bar = _progress(samples, progress)
    start = time.perf_counter()
    try:
        if use_ray:
            results, actors, ready, mode = _on_ray(ray_address, art, batches, workers, threads,
                                                   bar, on_result)
        else:
            results, ready = _local(artifact, art, batches, threads, bar)
            mode, actors = ("local pipeline" if art.stages else "local"), 0
    finally:
        bar.close()
    seconds = time.perf_counter() - ready
    outputs = {name: np.concatenate([r[name] for r in results]) for name in art.outputs}
    if out is not None:
        save_outputs(out, outputs, force)
    return RunResult(Path(out) if out is not None else None, outputs, samples, seconds, mode, actors,
                     round(ready - start, 3))


def _local(where: str | Path, art: _Artifact, batches: list, threads: int | None,
           bar) -> tuple[list, float]:
    """The batches in order through one session per model (or stage), in this process."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    try:
        runners = [StageRunner(m, threads or os.cpu_count() or 1, s)
                   for m, s in zip(art.models, art.stages or [None], strict=True)]
        results, ready = [], time.perf_counter()
        for b in batches:
            env = b
            for r in runners:
                env = r.run(env)
            results.append(env)
            bar.update(next(iter(b.values())).shape[0])
    except (state.EPFail, state.Fail, state.InvalidArgument, state.InvalidGraph,
            state.NotImplemented, state.RuntimeException) as exc:
        raise BackendError(f"{where}: onnxruntime cannot run it: {_first_line(exc)}") from exc
    return results, ready


def _on_ray(address: str | None, art: _Artifact, batches: list, workers: int | None,
            threads: int | None, bar, on_result) -> tuple[list, int, float, str]:
    """Start or join Ray, run the replicas or the pipeline, and disconnect on every way out;
    a local Ray is not even started for actors that could never all be placed on it."""
    ray = _ray(address)
    joined = address is not None  # _ray connected this process: disconnect when done
    started = not ray.is_initialized()
    if started:
        actor_share([float(os.cpu_count() or 1)], *_actors(art, workers))
    try:
        if started:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        if art.stages is not None:
            return *_ray_pipeline(ray, art, batches, threads, bar, on_result), "ray pipeline"
        return (*_ray_replicas(ray, art, batches, workers or 1, threads, bar, on_result),
                "ray replicas")
    except ray.exceptions.RayError as exc:
        raise BackendError(f"run: a Ray actor failed: "
                           f"{_first_line(getattr(exc, 'cause', None) or exc)}") from exc
    finally:
        if started or joined:
            ray.shutdown()  # leaves the cluster itself running


class _NoBar:
    def update(self, _n: int) -> None:
        pass

    def close(self) -> None:
        pass


class _Bar:
    """Samples done, on the project's progress bar."""

    def __init__(self, total: int) -> None:
        from slimgraph.progress import progress_bar

        self.progress = progress_bar("run", "samples")
        self.progress.start()
        self.task = self.progress.add_task("run", total=total)

    def update(self, n: int) -> None:
        self.progress.advance(self.task, n)

    def close(self) -> None:
        self.progress.stop()


def _progress(total: int, enabled: bool) -> _Bar | _NoBar:
    return _Bar(total) if enabled else _NoBar()


def _ray(address: str | None):
    """The ray module, connected to ``address`` ("auto" or HOST:PORT) when one is given."""
    try:
        import ray
    except ImportError as exc:
        raise InputSpecError(f"run: Ray is not installed; `{INSTALL_RAY}` for --workers, --ray "
                             "and partitioned artifacts (or --local to run the stages in order "
                             "in one process)") from exc
    if address is None:
        return ray
    if address != "auto":
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise InputSpecError(f"run: --ray {address!r}: expected auto or HOST:PORT")
        try:
            socket.create_connection((host.removeprefix("ray://"), int(port)), timeout=3).close()
        except OSError as exc:
            raise InputSpecError(f"run: cannot reach a Ray cluster at {address}: {exc}") from exc
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InputSpecError(f"run: cannot join the Ray cluster at {address}: {exc}"
                             f"{_auth_hint(exc)}") from exc
    return ray


def _auth_hint(exc: BaseException) -> str:
    """Ray's own reason when the head refused the driver's credentials. A head started with
    token authentication refuses a driver without its token until Ray's connect budget (about
    20 s) runs out, then ray.init raises a bare "Failed to connect"; the AuthenticationError that
    says which token is missing is only in the traceback text of the exception's cause."""
    cause = exc.__cause__ or exc.__context__
    marker = "AuthenticationError: "
    while cause is not None:
        text = str(cause)
        if marker in text:
            reason = text[text.index(marker) + len(marker):].strip().splitlines()[0]
            return f"; the cluster refused this driver's credentials: {reason}"
        cause = cause.__cause__ or cause.__context__
    return ""


def _cpu_share(ray, art: _Artifact, workers: int | None) -> float:
    """The CPUs each actor can ask for and still all be placed on the cluster's alive nodes (a
    fraction when they outnumber the CPUs); InputSpecError when they cannot all be placed."""
    nodes = [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    if not any(nodes):
        nodes = [float(ray.cluster_resources().get("CPU", 0))]
    return actor_share(nodes, *_actors(art, workers))


def _actors(art: _Artifact, workers: int | None) -> tuple[int, str]:
    """How many actors the run asks for, and what asked for them."""
    if art.stages is not None:
        return len(art.models), f"a pipeline of {len(art.models)} stages (an actor each)"
    return workers or 1, f"--workers {workers or 1}"


def actor_share(node_cpus: list[float], actors: int, what: str) -> float:
    """``placeable_share``, or InputSpecError (before any actor exists) saying how many actors
    the nodes can hold."""
    share = placeable_share(node_cpus, actors)
    if share is None:
        most = sum(int(c / MIN_CPU_SHARE + 1e-9) for c in node_cpus if c > 0)
        raise InputSpecError(f"run: {what}: the Ray cluster's {sum(node_cpus):g} CPUs hold at "
                             f"most {most} actors ({MIN_CPU_SHARE} CPU each at least); ask for "
                             "fewer")
    return share


def placeable_share(node_cpus: list[float], actors: int) -> float | None:
    """The largest CPU count ``s`` (at least MIN_CPU_SHARE) such that ``actors`` actors of ``s``
    CPUs each fit on nodes with ``node_cpus`` CPUs (none split across nodes); None when none
    does. The whole cluster divided by the actors is not it: 3 nodes of 2 CPUs hold 3 CPUs per
    actor for 2 actors on paper, but no node holds 3, and actors that cannot be placed wait
    forever. The answer is some node's CPUs / k for a count k of actors on it, so those (down
    to MIN_CPU_SHARE) are the candidates."""
    def fits(share: float) -> bool:
        return sum(int(c / share + 1e-9) for c in node_cpus if c > 0) >= actors

    if actors < 1 or not fits(MIN_CPU_SHARE):
        return None
    candidates = sorted({c / k for c in node_cpus if c > 0
                         for k in range(1, min(actors, int(c / MIN_CPU_SHARE + 1e-9)) + 1)},
                        reverse=True)
    return next((s for s in candidates if fits(s)), MIN_CPU_SHARE)


def _actor_class(ray, cpus: float):
    return ray.remote(num_cpus=cpus, max_restarts=-1, max_task_retries=-1)(StageRunner)


def _ray_replicas(ray, art: _Artifact, batches: list, workers: int, threads: int | None, bar,
                  on_result) -> tuple[list, int, float]:
    """Batches over ``workers`` replicas, each in its own slot. Hand-written rather than
    ray.util.ActorPool: the pool keeps one task per actor (here two, so a replica never idles
    between batches) and returns no batch index to check a retried task against."""
    model = ray.put(art.models[0])
    share = _cpu_share(ray, art, workers)
    threads = threads or max(1, int(share))
    actors = [_actor_class(ray, share).remote(model, threads) for _ in range(workers)]
    ray.get([a.pid.remote() for a in actors])  # sessions loaded: the timed part starts
    ready = time.perf_counter()
    results: list[dict | None] = [None] * len(batches)
    pending: dict[Any, tuple[int, Any]] = {}  # ref -> (batch index, actor)
    queue = list(range(len(batches)))[::-1]

    def submit(actor) -> None:
        i = queue.pop()
        pending[actor.run.remote(batches[i])] = (i, actor)

    for _ in range(IN_FLIGHT_PER_ACTOR):
        for actor in actors:
            if queue:
                submit(actor)
    done = 0
    while pending:
        _, actor = _collect(ray, pending, results, batches, bar)
        done += 1
        if on_result:
            on_result(done, actors)
        if queue:
            submit(actor)
    return results, len(actors), ready


def _collect(ray, pending: dict[Any, tuple[int, Any]], results: list, batches: list,
             bar) -> tuple[int, Any]:
    """Wait for the next finished batch, put it in its own slot (a second arrival is an error),
    advance the bar; return what ``pending`` held for it: (batch index, its actor or None)."""
    (ref,), _ = ray.wait(list(pending), num_returns=1)
    held = pending.pop(ref)
    i = held[0]
    if results[i] is not None:
        raise RuntimeError(f"batch {i} came back twice")
    results[i] = ray.get(ref)
    bar.update(next(iter(batches[i].values())).shape[0])
    return held


def _ray_pipeline(ray, art: _Artifact, batches: list, threads: int | None, bar,
                  on_result) -> tuple[list, int, float]:
    share = _cpu_share(ray, art, None)
    threads = threads or max(1, int(share))
    actors = [_actor_class(ray, share).remote(ray.put(m), threads, s)
              for m, s in zip(art.models, art.stages, strict=True)]
    ray.get([a.pid.remote() for a in actors])
    ready = time.perf_counter()
    limit = len(actors) + 1  # micro-batches in flight: enough to fill every stage
    results: list[dict | None] = [None] * len(batches)
    pending: dict[Any, tuple[int, None]] = {}  # ref -> (micro-batch index, no one actor)
    done, nxt = 0, 0
    while nxt < len(batches) or pending:
        while nxt < len(batches) and len(pending) < limit:
            ref = batches[nxt]
            for actor in actors:
                ref = actor.run.remote(ref)
            pending[ref] = (nxt, None)
            nxt += 1
        _collect(ray, pending, results, batches, bar)
        done += 1
        if on_result:
            on_result(done, actors)
    return results, len(actors), ready
