"""export(): load -> passes -> checker -> backends -> verification -> manifest, atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from slimgraph import model_stats
from slimgraph.artifact import (
    MANIFEST,
    check_output_path,
    file_hashes,
    pack_model,
    package_versions,
    staged_dir,
    write_json,
)
from slimgraph.backends import Backend, BuiltArtifact, parse_backend_spec
from slimgraph.backends.ort import MODEL_FILE
from slimgraph.calibration import Calibration
from slimgraph.errors import SlimgraphError, VerificationError
from slimgraph.frontend import LoadedModel, TextData, load
from slimgraph.passes import Pipeline
from slimgraph.report_md import render_report
from slimgraph.verify import VerificationResult, verify

REPORT = "report.md"
StageCallback = Callable[[str], None]


@dataclasses.dataclass
class ExportResult:
    out: Path
    manifest: dict[str, Any]
    verifications: list[VerificationResult]
    timings: dict[str, float]  # seconds per stage; kept out of the (byte-stable) artifact
    built: dict[str, BuiltArtifact] = dataclasses.field(default_factory=dict)  # by backend name
    unverified: dict[str, str] = dataclasses.field(default_factory=dict)  # built, not run: why
    rank: int = 0  # a torchrun rank other than 0 healed with the others and wrote nothing

    @property
    def warnings(self) -> list[str]:
        """What a user must know about this artifact: unverified or untuned builds, and the passes'
        own warnings (report notes that start with ``WARNING:``, such as the quantize guards')."""
        out = [f"{report['name']}: {note.removeprefix('WARNING: ')}"
               for report in self.manifest.get("passes", []) for note in report["notes"]
               if note.startswith("WARNING: ")]
        out += [f"{name}: built but NOT verified ({why})" for name, why in self.unverified.items()]
        for name, built in self.built.items():
            if built.options.get("untuned"):
                out.append(f"{name}: untuned build (default schedules); expect it slower than "
                           "onnxruntime; pass tune=N to tune it")
        return out

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verifications)


def export(
    model: str | Path | Any | LoadedModel = "digits-cnn",
    out: str | Path = "out",
    *,
    passes: Pipeline | str | Iterable | None = None,
    backends: Sequence[str] = ("ort-cpu",),
    calibration: Any = None,
    inputs: dict[str, Sequence[int]] | None = None,
    force: bool = False,
    allow_mismatch: bool = False,
    build_only: bool = False,
    train: str | Path | None = None,
    task: str | None = None,
    texts: TextData | None = None,
    on_stage: StageCallback | None = None,
    on_progress: StageCallback | None = None,
    pack: bool = False,
) -> ExportResult:
    """Export MODEL to an artifact directory ``out`` and verify every backend against the float
    reference; raises VerificationError on a mismatch unless ``allow_mismatch``.

    ``build_only`` lets a backend that cannot run here but can be compiled (tvm-cuda without a
    GPU) be built; its manifest entry then says it is unverified, and why. ``train`` is an .npz
    of training inputs (+ ``labels``) for ``heal`` passes (default: the model's own training data).
    ``on_progress`` receives transient progress lines (heal's steps) where ``on_stage`` gets stages.
    ``pack`` also writes ``model.onnx.xz`` (entropy-coded) and records its sizes under "pack".
    ``task`` and ``texts`` (TextData: calibration, evaluation, training text files) apply to a
    Hugging Face model folder.
    """
    stage = on_stage or (lambda _name: None)
    timings: dict[str, float] = {}
    out = Path(out)
    pipeline = Pipeline.coerce(passes)
    built_specs = [parse_backend_spec(s) for s in backends]
    _check_backends_usable(built_specs, build_only)
    if not isinstance(model, LoadedModel):  # a bad data file fails before the model loads
        calibration = Calibration.coerce(calibration)
    # Checked up front too, so a long export does not run only to be refused at the end.
    check_output_path(out, force=force, kind="output directory")

    with _timed(timings, "load", stage):
        loaded = model if isinstance(model, LoadedModel) else load(
            model, inputs=inputs, calibration=calibration, task=task, texts=texts
        )
    # Passes work in place; a clone keeps a caller's LoadedModel reusable (bench runs many variants
    # from one load). Tensors are shared, not copied: passes replace them, never write into them.
    ir_model = loaded.model.clone()
    before = _model_facts(ir_model)
    with _timed(timings, "passes", stage):
        ir_model, reports, rank = _run_passes(loaded, ir_model, pipeline, train, stage, on_progress)
    if rank != 0:  # one rank of a torchrun job that healed together: rank 0 writes the artifact
        return ExportResult(out, {}, [], timings, rank=rank)
    stage("check")
    _check_graph(ir_model, pipeline)

    backends_done = _BackendsDone()
    with staged_dir(out, force=force) as root:
        _write_model(ir_model, loaded, root)
        for backend, options in built_specs:
            result = _build_and_verify(backend, options, ir_model, loaded, root, pipeline,
                                       backends_done, timings, stage)
            if result is not None and not result.passed and not allow_mismatch:
                raise _divergence_error(backend.name, result, loaded, ir_model, pipeline, calibration)
        stage("write")
        manifest = _write_manifest(root, loaded, ir_model, pipeline, reports, before,
                                   backends_done.entries, pack, stage)
    for built in backends_done.built.values():
        built.root = out  # the staging dir was renamed into place
    for report in reports:
        for key, value in report.timing.items():
            timings[f"{report.name} {key}"] = value
    return ExportResult(out, manifest, backends_done.verifications, timings, backends_done.built,
                        backends_done.unverified)


