"""cuts: the search behind `slimgraph partition`, cutting an ONNX graph into K contiguous stages.

Candidate cuts are the frontiers of a topological order (the graph's node order): cut ``c`` lies
between node ``c - 1`` and node ``c``, and what crosses it is every non-constant value made before
it and read at or after it (graph outputs are read "at the end"). A dynamic program over the cut
positions picks the K - 1 cuts that minimise the slowest stage, where a stage costs its nodes'
times plus the time to ship the bytes crossing its output cut (PipeDream / Alpa style).

- Node times come from onnxruntime's profiler on the real model with graph optimisations off, so
  profiler names map one to one onto nodes.
- Each stage of the plan is then measured as the session that will run it (optimisations on, the
  stage's thread count). The node times of each stage are scaled by measured / predicted and the
  program re-run; the plan whose slowest measured stage is fastest is kept.
- ``balance="memory"`` balances weight bytes per stage instead of time, and ``max_stage_bytes``
  caps them (stages of a model too large for one device); without ``stages`` the fewest stages
  that fit are used.

Every stage is a valid ONNX model (``onnx_ir.convenience.extract``): the values crossing a cut
become its inputs and outputs. A value that a later stage needs but this stage does not touch is
forwarded by the runner, not by the stage.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.errors import InputSpecError

# Shipping a tensor between two Ray actors on one host goes through the shared-memory object
# store: measured here (benchmarks/results/parallel.md, "ship"; Ray 2.60, 2 cores) at 1.5 ms for
# a call with 4 KB, then about 0.5 ms per MB (3.7 ms for 1 MB, 33 ms for 64 MB). The fixed part
# is paid by every stage's call alike, so only the bytes weigh on where a cut goes: the producer
# copies its outputs into the store before its call returns.
BYTES_PER_MS = 2.0e6


@dataclasses.dataclass
class Stage:
    """One contiguous run of nodes ``[start, end)`` and what it reads, makes and forwards."""

    start: int
    end: int
    inputs: list[str]  # values the stage's model reads (graph inputs or earlier stages' outputs)
    outputs: list[str]  # values it makes that a later stage or the graph's outputs need
    forward: list[str]  # values crossing its input cut that it passes on untouched or also reads
    weight_bytes: int
    predicted_ms: float  # its nodes' profiled times (scaled by the refinement rounds)
    ship_ms: float  # the estimated time to ship its output cut's bytes to the next stage
    out_bytes_per_sample: int  # bytes per sample crossing its output cut (0 for the last stage)
    measured_ms: float | None = None  # its session, run alone

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Plan:
    stages: list[Stage]
    models: list[ir.Model]

    @property
    def spread(self) -> float:
        """Slowest measured stage / fastest (1.0 is perfectly balanced)."""
        times = [s.measured_ms for s in self.stages if s.measured_ms]
        return max(times) / min(times) if times else float("nan")


class GraphCuts:
    """The cut frontiers of a model, with node times, weight bytes and crossing bytes."""

    def __init__(self, model: ir.Model, sample: dict[str, np.ndarray]) -> None:
        self.model = model
        self.nodes = list(model.graph)
        for i, node in enumerate(self.nodes):  # profiler events and extraction need unique names
            if not node.name:
                node.name = f"node_{i}"
        self.n = len(self.nodes)
        self.reads = [_reads(node) for node in self.nodes]
        self.made_at: dict[str, int] = {v.name: -1 for v in model.graph.inputs}
        self.last_read: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for out in node.outputs:
                if out.name:
                    self.made_at[out.name] = i
            for name in self.reads[i]:
                if name in self.made_at:
                    self.last_read[name] = max(self.last_read.get(name, -1), i)
        for value in model.graph.outputs:
            self.last_read[value.name] = self.n
        self.bytes_per_sample = _value_bytes(model, sample, list(self.last_read))
        self.weights = _node_weights(self.nodes)

    def first_use_bytes(self) -> np.ndarray:
        """Weight bytes per node, each initializer counted at its first user."""
        seen: set[str] = set()
        out = np.zeros(self.n)
        for i, names in enumerate(self.weights):
            for name in sorted(names - seen):
                out[i] += _initializer_bytes(self.model, name)
            seen |= names
        return out

    def crossing(self, cut: int) -> list[str]:
        """Values made before node ``cut`` and read at or after it, in the order they were made."""
        names = [v for v, last in self.last_read.items()
                 if self.made_at.get(v, self.n) < cut <= last]
        return sorted(names, key=lambda v: (self.made_at[v], v))

    def crossing_bytes(self) -> np.ndarray:
        """Bytes per sample crossing every cut 0..n (a difference array over the live ranges)."""
        diff = np.zeros(self.n + 2)
        for v, last in self.last_read.items():
            made = self.made_at.get(v)
            if made is None:
                continue
            diff[made + 1] += self.bytes_per_sample.get(v, 0)
            diff[last + 1] -= self.bytes_per_sample.get(v, 0)
        return np.cumsum(diff)[: self.n + 1]

    def stage(self, start: int, end: int, times: np.ndarray, batch: int) -> Stage:
        inside = set(range(start, end))
        made_here = {o.name for i in inside for o in self.nodes[i].outputs if o.name}
        reads = {r for i in inside for r in self.reads[i]}
        inputs = [v for v in self.crossing(start) if v in reads]
        outputs = [v for v in self.crossing(end) if v in made_here] if end < self.n else [
            v.name for v in self.model.graph.outputs if v.name in made_here]
        later = set(self.crossing(end)) if end < self.n else {v.name for v in self.model.graph.outputs}
        forward = [v for v in self.crossing(start) if v in later]
        weights = {w for i in inside for w in self.weights[i]}
        crossing_out = sum(self.bytes_per_sample.get(v, 0) for v in later) if end < self.n else 0
        return Stage(start, end, inputs, outputs, forward,
                     weight_bytes=sum(_initializer_bytes(self.model, w) for w in weights),
                     predicted_ms=round(float(times[start:end].sum()), 4),
                     ship_ms=round(_ship_ms(crossing_out * batch), 4) if end < self.n else 0.0,
                     out_bytes_per_sample=int(crossing_out))

    def extract(self, stage: Stage) -> ir.Model:
        """The stage as a model of its own: inputs and outputs are the values crossing its cuts."""
        graph = ir.convenience.extract(self.model.graph, stage.inputs, stage.outputs)
        return ir.Model(graph, ir_version=self.model.ir_version,
                        producer_name="slimgraph partition",
                        functions=list(self.model.functions.values()))


def _reads(node: ir.Node) -> set[str]:
    """Names of the non-constant values a node reads, including those its subgraphs capture."""
    names = {v.name for v in node.inputs if v is not None and not v.is_initializer()}
    for attr in node.attributes.values():
        graphs = []
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.as_graph()]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.as_graphs())
        for sub in graphs:
            for inner in ir.traversal.RecursiveGraphIterator(sub):
                for v in inner.inputs:
                    if v is not None and v.graph is not None and v.graph is not sub \
                            and v.graph is node.graph and not v.is_initializer():
                        names.add(v.name)
    names.discard(None)
    names.discard("")
    return names


def _node_weights(nodes: Sequence[ir.Node]) -> list[set[str]]:
    return [{v.name for v in node.inputs if v is not None and v.is_initializer()}
            for node in nodes]


def _initializer_bytes(model: ir.Model, name: str) -> int:
    value = model.graph.initializers.get(name)
    return 0 if value is None or value.const_value is None else value.const_value.nbytes


def _ship_ms(nbytes: float) -> float:
    return nbytes / BYTES_PER_MS


def _value_bytes(model: ir.Model, sample: dict[str, np.ndarray], names: list[str]) -> dict[str, int]:
    """Bytes per sample of every named value: one run on a batch-1 ``sample`` with all of them
    exposed as outputs (optimisations off, so every value exists)."""
    from slimgraph.backends.ort import probe_session

    inputs = {v.name for v in model.graph.inputs}
    session, wanted = probe_session(model, [n for n in names if n not in inputs],
                                    {"graph_optimization_level": "disabled", "intra_op_num_threads": 1})
    got = dict(zip(wanted, session.run(wanted, sample), strict=True)) if wanted else {}
    got.update(sample)
    return {k: int(v.nbytes) for k, v in got.items() if k in set(names)}


def node_times(model: ir.Model, feed: dict[str, np.ndarray], runs: int = 20,
               threads: int = 1) -> np.ndarray:
    """Milliseconds per run of each node (graph order), from onnxruntime's profiler with graph
    optimisations off."""
    from slimgraph.backends.ort import kernel_time_by_node

    per_node = kernel_time_by_node(ir.to_proto(model).SerializeToString(), feed, runs,
                                   {"graph_optimization_level": "disabled",
                                    "intra_op_num_threads": threads})
    return np.array([per_node.get(node.name, 0.0) / 1000 for node in model.graph])


def best_cuts(cost: np.ndarray, ship: np.ndarray, stages: int, weights: np.ndarray | None = None,
              max_bytes: float | None = None) -> list[int] | None:
    """Cut positions (0 < c_1 < ... < c_{K-1} < n) minimising the largest stage cost, where stage
    [a, b) costs ``sum(cost[a:b]) + ship[b]``; with ``max_bytes``, no stage's ``sum(weights)``
    may exceed it. None when no K-stage plan fits."""
    n = len(cost)
    prefix = np.concatenate([[0.0], np.cumsum(cost)])
    wprefix = np.concatenate([[0.0], np.cumsum(weights)]) if weights is not None else None
    inf = float("inf")
    best = np.full(n + 1, inf)  # best[j]: cheapest slowest stage covering nodes [0, j) so far
    best[0] = 0.0
    choice = np.zeros((stages + 1, n + 1), dtype=np.int64)
    for k in range(1, stages + 1):
        new = np.full(n + 1, inf)
        for j in range(k, n + 1):
            i = np.arange(k - 1, j)  # the stage is [i, j), at least one node
            stage = prefix[j] - prefix[i] + ship[j]
            if max_bytes is not None and wprefix is not None:
                stage = np.where(wprefix[j] - wprefix[i] > max_bytes, inf, stage)
            worst = np.maximum(best[i], stage)
            at = int(np.argmin(worst))
            new[j], choice[k, j] = worst[at], i[at]
        best = new
    if not np.isfinite(best[n]):
        return None
    cuts, j = [], n
    for k in range(stages, 0, -1):
        j = int(choice[k, j])
        cuts.append(j)
    return sorted(cuts)[1:]  # drop the leading 0


def measure_stage(model: ir.Model, feed: dict[str, np.ndarray], threads: int,
                  repeat: int = 30, budget_s: float = 2.0) -> float:
    """Median milliseconds of one run of ``model`` as a stage session (optimisations on): up to
    ``repeat`` runs, fewer when they would take more than ``budget_s`` (at least 7)."""
    from slimgraph.backends.ort import session_for

    session = session_for(ir.to_proto(model).SerializeToString(),
                          {"intra_op_num_threads": threads, "allow_spinning": False})
    names = {i.name for i in session.get_inputs()}
    inputs = {k: v for k, v in feed.items() if k in names}
    for _ in range(3):
        t0 = time.perf_counter()
        session.run(None, inputs)
        once = time.perf_counter() - t0
    samples = []
    for _ in range(max(7, min(repeat, int(budget_s / max(once, 1e-6))))):
        t0 = time.perf_counter()
        session.run(None, inputs)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000


def run_stages(models: Sequence[ir.Model] | Sequence[Any], stages: Sequence[Stage | dict],
               feed: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Run the stages in order on one feed; return the final values and each stage's input env."""
    from slimgraph.backends.ort import session_for

    env, envs = dict(feed), []
    for model, stage in zip(models, stages, strict=True):
        s = stage if isinstance(stage, dict) else stage.to_json()
        envs.append(env)
        session = model if hasattr(model, "run") else session_for(
            ir.to_proto(model).SerializeToString())
        outs = session.run(s["outputs"], {k: env[k] for k in s["inputs"]})
        env = {k: env[k] for k in s["forward"]} | dict(zip(s["outputs"], outs, strict=True))
    return env, envs


