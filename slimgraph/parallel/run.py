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
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from slimgraph.artifact import MANIFEST
from slimgraph.errors import InputSpecError, OutputExistsError

PIPELINE = "pipeline.json"
INSTALL_RAY = "pip install 'slimgraph[ray]'"
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

    inputs: list[tuple[str, str, list]]  # (name, numpy dtype, shape with None for dynamic dims)
    outputs: list[str]
    models: list[bytes]
    stages: list[dict[str, Any]] | None  # pipeline stages: inputs, outputs, forward


def open_artifact(path: str | Path) -> _Artifact:
    """An export artifact directory, a partition directory, or an .onnx file."""
    import onnx

    path = Path(path)
    if path.is_dir() and (path / PIPELINE).exists():
        pipeline = json.loads((path / PIPELINE).read_text())
        models = [(path / s["file"]).read_bytes() for s in pipeline["stages"]]
        first = _model_inputs(models[0])
        given = {name for name, _, _ in first}
        more = [i for m in models[1:] for i in _model_inputs(m)
                if i[0] in pipeline["inputs"] and i[0] not in given]
        return _Artifact(first + more, pipeline["outputs"], models, pipeline["stages"])
    if path.is_dir() and (path / MANIFEST).exists():
        path = path / "model.onnx"
    if not path.is_file():
        raise InputSpecError(f"{path}: not an artifact directory (manifest.json or pipeline.json) "
                             "or an .onnx file")
    data = path.read_bytes()
    proto = onnx.load_model_from_string(data)
    return _Artifact(_model_inputs(data), [o.name for o in proto.graph.output], [data], None)


def _model_inputs(model: bytes) -> list[tuple[str, str, list]]:
    import onnx

    proto = onnx.load_model_from_string(model)
    init = {i.name for i in proto.graph.initializer}
    out = []
    for value in proto.graph.input:
        if value.name in init:
            continue
        t = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        shape = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        out.append((value.name, np.dtype(dtype).name, shape))
    return out