@dataclasses.dataclass
class _BackendsDone:
    """What the backends built and how each verified, by backend name."""

    built: dict[str, BuiltArtifact] = dataclasses.field(default_factory=dict)
    verifications: list[VerificationResult] = dataclasses.field(default_factory=list)
    unverified: dict[str, str] = dataclasses.field(default_factory=dict)  # built, not run: why
    entries: dict[str, Any] = dataclasses.field(default_factory=dict)  # the manifest's "backends"


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str, stage: StageCallback):
    stage(name)
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def _check_backends_usable(specs: list[tuple[Backend, dict[str, Any]]], build_only: bool) -> None:
    """Every backend asked for runs here, or (with ``build_only``) can at least be built."""
    for backend, _ in specs:
        if backend.available():
            continue
        if not (build_only and backend.buildable()):
            hint = " (it can still be built unverified with --build-only)" if (
                backend.buildable()) else ""
            raise SlimgraphError(
                f"backend {backend.name!r} is unavailable here: {backend.unavailable_reason()}"
                + hint
            )


def _run_passes(loaded: LoadedModel, model: ir.Model, pipeline: Pipeline, train: str | Path | None,
                stage: StageCallback, on_progress: StageCallback | None):
    """The pipeline run on ``model`` with the data its passes need bound; the rank is non-zero on
    the other ranks of a torchrun job that healed together."""
    pipeline.bind_calibration(loaded.calibration)
    pipeline.bind_verification(loaded.verification_feeds, loaded.task == "classification")
    rank = 0
    if pipeline.needs_training:
        from slimgraph.heal.data import training_data
        from slimgraph.heal.distributed import job_rank

        stage("training data")
        pipeline.bind_training(training_data(loaded, train), on_progress)
        rank = job_rank()
    model, reports = pipeline.run(model)
    return model, reports, rank


