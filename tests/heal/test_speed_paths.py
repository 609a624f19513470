"""What makes heal fast on text must not change what it computes: batches cut to their longest
text, length-grouped batches that still visit every sample once per epoch, teacher outputs only
for the samples drawn, MatMul+bias run as addmm, sparse zeros kept by projection, bf16 autocast
that leaves the weights' formats alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from slimgraph.heal.data import TrainingData, sequence_trimmable
from slimgraph.heal.module import GraphModule
from slimgraph.heal.train import POOL, TrainConfig, batches, text_lengths, train, trimmed, used_indices
from slimgraph.passes import heal as heal_pass


def test_text_lengths_read_the_last_set_column_of_the_mask():
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]])
    inputs = {"input_ids": np.ones_like(mask), "attention_mask": mask}
    assert text_lengths(inputs).tolist() == [2, 3, 1, 4]
    assert text_lengths({"input_ids": np.ones((3, 4))}) is None  # no mask: nothing to cut
    assert text_lengths({"attention_mask": mask, "x": np.ones((4, 5))}) is None  # other shapes
    cut = trimmed(inputs, np.array([2, 1]))
    assert {k: v.shape for k, v in cut.items()} == {"input_ids": (4, 2), "attention_mask": (4, 2)}


def test_batches_without_lengths_are_seeded_permutations_per_epoch():
    generator = torch.Generator().manual_seed(3)
    order = torch.randperm(10, generator=generator).tolist() + \
        torch.randperm(10, generator=generator).tolist()
    expected = [order[0:4], order[4:8], order[8:12], order[12:16], order[16:20]]
    assert [b.tolist() for b in batches(10, 4, 5, seed=3)] == expected


def test_length_grouped_batches_visit_every_sample_once_per_epoch_and_hold_similar_lengths():
    n, batch = 4 * 8 * POOL, 8
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 64, size=n)
    drawn = list(batches(n, batch, n // batch, seed=1, lengths=lengths))
    assert sorted(np.concatenate(drawn).tolist()) == list(range(n))  # one epoch, each once
    spread = np.mean([np.ptp(lengths[b]) for b in drawn])
    random_spread = np.mean([np.ptp(lengths[rng.permutation(n)[:batch]]) for _ in range(200)])
    assert spread < random_spread / 4, (spread, random_spread)
    # two ranks split each global batch between them, as DistributedSampler does
    ranks = [list(batches(n, batch, 3, seed=1, rank=r, world=2, lengths=lengths)) for r in (0, 1)]
    for step in range(3):
        assert sorted(np.concatenate([ranks[0][step], ranks[1][step]]).tolist()) == \
            sorted(drawn[step].tolist())


class _CountingTeacher:
    """A teacher that records the rows it ran: output = input_ids summed over the mask."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.widths: list[int] = []

    def __call__(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.rows += feed["input_ids"][:, 0].tolist()
        self.widths.append(feed["input_ids"].shape[1])
        return [(feed["input_ids"] * feed["attention_mask"]).sum(1, keepdims=True).astype(np.float32)]


def test_the_teacher_runs_only_on_the_samples_the_steps_draw():
    n = 500
    lengths = np.arange(n) % 40 + 2
    mask = (np.arange(64)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.arange(n)[:, None] * mask + 1000 * mask  # column 0 names the row (id + 1000)
    teacher = _CountingTeacher()
    data = TrainingData({"input_ids": ids, "attention_mask": mask}, None, [], None, teacher,
                        None, "test")
    config = TrainConfig(steps=3, batch=16, seed=0)
    used = used_indices(n, config, text_lengths(data.inputs))
    assert len(used) == 48
    out = data.teacher_outputs(used, trim=True)[0]
    assert sorted(r - 1000 for r in teacher.rows) == used.tolist()  # those rows, each once
    assert max(teacher.widths) < 64  # batches cut to their longest text
    expected = (ids * mask).sum(1)
    assert np.array_equal(out[used, 0], expected[used])
    untouched = np.setdiff1d(np.arange(n), used)
    assert not out[untouched].any()
    data.teacher_outputs(used, trim=True)
    assert len(teacher.rows) == 48  # kept: not computed twice


def _linear_model(zeros: bool = False, second_reader: bool = False) -> ir.Model:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    if zeros:
        w[::2, 1::2] = 0
    b = rng.standard_normal(5).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 5])]
    if second_reader:
        nodes.append(helper.make_node("Relu", ["mm"], ["r"]))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["n", 3, 5]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         ["n", 3, 6])],
                              outputs, [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


@pytest.mark.parametrize("second_reader", [False, True])
def test_matmul_and_bias_run_as_one_addmm_with_the_same_values_and_gradients(second_reader):
    model = _linear_model(second_reader=second_reader)
    module = GraphModule(model)
    fused = [s for s in module.steps if s.run is not None]
    assert len(fused) == (0 if second_reader else 1)  # a MatMul read twice stays as it was
    w = model.graph.initializers["w"].const_value.numpy()
    b = model.graph.initializers["b"].const_value.numpy()
    x = np.random.default_rng(1).standard_normal((4, 3, 6)).astype(np.float32)
    out = module(x=torch.from_numpy(x))[0]
    np.testing.assert_allclose(out.detach().numpy(), x @ w + b, rtol=1e-5, atol=1e-5)
    out.pow(2).sum().backward()
    grads = {k: p.grad.numpy() for k, p in module.weights.items()}
    wt, bt = torch.from_numpy(w.copy()).requires_grad_(), torch.from_numpy(b.copy()).requires_grad_()
    (torch.from_numpy(x) @ wt + bt).pow(2).sum().backward()
    np.testing.assert_allclose(grads["w"], wt.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads["b"], bt.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_train_keeps_sparse_zeros_by_projection_and_leaves_masking_on_after():
    model = _linear_model(zeros=True)
    w0 = model.graph.initializers["w"].const_value.numpy().copy()
    module = GraphModule(model)
    rng = np.random.default_rng(2)
    inputs = {"x": rng.standard_normal((64, 3, 6)).astype(np.float32)}
    teacher = rng.standard_normal((64, 3, 5)).astype(np.float32)
    train(module, inputs, teacher, None, TrainConfig(steps=20, batch=16, lr=1e-2), "mse",
          groups=module.parameter_groups())
    assert module.mask_in_forward
    module.write_back()
    w = model.graph.initializers["w"].const_value.numpy()
    assert np.array_equal(w == 0, w0 == 0)
    assert not np.allclose(w, w0)  # the other entries trained


def test_sequence_trimming_needs_a_mask_a_symbolic_sequence_and_no_sequence_output():
    def graph(seq, out_shape, mask=True):
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["n", seq])]
        names = ["input_ids"]
        if mask:
            inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                        ["n", seq]))
            names.append("attention_mask")
        node = helper.make_node("Add", names if mask else names * 2, ["s"])
        cast = helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)
        reduce = [helper.make_node("ReduceSum", ["y", "one"], ["z"], keepdims=1)] \
            if out_shape[1] == 1 else []
        out = "z" if reduce else "y"
        g = helper.make_graph([node, cast, *reduce], "g", inputs,
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
                              [numpy_helper.from_array(np.array([1], np.int64), "one")])
        return ir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))

    assert sequence_trimmable(graph("sequence", ["n", 1]))
    assert not sequence_trimmable(graph(64, ["n", 1]))  # a fixed sequence axis
    assert not sequence_trimmable(graph("sequence", ["n", "sequence"]))  # per-token outputs
    assert not sequence_trimmable(graph("sequence", ["n", 1], mask=False))


def test_precision_auto_reads_the_device_and_cpu_flags(monkeypatch):
    from slimgraph.passes.quantize import int8

    monkeypatch.setattr(int8, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert heal_pass.resolve_precision("auto", "cpu")[0] == "bf16"
    monkeypatch.setattr(int8, "cpu_flags", lambda: {"avx2", "amx_bf16", "amx_tile"})
    assert heal_pass.resolve_precision("auto", "cpu")[0] == "bf16"
    monkeypatch.setattr(int8, "cpu_flags", lambda: {"avx2", "fma"})
    precision, why = heal_pass.resolve_precision("auto", "cpu")
    assert precision == "fp32" and "no AMX or AVX-512 BF16" in why
    monkeypatch.setattr(int8, "cpu_flags", lambda: None)  # no /proc/cpuinfo
    assert heal_pass.resolve_precision("auto", "cpu")[0] == "fp32"
    assert heal_pass.resolve_precision("bf16", "cpu") == ("bf16", "asked")
    assert heal_pass.resolve_precision("fp32", "cuda") == ("fp32", "asked")
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        heal_pass.HealWeightsPass(precision="fp16")