def load_data(data: str | Path | dict[str, np.ndarray], artifact: _Artifact) -> dict[str, np.ndarray]:
    """The dataset's arrays, checked against the model's inputs: every input present by name, no
    array the model does not take, one sample count, matching dtype kind and static dims."""
    if isinstance(data, (str, Path)):
        try:
            with np.load(data, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise InputSpecError(f"{data}: cannot read as an .npz of arrays: {exc}") from exc
    else:
        arrays = dict(data)
    where = str(data) if isinstance(data, (str, Path)) else "data"
    names = [n for n, _, _ in artifact.inputs]
    missing = [n for n in names if n not in arrays]
    extra = sorted(set(arrays) - set(names))
    if missing or extra:
        raise InputSpecError(f"{where}: arrays {sorted(arrays)} do not match the model's inputs "
                             f"{names}" + (f"; missing {missing}" if missing else "")
                             + (f"; not inputs {extra}" if extra else ""))
    counts = {n: arrays[n].shape[0] if arrays[n].ndim else None for n in names}
    if len(set(counts.values())) != 1 or None in counts.values():
        raise InputSpecError(f"{where}: every array needs the same number of samples on axis 0, "
                             f"got {counts}")
    out = {}
    for name, dtype, shape in artifact.inputs:
        a = arrays[name]
        if np.dtype(dtype).kind != a.dtype.kind and not (
                np.dtype(dtype).kind in "iu" and a.dtype.kind in "iu"):
            raise InputSpecError(f"{where}: {name!r} is {a.dtype}, the model takes {dtype}")
        if len(shape) != a.ndim or any(d is not None and d != s
                                       for d, s in zip(shape[1:], a.shape[1:], strict=True)):
            raise InputSpecError(f"{where}: {name!r} has shape {list(a.shape)}, the model takes "
                                 f"{['N' if d is None else d for d in shape]}")
        out[name] = a.astype(dtype, copy=False)
    return out


def check_out(out: str | Path | None, force: bool) -> None:
    if out is not None and Path(out).exists() and not force:
        raise OutputExistsError(f"{out}: exists; pass --force to replace it")


def save_outputs(out: str | Path, outputs: dict[str, np.ndarray]) -> None:
    """Write the .npz next to ``out`` and rename it into place: never half-written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".npz", dir=out.parent)
    os.close(fd)
    try:
        np.savez(tmp, **outputs)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    if batch < 1:
        raise InputSpecError(f"run: --batch must be >= 1, got {batch}")
    if workers is not None and workers < 1:
        raise InputSpecError(f"run: --workers must be >= 1, got {workers}")
    check_out(out, force)
    art = open_artifact(artifact)
    arrays = load_data(data, art)
    batches = _batches(arrays, batch)
    samples = next(iter(arrays.values())).shape[0]
    use_ray = workers is not None or ray_address is not None or (art.stages and not local)
    if art.stages is None and workers is None and ray_address is not None:
        workers = 1
    if use_ray and art.stages is not None and workers is not None:
        raise InputSpecError("run: a partitioned artifact runs one actor per stage; --workers "
                             "applies to a single model")
    bar = _progress(samples, progress)
    start = time.perf_counter()
    if use_ray:
        ray = _ray(ray_address)
        joined = ray_address is not None  # _ray connected this process: disconnect when done
        started = not ray.is_initialized()
        try:
            if started:
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            if art.stages is not None:
                results, actors, ready = _ray_pipeline(ray, art, batches, threads, bar,
                                                       on_result)
                mode = "ray pipeline"
            else:
                results, actors, ready = _ray_replicas(ray, art, batches, workers or 1,
                                                       threads, bar, on_result)
                mode = "ray replicas"
        finally:
            if started or joined:
                ray.shutdown()  # leaves the cluster itself running
    else:
        runners = [StageRunner(m, threads or os.cpu_count() or 1, s)
                   for m, s in zip(art.models, art.stages or [None], strict=True)]
        results, ready = [], time.perf_counter()
        for b in batches:
            env = b
            for r in runners:
                env = r.run(env)
            results.append(env)
            bar.update(next(iter(b.values())).shape[0])
        mode, actors = ("local pipeline" if art.stages else "local"), 0
    seconds = time.perf_counter() - ready
    bar.close()
    outputs = {name: np.concatenate([r[name] for r in results]) for name in art.outputs}
    if out is not None:
        save_outputs(out, outputs)
    return RunResult(Path(out) if out is not None else None, outputs, samples, seconds, mode, actors,
                     round(ready - start, 3))


class _NoBar:
    def update(self, _n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety; runs go on without it
        return _NoBar()
    return tqdm(total=total, unit="sample", disable=not enabled, file=sys.stderr, leave=False)


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


def _cpu_share(ray, actors: int) -> float:
    """The CPUs each of ``actors`` equal actors can ask for and still all be placed on the
    cluster's alive nodes (a fraction when they outnumber the CPUs)."""
    nodes = [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    if not any(nodes):
        nodes = [float(ray.cluster_resources().get("CPU", 1))]
    return placeable_share(nodes, actors)


def placeable_share(node_cpus: list[float], actors: int) -> float:
    """The largest CPU count ``s`` such that ``actors`` actors of ``s`` CPUs each fit on nodes
    with ``node_cpus`` CPUs (none split across nodes). The whole cluster divided by the actors
    is not it: 3 nodes of 2 CPUs hold 3 CPUs per actor for 2 actors on paper, but no node holds
    3, and actors that cannot be placed wait forever. The answer is some node's CPUs / k for a
    count k of actors on it, so those are the candidates."""
    def fits(share: float) -> bool:
        return sum(int(c / share + 1e-9) for c in node_cpus) >= actors

    candidates = sorted({c / k for c in node_cpus if c > 0 for k in range(1, actors + 1)},
                        reverse=True)
    return max(0.01, next((s for s in candidates if fits(s)), 0.01))


def _actor_class(ray, cpus: float):
    return ray.remote(num_cpus=cpus, max_restarts=-1, max_task_retries=-1)(StageRunner)


def _ray_replicas(ray, art: _Artifact, batches: list, workers: int, threads: int | None, bar,
                  on_result) -> tuple[list, int, float]:
    model = ray.put(art.models[0])
    share = _cpu_share(ray, workers)
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
    share = _cpu_share(ray, len(art.models))
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