def _check_graph(model: ir.Model, pipeline: Pipeline) -> None:
    """onnx's full check (strict shape inference included) on a serialization of the graph. Not
    onnx_ir's CheckerPass: it takes the large initializers out of the graph and puts them back at
    the end, which reorders them and changes model.onnx's bytes."""
    try:
        onnx.checker.check_model(ir.to_proto(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise VerificationError(
            f"the graph after passes [{pipeline.spec()}] fails the ONNX full check: {exc}"
        ) from exc


def _write_model(model: ir.Model, loaded: LoadedModel, root: Path) -> None:
    """model.onnx, and a model folder's tokenizer and config beside it."""
    from slimgraph.frontend.onnx_file import save_onnx

    save_onnx(model, root / MODEL_FILE)
    for source_file, name in loaded.assets:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source_file, root / name)


def _build_and_verify(backend: Backend, options: dict[str, Any], model: ir.Model,
                      loaded: LoadedModel, root: Path, pipeline: Pipeline, done: _BackendsDone,
                      timings: dict[str, float], stage: StageCallback) -> VerificationResult | None:
    """Build one backend's files under ``root`` and run them against the float reference where
    the backend runs here (None where it cannot); the outcome also goes into ``done``."""
    with _timed(timings, f"build {backend.name}", stage):
        built = backend.build(model, root, options, feeds=loaded.verification_feeds)
    done.built[backend.name] = built
    if not backend.available():
        done.unverified[backend.name] = backend.unavailable_reason() or "cannot run here"
        done.entries[backend.name] = _backend_entry(built, None) | {
            "verification": {"skipped": done.unverified[backend.name]}}
        return None
    with _timed(timings, f"verify {backend.name}", stage):
        result = verify(
            backend.name, backend.load(built), loaded.reference, loaded.verification_feeds,
            [v.name for v in model.graph.outputs], pipeline.tolerance,
            check_top1=loaded.task == "classification",
        )
    done.verifications.append(result)
    done.entries[backend.name] = _backend_entry(built, result)
    return result


def _divergence_error(name: str, result: VerificationResult, loaded: LoadedModel, model: ir.Model,
                      pipeline: Pipeline, calibration: Any) -> VerificationError:
    where = _first_divergence(loaded, model, pipeline.tolerance.min_cosine)
    return VerificationError(
        f"{name}: the artifact diverges from the float reference: "
        + "; ".join(result.failures)
        + (f"; first diverging tensor: {where}" if where else "")
        + _calibrated_on(calibration, pipeline)
        + " (pass --allow-mismatch to keep it anyway)"
    )


def _write_manifest(root: Path, loaded: LoadedModel, model: ir.Model, pipeline: Pipeline,
                    reports: list, before: dict[str, Any], backend_entries: dict[str, Any],
                    pack: bool, stage: StageCallback) -> dict[str, Any]:
    """report.md and manifest.json (with every file's hash), and the packed model if asked."""
    manifest = {
        "slimgraph_manifest": 1,
        "source": loaded.source,
        "inputs": [_value_json(v) for v in model.graph.inputs],
        "outputs": [_value_json(v) for v in model.graph.outputs],
        "pipeline": pipeline.spec(),
        "passes": [_report_json(r) for r in reports],
        "model": {"before": before, "after": _model_facts(model)},
        "tolerance": dataclasses.asdict(pipeline.tolerance),
        "backends": backend_entries,
        "versions": package_versions(),
    }
    if loaded.assets:  # what turns text into the inputs: shipped beside model.onnx
        manifest["assets"] = [name for _, name in loaded.assets]
    if pack:
        stage("pack")
        manifest["pack"] = pack_model(root, MODEL_FILE, _stored_weights(model),
                                      before["weight_bytes"])
    hashes = file_hashes(root)
    for entry in backend_entries.values():
        entry["files"] = {f: hashes[f] for f in [MODEL_FILE, *entry["files"]]}
    (root / REPORT).write_text(render_report(manifest))
    manifest["files"] = file_hashes(root)
    write_json(root / MANIFEST, manifest)
    return manifest


def _first_divergence(loaded: LoadedModel, model: ir.Model, min_cosine: float) -> str | None:
    """Name the first tensor (in graph order) where the transformed graph leaves the source one.

    A diagnostic for the error message only: if it cannot be computed, the error stands without it.
    """
    from slimgraph.passes.quantize.divergence import first_divergence

    try:
        reference = loaded.model.clone()
        model_stats.infer_shapes(reference)  # where it fails, types come from what the graph declares
        dtypes = {v.name: v.dtype for node in reference.graph for v in node.outputs}
        found = first_divergence(reference, model, loaded.verification_feeds[:4], dtypes,
                                 min_cosine)
    except Exception:  # noqa: BLE001 - see docstring
        return None
    return found.describe() if found else None


def _calibrated_on(calibration: Any, pipeline: Pipeline) -> str:
    """Names the user's calibration data where a pass calibrated on it: it may not represent the
    inputs (all zeros, values far out of the training range)."""
    if isinstance(calibration, Calibration) and any(p.needs_calibration for p in pipeline.passes):
        return f"; calibrated on {calibration.source}: are its inputs representative?"
    return ""


def _backend_entry(built: BuiltArtifact, result: VerificationResult | None) -> dict[str, Any]:
    entry = {"files": list(built.files), "options": built.options, "entry": built.entry,
             "verification": None if result is None else result.to_json()}
    if built.details:
        entry["details"] = built.details
    if built.report:
        entry["report"] = built.report
    return entry


def _report_json(report) -> dict[str, Any]:
    data = report.to_json()
    data.pop("seconds", None)  # timings vary run to run; the manifest must not
    data.pop("timing", None)
    data.pop("curve", None)
    return data


def _value_json(value: ir.Value) -> dict[str, Any]:
    shape = None if value.shape is None else [
        d if isinstance(d, int) else (str(d) if d is not None else None) for d in value.shape
    ]
    return {"name": value.name, "dtype": value.dtype.name if value.dtype else None, "shape": shape}


def _stored_weights(model: ir.Model) -> bytes:
    """The initializers' bytes as stored, in graph order."""
    return b"".join(v.const_value.tobytes() for v in model.graph.initializers.values()
                    if v.const_value is not None)


def _model_facts(model: ir.Model) -> dict[str, Any]:
    return {
        "nodes": sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph)),
        "params": model_stats.param_count(model),
        "weight_bytes": model_stats.weight_bytes(model),
        "ops": model_stats.op_histogram(model),
    }