def plan(model: ir.Model, feed: dict[str, np.ndarray], sample: dict[str, np.ndarray], *,
         stages: int | None, balance: str = "time", max_stage_bytes: int | None = None,
         threads: int = 1, refine: int = 3, moves: int = 8) -> tuple[Plan, dict[str, Any]]:
    """Cut ``model`` into stages, measured on ``feed`` (a micro-batch) and sized on ``sample``
    (batch 1). Returns the plan and search facts (rounds, predicted and measured times)."""
    model = model.clone()
    ir.passes.common.ShapeInferencePass()(model)
    cuts_of = GraphCuts(model, sample)
    n = cuts_of.n
    batch = next(iter(feed.values())).shape[0]
    times = node_times(model, feed, threads=threads)
    crossing = cuts_of.crossing_bytes() * batch
    ship = np.array([_ship_ms(b) for b in crossing])
    ship[n] = 0.0
    weights = cuts_of.first_use_bytes()
    if stages is None:
        if max_stage_bytes is None:
            raise InputSpecError("partition: give --stages, or --max-stage-bytes to pick the count")
        stages = fewest_stages(weights, max_stage_bytes)
        if stages is None:
            raise InputSpecError(_too_big(model, max_stage_bytes))
    if not 1 <= stages <= n:
        raise InputSpecError(f"partition: --stages {stages} is more than the {n} nodes of the graph "
                             f"allow ({n - 1} possible cuts); give at most {n}")
    scaled = times.copy()
    cache: dict[tuple[int, int], float] = {}

    def evaluate(cuts: list[int]) -> Plan:
        """The stages for ``cuts``, each measured as its own session (once per node range)."""
        bounds = [0, *cuts, n]
        staged = [cuts_of.stage(a, b, scaled, batch) for a, b in itertools.pairwise(bounds)]
        models = [cuts_of.extract(st) for st in staged]
        _, envs = run_stages(models, staged, feed)
        for st, m, env in zip(staged, models, envs, strict=True):
            key = (st.start, st.end)
            if key not in cache:
                cache[key] = round(measure_stage(m, env, threads), 4)
            st.measured_ms = cache[key]
        return Plan(staged, models)

    def record(kind: str, candidate: Plan) -> None:
        history.append({"step": kind, "cuts": [st.start for st in candidate.stages[1:]],
                        "predicted_ms": [st.predicted_ms for st in candidate.stages],
                        "measured_ms": [st.measured_ms for st in candidate.stages],
                        "spread": round(candidate.spread, 3)})

    history: list[dict[str, Any]] = []
    best: Plan | None = None
    for round_ in range(max(1, refine)):
        if balance == "memory":
            cuts = best_cuts(weights, np.zeros(n + 1), stages, weights, max_stage_bytes)
        else:
            cuts = best_cuts(scaled, ship, stages, weights, max_stage_bytes)
        if cuts is None:
            raise InputSpecError(_too_big(model, max_stage_bytes, stages))
        candidate = evaluate(cuts)
        record(f"program {round_}", candidate)
        if best is None or _slowest(candidate) < _slowest(best):
            best = candidate
        if balance == "memory" or candidate.spread <= 1.05:
            break
        for st in candidate.stages:  # scale each stage's node times to what its session measured
            if st.predicted_ms > 0:
                scaled[st.start:st.end] *= st.measured_ms / st.predicted_ms
    assert best is not None
    if balance == "time" and stages > 1:
        best = _shift_cuts(best, evaluate, record, scaled, weights, max_stage_bytes, moves)
    assert best is not None
    if max_stage_bytes is not None:
        over = [i for i, s in enumerate(best.stages) if s.weight_bytes > max_stage_bytes]
        if over:  # an initializer shared across the cut is counted in both stages
            raise InputSpecError(f"partition: stages {over} hold more than {max_stage_bytes:,} "
                                 "weight bytes once shared initializers are counted in each")
    return best, {"nodes": n, "batch": batch, "threads": threads, "rounds": history,
                  "profiled_ms": round(float(times.sum()), 4)}


