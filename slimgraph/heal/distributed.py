"""Data-parallel healing with torch.distributed: K local workers through the elastic launcher, or
this process as one rank of a job that ``torchrun`` started.

Each rank builds the same GraphModule from the serialized graph, wraps it in
DistributedDataParallel (gloo on CPU, nccl on GPUs) and takes its share of every global batch;
rank 0 returns the trained weights. Local workers split the machine's cores between them.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.distributed as dist

from slimgraph.heal.module import GraphModule, layer_taps
from slimgraph.heal.train import TrainConfig, TrainStats, train


def joined_job() -> bool:
    """Whether this process is a rank of a multi-process torchrun job (then heal joins it)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def job_rank() -> int:
    """This process's rank in the torchrun job heal joins (0 outside one)."""
    return int(os.environ["RANK"]) if joined_job() else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_with_workers(model: ir.Model, inputs: dict[str, np.ndarray], teacher: np.ndarray,
                       labels: np.ndarray | None, config: TrainConfig, loss: str, workers: int,
                       learn_scales: bool, teacher_model: ir.Model | None = None,
                       ) -> tuple[dict[str, np.ndarray], TrainStats]:
    """Train on ``workers`` local processes (elastic launcher, c10d rendezvous on localhost);
    returns rank 0's weights by parameter key and its statistics."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="slimgraph-heal-") as tmp:
        root = Path(tmp)
        onnx.save(ir.to_proto(model), root / "model.onnx")
        if teacher_model is not None:
            onnx.save(ir.to_proto(teacher_model), root / "teacher.onnx")
        arrays = {f"input:{k}": v for k, v in inputs.items()} | {"teacher": teacher}
        if labels is not None:
            arrays["labels"] = labels
        np.savez(root / "data.npz", **arrays)
        launch = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=workers, run_id=f"heal-{uuid.uuid4().hex[:8]}",
            rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0,
            monitor_interval=0.1, start_method="spawn",
        )
        results = elastic_launch(launch, _local_worker)(
            str(root), dataclasses.asdict(config), loss, learn_scales)
    weights, stats = results[0]
    return weights, TrainStats(**stats)


def _local_worker(root: str, config: dict[str, Any], loss: str, learn_scales: bool):
    """One spawned rank: its share of the cores, the graph and data from ``root``."""
    world = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    model = ir.from_proto(onnx.load(Path(root) / "model.onnx"))
    with np.load(Path(root) / "data.npz", allow_pickle=False) as npz:
        inputs = {k.removeprefix("input:"): npz[k] for k in npz.files if k.startswith("input:")}
        teacher = npz["teacher"]
        labels = npz["labels"] if "labels" in npz.files else None
    module = GraphModule(model, learn_scales=learn_scales)
    teacher_module = None
    if (Path(root) / "teacher.onnx").exists():
        teacher_graph = ir.from_proto(onnx.load(Path(root) / "teacher.onnx"))
        module.taps = layer_taps(model, teacher_graph)
        teacher_module = GraphModule(teacher_graph).eval()
        teacher_module.taps = module.taps
    stats = train_rank(module, inputs, teacher, labels, TrainConfig(**config), loss, teacher_module)
    dist.destroy_process_group()
    if job_rank() != 0:
        return None
    weights = {k: p.detach().cpu().numpy() for k, p in module.weights.items()}
    return weights, dataclasses.asdict(stats)


def train_rank(module: GraphModule, inputs: dict[str, np.ndarray], teacher: np.ndarray,
               labels: np.ndarray | None, config: TrainConfig, loss: str,
               teacher_module: GraphModule | None = None) -> TrainStats:
    """Train as one rank of the process group (joined here if not yet): DDP keeps every rank's
    weights equal, so each ends with rank 0's result."""
    from torch.nn.parallel import DistributedDataParallel

    cuda = config.device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        config = dataclasses.replace(config, device=f"cuda:{local}")
    module.to(config.device)
    if teacher_module is not None:
        teacher_module.to(config.device)
    # Buffers are the graph's constants: nothing to re-broadcast before every forward.
    wrapped = DistributedDataParallel(module, device_ids=[int(config.device.split(":")[1])]
                                      if cuda else None, forward_sync_buffers=False)
    return train(wrapped, inputs, teacher, labels, config, loss, groups=module.parameter_groups(),
                 rank=dist.get_rank(), world=dist.get_world_size(), teacher_module=teacher_module)
