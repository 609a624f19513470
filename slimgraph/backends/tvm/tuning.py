"""MetaSchedule tuning with a tuning database cached per Relax module and target."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import shutil
import sys
import time
import types
from pathlib import Path
from typing import Any

from slimgraph.artifact import write_json
from slimgraph.errors import BackendError

TUNE_SEED = 0
MAX_TRIALS_PER_ROUND = 64


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


def _drop_unnamed_log_handlers() -> None:
    """apache-tvm 0.27's MetaSchedule sets up its log files with a logging dictConfig that lists
    its logger's current handlers by name, and fails on an unnamed one (pytest's log capture adds
    some between tests). dictConfig replaces that logger's handlers anyway."""
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    for handler in [h for h in ms_logger.handlers if h.get_name() is None]:
        ms_logger.removeHandler(handler)


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
    prepack = bool(config.get("prepack"))
    layout = config.get("layout", "NCHW")
    with target:
        mod = tvm.transform.Sequential([
            # channels-last convolutions vectorise over channels on CPU; the weights' transposes
            # fold into constants, the input's and the output's become (small) tasks of their own
            *([relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})]
              if layout == "NHWC" else []),
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            relax.get_pipeline("zero"),
            # weights are layout-free: MetaSchedule may pick a packed layout for them
            *([relax.transform.AttachAttrLayoutFreeBuffers()] if prepack else []),
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
        # each round of a task costs an evolutionary search (~1 min on 2 cores, whatever its
        # size) before its candidates are built and measured: rounds of up to 64 candidates
        # spend the budget on measurements, while every task still gets a round
        per_round = max(1, min(MAX_TRIALS_PER_ROUND, trials // max(len(tasks), 1)))
        _drop_unnamed_log_handlers()
        started = time.perf_counter()
        try:
            ms.relax_integration.tune_relax(
                mod, {}, target, str(work_dir),
                max_trials_global=trials,
                # the task scheduler may give the costly tasks (convolutions) most of the budget,
                # but every task gets at least one round first: an untried task keeps the
                # default schedule, which is the slow one
                max_trials_per_task=trials,
                num_trials_per_iter=per_round,
                builder=ms.builder.LocalBuilder(
                    initializer=load_cpu_tensor_intrinsics if target.kind.name == "llvm" else None,
                    timeout_sec=120,
                ),
                runner=ms.runner.LocalRunner() if target.kind.name == "llvm" else "local",
                seed=TUNE_SEED,
            )
        except Exception as exc:
            raise BackendError(f"{backend}: MetaSchedule tuning failed: {exc}") from exc
        record = {"trials": trials, "tasks": len(tasks), "trials_per_round": per_round,
                  "layout": layout, "key": key,
                  "seconds": round(time.perf_counter() - started, 1)}
        write_json(record_file, record)
        cache = "miss"
    else:
        cache = "hit"
    database = ms.database.JSONDatabase(work_dir=str(work_dir), allow_missing=False)
    with target, database:
        mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        if prepack:
            # the layout rewrites become functions of the weights alone; the weights are bound
            # constants, so FoldConstant runs the rewrites now and the library holds packed weights
            mod = tvm.transform.Sequential([
                relax.transform.SplitLayoutRewritePreproc(),
                relax.transform.FoldConstant(),
            ])(mod)
        config["_tuned_mod"] = mod
    return {**record, "trials_requested": trials, "cache": cache}