def _slowest(candidate: Plan) -> float:
    """What bounds the pipeline's rate: the slowest stage with the shipping of its output."""
    return max(st.measured_ms + st.ship_ms for st in candidate.stages)


def _shift_cuts(best: Plan, evaluate, record, scaled: np.ndarray, weights: np.ndarray,
                max_bytes: int | None, moves: int) -> Plan:
    """Local refinement on measured times. For every cut, a candidate moves it towards the
    costlier of its two stages by nodes worth about half their gap (in profiled node time, scaled
    by measured / profiled; at least one node). The candidate with the fastest slowest stage is
    kept if it beats the plan by 1%; otherwise the steps are halved. Stops after ``moves``
    candidates rounds, or when every step is down to nothing."""
    fraction = 0.5
    for _ in range(moves):
        stages = best.stages
        cost = [st.measured_ms + st.ship_ms for st in stages]
        cuts = [st.start for st in stages[1:]]
        tried = []
        for j in range(len(cuts)):
            left, right = stages[j], stages[j + 1]
            gap = (cost[j] - cost[j + 1]) * fraction
            donor = left if gap > 0 else right
            rate = donor.predicted_ms / donor.measured_ms if donor.measured_ms else 1.0
            order = (range(donor.end - 1, donor.start, -1) if gap > 0
                     else range(donor.start, donor.end - 1))
            taken, step = 0.0, 0
            for i in order:
                if taken >= abs(gap) * rate and step:
                    break
                taken += scaled[i]
                step += 1
            if step == 0 or abs(gap) < 0.01 * max(cost):
                continue
            moved = list(cuts)
            moved[j] += -step if gap > 0 else step
            bounds = [0, *moved, len(scaled)]
            if max_bytes is not None and any(weights[a:b].sum() > max_bytes
                                             for a, b in itertools.pairwise(bounds)):
                continue
            if all(a < b for a, b in itertools.pairwise(bounds)):
                candidate = evaluate(moved)
                record("shift", candidate)
                tried.append(candidate)
        if not tried:
            break
        top = min(tried, key=_slowest)
        if _slowest(top) < _slowest(best) * 0.99:
            best = top
        else:
            fraction /= 2
            if fraction < 0.1:
                break
    return best


def fewest_stages(weights: np.ndarray, cap: float) -> int | None:
    """The fewest contiguous stages whose weight bytes each stay within ``cap`` (greedy filling
    is optimal for contiguous runs); None if one node alone exceeds it."""
    count, held = 1, 0.0
    for w in weights:
        if w > cap:
            return None
        if held + w > cap:
            count, held = count + 1, 0.0
        held += w
    return count


def _too_big(model: ir.Model, cap: int | None, stages: int | None = None) -> str:
    largest = max(((v.const_value.nbytes, k) for k, v in model.graph.initializers.items()
                   if v.const_value is not None), default=(0, ""))
    if cap is not None and largest[0] > cap:
        return (f"partition: --max-stage-bytes {cap:,} is smaller than the initializer "
                f"{largest[1]!r} ({largest[0]:,} bytes); no cut can split one tensor")
    return (f"partition: no {stages}-stage plan keeps every stage under {cap:,} weight bytes; "
            "give more stages, or leave --stages out to get the fewest that fit")
