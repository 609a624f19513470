"""The distillation loop: one process, or one rank of a DistributedDataParallel job.

Loss (``loss=kd``): ``alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)``
where labels exist (Hinton et al. 2015; the T^2 keeps the soft-target gradients' scale as T
grows). ``cosine``: ``1 - cos(s, t)`` per row, for embeddings. ``mse``: mean squared error.
``auto`` picks kd for classifiers and cosine otherwise. The loss reads the first graph output.
Adam with a linear warm-up over the first 5% of steps, then cosine decay to zero.

Text batches (``trim``): each batch is cut to its longest text (the attention mask's last set
column) and batches are drawn from pools of ``POOL`` batches sorted by length, so a batch holds
texts of similar length (``group_by_length`` in Hugging Face's Trainer); every sample is still
seen once per epoch. ``precision="bf16"`` runs forward and loss under bf16 autocast; the weights,
their gradients and Adam's state stay fp32.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

LOSSES = ("auto", "kd", "mse", "cosine")
POOL = 16  # batches per length-sorted pool
BINARY_LR_SCALE = 10.0  # latent binary weights live on [-1, 1]: a larger step flips signs in time


@dataclasses.dataclass
class TrainConfig:
    steps: int = 300
    lr: float = 1e-3
    batch: int = 32
    temperature: float = 4.0
    alpha: float = 0.9
    loss: str = "auto"
    seed: int = 0
    device: str = "cpu"
    hidden: float = 0.0  # weight of the layer-output loss (needs a teacher module with taps)
    precision: str = "fp32"  # "bf16": autocast forward and loss
    trim: bool = False  # cut text batches to their longest text (needs attention_mask [N, L])
    eval_every: int = 0  # score the held-out set every this many steps (0: never)


@dataclasses.dataclass
class TrainStats:
    steps: int
    workers: int
    samples: int  # samples seen, all workers together
    first_loss: float
    last_loss: float  # mean of the last 10% of steps
    seconds: float  # training only: held-out evaluations are not counted
    curve: list[tuple[int, float, float]] = dataclasses.field(default_factory=list)
    # (steps done, training seconds so far, held-out score) every eval_every steps and at the end

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def resolve_loss(loss: str, task: str | None) -> str:
    if loss != "auto":
        return loss
    return "kd" if task == "classification" else "cosine"


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
                      loss: str, temperature: float, alpha: float) -> torch.Tensor:
    if loss == "kd":
        t = temperature
        soft = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                        reduction="batchmean", log_target=True) * t * t
        if labels is None:
            return soft
        return alpha * soft + (1 - alpha) * F.cross_entropy(student, labels)
    if loss == "cosine":
        s, te = student.reshape(len(student), -1), teacher.reshape(len(teacher), -1)
        return (1 - F.cosine_similarity(s, te, dim=1)).mean()
    return F.mse_loss(student, teacher)


def _schedule(step: int, steps: int) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def batches(n: int, batch: int, steps: int, seed: int, rank: int = 0, world: int = 1,
            lengths: np.ndarray | None = None):
    """Index batches for ``steps`` steps: a fresh permutation per epoch (seeded), the global batch
    split across ``world`` ranks like DistributedSampler, so K workers take the same steps. With
    ``lengths``, each pool of POOL batches is sorted by length before it is cut into batches, and
    the batches of a pool are taken in a seeded random order."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    pending: list[list[int]] = []
    batch = min(batch, n)
    for _ in range(steps):
        if not pending:
            size = batch * (POOL if lengths is not None else 1)
            while len(order) < size:
                order += torch.randperm(n, generator=generator).tolist()
            pool, order = order[:size], order[size:]
            if lengths is not None:
                pool.sort(key=lambda i: int(lengths[i]))
            pending = [pool[i:i + batch] for i in range(0, size, batch)]
            if lengths is not None:
                pending = [pending[i] for i in torch.randperm(len(pending), generator=generator)]
        chosen = pending.pop(0)
        yield np.array(chosen[rank::world], dtype=np.int64)


def text_lengths(inputs: dict[str, np.ndarray]) -> np.ndarray | None:
    """Each sample's length up to its attention mask's last set column, where the inputs are
    [N, L] token arrays with an ``attention_mask``; else None."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.ndim != 2 or any(v.shape != mask.shape for v in inputs.values()):
        return None
    set_columns = mask != 0
    return np.where(set_columns.any(1), mask.shape[1] - np.argmax(set_columns[:, ::-1], axis=1), 1)


def trimmed(feeds: dict[str, np.ndarray], lengths: np.ndarray | None,
            rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``feeds`` cut to the longest of ``lengths`` (of the samples ``rows`` where given), at least
    2 columns (torch.export's minimum); as they are where ``lengths`` is None (not text)."""
    if lengths is None:
        return feeds
    width = max(2, int((lengths if rows is None else lengths[rows]).max()))
    return {k: v[:, :width] for k, v in feeds.items()}


