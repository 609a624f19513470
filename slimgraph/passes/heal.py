"""heal: fine-tune the graph's own weights by distillation from the float source model.

Everything the passes before it decided (pruned shapes, quantization formats and scales, binary
signs' packing, sparsity) stays; only weights move (and scales, with ``learn_scales``). The graph
is trained as a torch module built from it (``module``), the weights are written back into the
same initializers in the same formats, and the result is scored on held-out data before and
after. A heal that leaves the held-out score worse than it found it is undone, with a warning.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnx_ir as ir

from slimgraph.errors import PipelineSpecError
from slimgraph.passes.base import SlimgraphPass
from slimgraph.tolerance import LOSSY, Tolerance

if TYPE_CHECKING:
    from slimgraph.heal.module import GraphModule
    from slimgraph.heal.train import TrainConfig, TrainStats

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # bf16 matrix instructions: autocast pays off


class HealWeightsPass(SlimgraphPass):
    """Distil the graph toward the float source: ``steps`` of Adam at ``lr`` on ``batch`` samples.

    ``loss``: ``auto`` (KL at ``temperature`` on a classifier's logits mixed with cross-entropy by
    ``alpha`` where labels exist; cosine on embeddings), ``kd``, ``mse`` or ``cosine``.
    ``workers=K`` trains data-parallel on K local processes (torch.distributed); under torchrun
    it joins that job instead. ``learn_scales`` also trains quantization scales (LSQ).
    ``hidden=W`` adds W x the error of every LayerNormalization output that the float source graph
    computes under the same name (a pruned transformer's hidden states; TinyBERT-style).
    ``precision``: ``bf16`` trains under bf16 autocast (weights, optimizer state, fake-quant and
    the written-back graph keep their formats); ``auto`` picks it on CUDA devices with bf16 and on
    CPUs with AMX or AVX-512 BF16, fp32 elsewhere. Text batches are cut to their longest text
    where the graph's sequence axis is symbolic and no output has one. ``eval_every=K`` scores the
    student (the torch module) on the held-out data every K steps and after the last: the curve
    of score against steps goes to the report's notes, its training seconds to ``report.curve``.
    """

    name = "heal"
    tolerance: ClassVar[Tolerance] = LOSSY
    needs_training: ClassVar[bool] = True
    training: Any = None  # heal.data.TrainingData, bound by export()
    on_progress: Any = None  # (text) -> None: export's status line; else a rich bar on a tty

    def __init__(
        self,
        *,
        steps: int = 300,
        lr: float = 1e-3,
        batch: int = 32,
        temperature: float = 4.0,
        alpha: float = 0.9,
        loss: str = "auto",
        workers: int = 1,
        device: str = "auto",
        seed: int = 0,
        learn_scales: bool = False,
        hidden: float = 0.0,
        precision: str = "auto",
        eval_every: int = 0,
    ) -> None:
        from slimgraph.heal.train import LOSSES

        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not 0 < lr < math.inf:
            raise ValueError(f"lr must be a finite number > 0, got {lr}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha weighs distillation against cross-entropy: in [0, 1], got {alpha}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not 0 <= hidden < math.inf:
            raise ValueError(f"hidden is the weight of the layer-output loss, >= 0, got {hidden}")
        if not -(2**63) <= seed < 2**64:  # what torch's generators take
            raise ValueError(f"seed must be in [-2**63, 2**64), got {seed}")
        if device not in DEVICES:
            raise ValueError(f"unknown device {device!r}; valid: {', '.join(DEVICES)}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        if eval_every < 0:
            raise ValueError(f"eval_every is a number of steps, >= 0 (0: never), got {eval_every}")
        if eval_every and workers > 1:
            raise ValueError("eval_every scores the model of one process: use it with workers=1")
        self.steps, self.lr, self.batch = steps, lr, batch
        self.temperature, self.alpha, self.loss = temperature, alpha, loss
        self.workers, self.device, self.seed = workers, device, seed
        self.learn_scales, self.hidden, self.precision = learn_scales, hidden, precision
        self.eval_every = eval_every
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import torch

        from slimgraph.heal.data import sequence_trimmable
        from slimgraph.heal.module import GraphModule
        from slimgraph.heal.train import TrainConfig, resolve_loss, text_lengths, used_indices

        started = time.perf_counter()
        data = self.training
        if data is None:
            raise PipelineSpecError("heal needs training data: export() binds the model's own or "
                                    "--train FILE.npz; from Python, Pipeline.bind_training()")
        module = GraphModule(model, learn_scales=self.learn_scales)  # refuses unknown ops first
        originals = {v.name: v.const_value for v in model.graph.initializers.values()}
        before = score(model, data)
        device = self._training_device()
        precision, why = resolve_precision(self.precision, device)
        trim = sequence_trimmable(model) and sequence_trimmable(data.teacher_model)
        config = TrainConfig(self.steps, self.lr, self.batch, self.temperature, self.alpha,
                             self.loss, self.seed, device, self.hidden, precision, trim,
                             self.eval_every)
        teacher_module = self._hidden_state_teacher(model, module, data)
        loss = resolve_loss(self.loss, data.task)
        lengths = text_lengths(data.inputs) if trim else None
        used = used_indices(len(data), config, lengths)  # the teacher runs on these samples only
        teacher = data.teacher_outputs(used, trim=trim)[0]
        labels = data.labels if loss == "kd" else None
        torch.manual_seed(self.seed)
        stats = self._train(model, module, data, teacher, labels, config, loss, teacher_module)
        module.to("cpu")
        changed = module.write_back()
        after = score(model, data)
        self._report_training(stats, changed, time.perf_counter() - started, after)
        self.report.notes.append(f"precision {precision} ({why}); batches "
                                 + ("cut to their longest text, grouped by length" if trim else
                                    "at the inputs' full length"))
        summary = module.summary()
        self.report.notes.append(
            "trains " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in summary.items() if n)
        )
        self.report.notes.append(
            f"heal: {stats.steps} steps x batch {min(self.batch, len(data))} on {data.source}, "
            f"loss {loss} {stats.first_loss:.4g} -> {stats.last_loss:.4g}; held-out "
            f"{before.describe()} -> {after.value:.4f}"
        )
        if data.warning:
            self.report.notes.append(f"WARNING: {data.warning}")
        if after.value < before.value:
            self._undo(model, originals, before, after)
            changed = 0
        logger.info("%s", self.report.notes[-1])
        return ir.passes.PassResult(model, changed > 0)

    def _training_device(self) -> str:
        """``device``, with ``auto`` resolved to cuda where torch sees one, else cpu."""
        import torch

        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        if device == "cuda" and not torch.cuda.is_available():
            raise PipelineSpecError("heal:device=cuda: torch sees no CUDA device here "
                                    "(device=auto uses one where present)")
        return device

    def _hidden_state_teacher(self, model: ir.Model, module: GraphModule, data: Any) -> GraphModule | None:
        """With ``hidden``: the source graph as a module, it and ``module`` tapped at the
        LayerNormalization outputs both compute under the same name; else None."""
        from slimgraph.heal.module import GraphModule, layer_taps

        if not self.hidden > 0:
            return None
        taps = layer_taps(model, data.teacher_model)
        if not taps:
            raise PipelineSpecError("heal:hidden=: no LayerNormalization output of this graph "
                                    "is computed under the same name by the source graph")
        module.taps = taps
        teacher_module = GraphModule(data.teacher_model).eval()
        teacher_module.taps = taps
        self.report.count("hidden_states_matched", len(taps))
        return teacher_module

    def _train(self, model: ir.Model, module: GraphModule, data: Any, teacher: Any, labels: Any,
               config: TrainConfig, loss: str, teacher_module: GraphModule | None) -> TrainStats:
        """Train ``module`` as this rank of a torchrun job, on ``workers`` local processes, or in
        this process (with progress and the held-out curve)."""
        from slimgraph.heal.distributed import joined_job, train_rank, train_with_workers
        from slimgraph.heal.train import train

        if joined_job():
            return train_rank(module, data.inputs, teacher, labels, config, loss, teacher_module)
        if self.workers > 1:
            weights, stats = train_with_workers(model, data.inputs, teacher, labels, config, loss,
                                                self.workers, self.learn_scales,
                                                data.teacher_model if teacher_module else None)
            module.load_weights(weights)
            return stats
        module.to(config.device)
        if teacher_module is not None:
            teacher_module.to(config.device)
        with _progress(self.steps, self.on_progress) as on_step:
            return train(module, data.inputs, teacher, labels, config, loss,
                         groups=module.parameter_groups(), on_step=on_step,
                         teacher_module=teacher_module,
                         evaluate=_held_out_scorer(data, config.trim, config.device))

    def _report_training(self, stats: TrainStats, changed: int, total: float, after: Score) -> None:
        """Counts and timing of a finished training, and its held-out curve where it has one."""
        self.report.count("steps", stats.steps)
        self.report.count("workers", stats.workers)
        self.report.count("initializers_changed", changed)
        self.report.timing = {"training": round(stats.seconds, 2),
                              "outside_training": round(total - stats.seconds, 2),
                              "samples_per_s": round(stats.samples_per_s, 1)}
        if stats.curve:
            self.report.curve = [{"step": step, "training_seconds": round(seconds, 2),
                                  "score": round(value, 4)} for step, seconds, value in stats.curve]
            self.report.notes.append(f"held-out {after.metric} of the torch module by step: "
                                     + ", ".join(f"{step} {value:.4f}"
                                                 for step, _, value in stats.curve))

    def _undo(self, model: ir.Model, originals: dict[str, Any], before: Score, after: Score) -> None:
        """Put the initializers back as they were before the heal, with a warning."""
        for value in model.graph.initializers.values():
            if value.name in originals:
                value.const_value = originals[value.name]
        self.report.notes.append(
            f"WARNING: heal made the held-out {before.metric} worse ({before.value:.4f} -> "
            f"{after.value:.4f}); the weights were left as they were (try a lower lr or more steps)"
        )


def resolve_precision(precision: str, device: str) -> tuple[str, str]:
    """The training precision for ``precision`` on ``device``, and why."""
    if precision != "auto":
        return precision, "asked"
    import torch

    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the CUDA device computes in bf16"
        return "fp32", "auto: the CUDA device has no bf16"
    from slimgraph.passes.quantize.int8 import cpu_flags

    flags = cpu_flags() or set()
    found = [f for f in BF16_CPU_FLAGS if f in flags]
    if found:
        return "bf16", f"auto: the CPU has {' and '.join(found)}"
    return "fp32", "auto: this CPU has no AMX or AVX-512 BF16, where bf16 autocast runs emulated"


class Score:
    """A held-out score: accuracy against labels, else mean cosine to the teacher's outputs."""

    def __init__(self, metric: str, value: float, samples: int) -> None:
        self.metric, self.value, self.samples = metric, value, samples

    def describe(self) -> str:
        return f"{self.metric} on {self.samples} samples {self.value:.4f}"


def score(model: ir.Model, data: Any) -> Score:
    """Run ``model`` in onnxruntime on the held-out batches and score its first output."""
    from slimgraph.backends.ort import run_feeds

    return score_outputs([outs[0] for outs in run_feeds(model, data.held_out)], data)


def _held_out_scorer(data: Any, trim: bool, device: str):
    """module -> its held-out score (see score_outputs), run in torch on the held-out batches."""
    import torch

    from slimgraph.heal.train import text_lengths, trimmed

    def evaluate(module: Any) -> float:
        outputs = []
        for feed in data.held_out:
            feed = trimmed(feed, text_lengths(feed) if trim else None)
            out = module(**{k: torch.from_numpy(np.asarray(v)).to(device) for k, v in feed.items()})
            outputs.append(out[0].float().cpu().numpy())
        return score_outputs(outputs, data).value

    return evaluate


def score_outputs(outputs: list[np.ndarray], data: Any) -> Score:
    """Held-out first outputs scored: accuracy where the task is classification with labels,
    else the mean cosine to the teacher's outputs on the same batches."""
    samples = sum(len(o) for o in outputs)
    if data.task == "classification" and data.held_out_labels:
        hits = sum(int((o.argmax(-1) == y).sum()) for o, y in zip(outputs, data.held_out_labels,
                                                                   strict=True))
        return Score("accuracy", hits / samples, samples)
    reference = np.concatenate([r[0] for r in data.held_out_teacher()])
    return Score("mean cosine to the float model",
                 mean_row_cosine(np.concatenate(outputs), reference), samples)


def mean_row_cosine(out: np.ndarray, ref: np.ndarray) -> float:
    """The mean over samples (axis 0) of the cosine between each sample's outputs."""
    o, r = out.reshape(len(out), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)
    norms = np.linalg.norm(o, axis=1) * np.linalg.norm(r, axis=1)
    return float(np.mean((o * r).sum(1) / np.maximum(norms, 1e-12)))


class _progress:
    """Step, loss and samples/s: to ``status`` (a caller's status line) if given, else a rich
    progress bar on a terminal; silent otherwise."""

    def __init__(self, steps: int, status: Any = None) -> None:
        self.steps, self.status = steps, status
        self.bar = None

    def __enter__(self):
        if self.status is not None:
            def report(step: int, loss: float, rate: float) -> None:
                self.status(f"heal {step + 1}/{self.steps} loss {loss:.4g} {rate:.0f} samples/s")

            return report
        if not sys.stderr.isatty():
            return None
        from slimgraph.progress import progress_bar

        self.bar = progress_bar("heal", "loss {task.fields[loss]}", "{task.fields[rate]} samples/s")
        self.bar.start()
        task = self.bar.add_task("heal", total=self.steps, loss="-", rate="-")

        def on_step(step: int, loss: float, rate: float) -> None:
            loss_text = f"{loss:.4g}" if math.isfinite(loss) else str(loss)
            self.bar.update(task, completed=step + 1, loss=loss_text, rate=f"{rate:.0f}")

        return on_step

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
