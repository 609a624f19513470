"""torch.nn.Module -> onnx_ir.Model with torch.onnx.export(dynamo=True), checked against the module."""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import warnings
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from slimgraph.errors import ModelLoadError

logger = logging.getLogger(__name__)

OPSET = 20


def export_module(
    module,
    example_inputs: Sequence,
    input_names: Sequence[str],
    output_names: Sequence[str] | None = None,
    *,
    dynamic_batch: bool = True,
    max_sequence: int | None = None,
    label: str = "module",
) -> ir.Model:
    """Trace ``module`` to an IR model whose dim 0 of every input is a symbolic ``batch`` (and,
    with ``max_sequence``, dim 1 of every input of rank >= 2 a symbolic ``sequence`` up to it).

    Value names are made collision-free (an output named like an internal value gives a model
    with a duplicate definition that onnxruntime refuses), and the graph is checked to reproduce
    the module's outputs on ``example_inputs`` before it is returned.
    """
    import torch

    module = module.eval()
    example_inputs = tuple(example_inputs)
    if len(input_names) != len(example_inputs):
        raise ModelLoadError(
            f"{label}: {len(example_inputs)} example inputs but {len(input_names)} input names"
        )
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        dynamic_shapes = tuple({0: batch} if t.dim() > 0 else None for t in example_inputs)
    if dynamic_batch and max_sequence:
        sequence = torch.export.Dim("sequence", min=2, max=max_sequence)
        dynamic_shapes = tuple({0: batch, 1: sequence} if t.dim() > 1 else d
                               for t, d in zip(example_inputs, dynamic_shapes, strict=True))
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                module,
                example_inputs,
                dynamo=True,
                input_names=list(input_names),
                output_names=list(output_names) if output_names else None,
                dynamic_shapes=dynamic_shapes,
                opset_version=OPSET,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; name the module and the cause
        raise ModelLoadError(f"{label}: torch.onnx.export failed: {exc}") from exc
    model = program.model
    renamed = make_value_names_unique(model.graph)
    if renamed:
        logger.info("Renamed %s internal values that collided with other names", renamed)
    _freeze_initializers(model)
    check_matches_module(model, module, example_inputs, label)
    return model


def make_value_names_unique(graph: ir.Graph) -> int:
    """Rename internal values whose names repeat; graph inputs and outputs keep their names."""
    reserved = {v.name for v in graph.inputs} | {v.name for v in graph.outputs}
    seen: collections.Counter[str] = collections.Counter()
    renamed = 0
    values = list(graph.initializers.values()) + [o for n in graph for o in n.outputs]
    names = {v.name for v in values} | reserved
    for value in values:
        if value.name is None or value in graph.outputs:
            continue
        seen[value.name] += 1
        if value.name in reserved or seen[value.name] > 1:
            base, i = value.name, 1
            while f"{base}__{i}" in names:
                i += 1
            new = f"{base}__{i}"
            if value.is_initializer():
                del graph.initializers[value.name]
                value.name = new
                graph.register_initializer(value)
            else:
                value.name = new
            names.add(new)
            renamed += 1
    return renamed


def _freeze_initializers(model: ir.Model) -> None:
    """Copy torch-backed initializers into numpy tensors so the IR does not hold torch memory."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and type(tensor) is not ir.Tensor:
            value.const_value = ir.Tensor(np.array(tensor.numpy()), name=value.name)


def torch_outputs(module, inputs: Sequence) -> list[np.ndarray]:
    """Run the module under no_grad and flatten its outputs to numpy arrays."""
    import torch

    with torch.no_grad():
        out = module(*inputs)
    flat = out if isinstance(out, (tuple, list)) else (out,)
    return [t.detach().cpu().numpy() for t in flat]


def check_matches_module(model: ir.Model, module, example_inputs: Sequence, label: str) -> None:
    """Raise ModelLoadError if onnxruntime on the exported graph disagrees with the module."""
    from slimgraph.backends.ort import session_for
    from slimgraph.verify import compare_outputs

    expected = torch_outputs(module, example_inputs)
    feeds = {
        v.name: t.detach().cpu().numpy()
        for v, t in zip(model.graph.inputs, example_inputs, strict=True)
    }
    try:
        session = session_for(ir.to_proto(model).SerializeToString())
        got = session.run(None, feeds)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelLoadError(f"{label}: onnxruntime cannot run the exported graph: {exc}") from exc
    names = [v.name for v in model.graph.outputs]
    metrics = compare_outputs(names, [expected], [got])
    bad = [m for m in metrics if m.max_rel_err > 1e-4]
    if bad:
        worst = bad[0]
        raise ModelLoadError(
            f"{label}: the exported graph does not reproduce the module: output {worst.name!r} "
            f"max abs error {worst.max_abs_err:.3g} (relative {worst.max_rel_err:.3g})"
        )


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints progress and registration warnings; keep the CLI output clean."""
    sink = io.StringIO()
    loggers = [logging.getLogger(n)
               for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(sink),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