def used_indices(n: int, config: TrainConfig, lengths: np.ndarray | None) -> np.ndarray:
    """Every sample index the run's steps will draw (all ranks together), sorted."""
    drawn = list(batches(n, config.batch, config.steps, config.seed, lengths=lengths))
    return np.unique(np.concatenate(drawn)) if drawn else np.zeros(0, np.int64)


def _adam(param_groups: list[dict]) -> torch.optim.Adam:
    """Adam with the fused kernel (CPU and CUDA): one pass over each tensor per step. Unfused,
    its element-wise updates of the 11.7M-entry word embeddings of a MiniLM took a third of
    every step."""
    try:
        return torch.optim.Adam(param_groups, fused=True)
    except (RuntimeError, ValueError, TypeError):  # a device or dtype the fused kernel lacks
        return torch.optim.Adam(param_groups)


def hidden_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over matched layer outputs of the squared error relative to the teacher's power."""
    terms = [F.mse_loss(s, t) / t.pow(2).mean().clamp(min=1e-12) for s, t in zip(student, teacher,
                                                                                strict=True)]
    return torch.stack(terms).mean()


def train(module: torch.nn.Module, inputs: dict[str, np.ndarray], teacher: np.ndarray,
          labels: np.ndarray | None, config: TrainConfig, loss: str, *,
          groups: dict[str, list[torch.nn.Parameter]], rank: int = 0, world: int = 1,
          on_step: Callable[[int, float, float], None] | None = None,
          teacher_module: torch.nn.Module | None = None,
          evaluate: Callable[[torch.nn.Module], float] | None = None) -> TrainStats:
    """Distil ``module`` (or its DDP wrapper) toward ``teacher`` outputs; returns the loss curve's
    ends. ``groups`` are the parameter groups (binary latents get BINARY_LR_SCALE x the rate).
    With ``config.hidden`` > 0 both modules also return matched layer outputs (their taps), and
    ``teacher_module`` computes the teacher's on the fly. With ``config.eval_every`` and
    ``evaluate`` (module in eval mode -> held-out score), the score is taken every that many steps
    and after the last; its time is left out of the training seconds."""
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    param_groups = [{"params": groups["weights"], "lr": config.lr}]
    if groups.get("binary"):
        param_groups.append({"params": groups["binary"], "lr": config.lr * BINARY_LR_SCALE})
    optimizer = _adam(param_groups)
    graph_module = getattr(module, "module", module)  # under DistributedDataParallel
    graph_module.mask_in_forward = False  # project() after each step keeps the zeros instead
    base = [g["lr"] for g in optimizer.param_groups]
    names = list(inputs)
    n = len(teacher)
    lengths = text_lengths(inputs) if config.trim else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    losses: list[float] = []
    curve: list[tuple[int, float, float]] = []
    samples = 0
    evaluating = 0.0  # seconds spent on held-out scores
    start = time.perf_counter()
    module.train()
    for step, idx in enumerate(batches(n, config.batch, config.steps, config.seed, rank, world,
                                       lengths)):
        for group, lr in zip(optimizer.param_groups, base, strict=True):
            group["lr"] = lr * _schedule(step, config.steps)
        arrays = trimmed({k: inputs[k][idx] for k in names}, lengths, idx)
        feeds = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
        target = torch.from_numpy(teacher[idx]).to(device)
        y = torch.from_numpy(labels[idx]).to(device) if labels is not None else None
        with autocast:
            outs = module(**feeds)
            value = distillation_loss(outs[0].float(), target, y, loss, config.temperature,
                                      config.alpha)
            if config.hidden > 0 and teacher_module is not None:
                with torch.no_grad():
                    reference = teacher_module(**feeds)[1:]
                value = value + config.hidden * hidden_loss([o.float() for o in outs[1:]],
                                                            [r.float() for r in reference])
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        graph_module.project()
        losses.append(float(value.detach()))
        samples += len(idx) * world
        if on_step is not None:
            on_step(step, losses[-1], samples / max(time.perf_counter() - start - evaluating, 1e-9))
        done = step + 1
        if evaluate is not None and config.eval_every and (done % config.eval_every == 0
                                                           or done == config.steps):
            paused = time.perf_counter()
            module.eval()
            with torch.no_grad(), autocast:
                held_out = evaluate(graph_module)
            module.train()
            curve.append((done, paused - start - evaluating, held_out))
            evaluating += time.perf_counter() - paused
    module.eval()
    graph_module.mask_in_forward = True
    tail = losses[-max(1, len(losses) // 10):]
    return TrainStats(config.steps, world, samples, losses[0] if losses else 0.0,
                      float(np.mean(tail)) if tail else 0.0,
                      time.perf_counter() - start - evaluating, curve)
