"""advise: which device, precision and backend serve a model cheapest, bounded by the roofline.

Per layer (``model_stats.layer_costs``, the same counts `inspect` shows) and per device and
precision, the time bound is the slower of compute (2 operations per MAC at the device's peak for
that precision; other ops one operation per output element at the fp32 peak) and memory (the
bytes the layer moves, scaled to the precision's element size, over the bandwidth of the fastest
memory level the layer's own data fits in). Only the matrix ops (Conv, Gemm, MatMul, ...) change
precision: the backends run the rest in float. The model's bound is the sum over its layers (one
layer at a time).

Calibration. On this machine the model runs in onnxruntime at each precision that can be measured
(fp32); ``efficiency = bound / measured`` scales the prediction for every device of the same kind
(``predicted = bound / efficiency``). A device kind with no measurement is predicted at its bound
and says so.

Catalogue. Every field of every device and cpu family is checked when a catalogue is read: its type,
finiteness and range (``TOPS_RANGE``, ``GBPS_RANGE``, ... below: generous physical ceilings), names
from a safe alphabet, kinds and precisions from their lists. A bad one is a CatalogueError naming
the file, the entry and the field, so no NaN, zero or negative figure reaches the arithmetic.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from slimgraph.errors import CatalogueError, InputSpecError
from slimgraph.model_stats import LayerMacs, layer_costs

CATALOGUE = Path(__file__).with_name("devices.toml")
BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8}
_MATRIX = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN"})
# What each slimgraph backend runs a model in (onnxruntime's CPU kernels have no bf16/fp16 GEMM
# worth using; its CUDA provider has no bf16 path for these graphs). Other backends: every
# precision the device lists.
BACKEND_PRECISIONS = {"ort-cpu": ("fp32", "int8"), "ort-cuda": ("fp32", "fp16", "int8")}


@dataclasses.dataclass
class Device:
    """One catalogue entry: peaks in tera-operations/s per precision, bandwidth in GB/s."""

    name: str
    kind: str
    backend: str
    tops: dict[str, float]
    memory_gbps: float
    memory_gb: float
    price_per_hour: float | None
    source: str
    price_source: str = ""
    checked: bool = False
    caches: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (bytes, GB/s)
    here: bool = False  # the machine advise runs on
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def load_catalogue(extra: str | Path | None = None, host: bool = True) -> list[Device]:
    """The shipped devices, then ``extra``'s (same name replaces), then this machine's CPU. Every
    field of every entry is checked here; a bad one raises CatalogueError naming file and entry."""
    families, entries = _read_catalogue(CATALOGUE)
    if extra is not None:
        more_families, more_entries = _read_catalogue(Path(extra))
        families.update(more_families)
        entries.update(more_entries)
    devices = [_device(entry, families, where) for entry, where in entries.values()]
    if host:
        local = host_device(families)
        if local is not None:
            devices.append(local)
    return devices


# Sane physical ceilings for catalogue figures: far above any single device built (the largest, a
# wafer-scale engine, claims 125 POPS and 21 PB/s on chip), far below where the arithmetic
# overflows. The floors keep every bound finite. A figure outside them is a unit slip.
TOPS_RANGE = (1e-6, 1e6)  # tera-operations/s per precision: 1 MOPS .. 1 EOPS
GBPS_RANGE = (1e-3, 1e8)  # GB/s: 1 MB/s .. 100 PB/s
MEMORY_GB_RANGE = (1e-6, 1e7)  # GB: 1 kB .. 10 PB
MAX_PRICE = 1e6  # USD per device-hour; a price, where given, is > 0
KINDS = ("cpu", "gpu", "tpu", "fpga")
HOST = "this-cpu"  # the machine advise runs on; no catalogue entry may take its name
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")

Check = Callable[[Any], str | None]  # what is wrong with a value (appended to its field), or None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _scalar(test: Callable[[Any], bool], wanted: str) -> Check:
    return lambda value: None if test(value) else f" = {_show(value)}: must be {wanted}"


def _number(low: float, high: float, *, integer: bool = False, above: bool = False) -> Check:
    """A TOML number (an integer where ``integer``; never a bool), finite, in [low, high] (or
    (low, high] where ``above``)."""
    types = int if integer else (int, float)

    def test(v: Any) -> bool:
        return (isinstance(v, types) and not isinstance(v, bool) and math.isfinite(v)
                and (v > low if above else v >= low) and v <= high)

    span = f"{'(' if above else '['}{low:g}, {high:g}]"
    return _scalar(test, f"{'an integer' if integer else 'a number'} in {span}")


def _table_of(keys: tuple[str, ...], inner: Check) -> Check:
    """A TOML table with at least one of ``keys`` (and no other), each value passing ``inner``."""
    def check(value: Any) -> str | None:
        if not isinstance(value, dict) or not value:
            return f" = {_show(value)}: must be a table of {', '.join(keys)}"
        for key, item in value.items():
            if key not in keys:
                return f": unknown key {_show(key)}; valid: {', '.join(keys)}"
            problem = inner(item)
            if problem:
                return f".{key}{problem}"
        return None

    return check


_IDENT = _scalar(lambda v: isinstance(v, str) and _NAME.fullmatch(v) is not None,
                 "1-64 letters, digits, '.', '_', '+' or '-', starting with a letter or digit")
_TEXT = _scalar(lambda v: isinstance(v, str), "a string")
_FLAG = _scalar(lambda v: isinstance(v, bool), "true or false")
_STRINGS = _scalar(lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
                   "a list of strings")
_GHZ = _number(0, 10, above=True)
_DEVICE_FIELDS: dict[str, Check] = {
    "name": _IDENT, "kind": _scalar(lambda v: v in KINDS, f"one of {', '.join(KINDS)}"),
    "backend": _IDENT, "tops": _table_of(tuple(BITS), _number(*TOPS_RANGE)),
    "memory_gbps": _number(*GBPS_RANGE), "memory_gb": _number(*MEMORY_GB_RANGE),
    "price_per_hour": _number(0, MAX_PRICE, above=True),
    "source": _TEXT, "price_source": _TEXT, "checked": _FLAG,
    # A cloud CPU instance: its peaks are its cpu_family's at `cores` and `boost_ghz`.
    "family": _IDENT, "cores": _number(1, 1e5, integer=True), "boost_ghz": _GHZ,
    # An FPGA: what its int8 peak is computed from.
    "dsp": _number(1, 1e8, integer=True), "bram18": _number(1, 1e8, integer=True),
    "clock_mhz": _number(0, 1e4, above=True),
}
_FAMILY_FIELDS: dict[str, Check] = {
    "name": _IDENT, "vendor": _TEXT, "match": _STRINGS, "absent": _STRINGS,
    "ops_per_cycle": _table_of(tuple(BITS), _number(0, 1e5, above=True)), "boost_ghz": _GHZ,
    "cache_bytes_per_cycle": _table_of(("l2", "l3"), _number(0, 1e5, above=True)),
    "source": _TEXT, "checked": _FLAG,
}
_FIELDS = {"name", "kind", "backend", "tops", "memory_gbps", "memory_gb", "price_per_hour",
           "source", "price_source", "checked"}  # the Device's own; the rest go to its `extra`


def _read_catalogue(path: Path) -> tuple[dict[str, dict], dict[str, tuple[dict, str]]]:
    """One catalogue file's checked cpu families (name -> table) and devices (name -> (table,
    where it came from)); each field is checked, a device's cross-field rules in ``_device``."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogueError(f"{path}: cannot read the device catalogue ({exc.strerror})") from exc
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CatalogueError(f"{path}: not a TOML device catalogue ({exc})") from exc
    unknown = sorted(set(data) - {"device", "cpu_family"})
    if unknown:
        raise CatalogueError(f"{path}: unknown key {_show(unknown[0])}; a device catalogue holds "
                             "[[device]] and [[cpu_family]] tables")
    families = _entries(path, data, "cpu_family", _FAMILY_FIELDS,
                        ("match", "ops_per_cycle", "boost_ghz", "source"))
    return {name: table for name, (table, _) in families.items()}, _entries(
        path, data, "device", _DEVICE_FIELDS, ())


def _entries(path: Path, data: dict[str, Any], key: str, fields: dict[str, Check],
             required: tuple[str, ...]) -> dict[str, tuple[dict, str]]:
    tables = data.get(key, [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise CatalogueError(f"{path}: {key} must be a list of [[{key}]] tables")
    out: dict[str, tuple[dict, str]] = {}
    for i, table in enumerate(tables, 1):
        problem = _IDENT(table.get("name"))
        if problem:
            raise CatalogueError(f"{path}: [[{key}]] #{i}: name{problem}")
        where = f"{path}: {key.replace('_', ' ')} {table['name']!r}"
        if table["name"] in out:
            raise CatalogueError(f"{where}: named twice in this file")
        missing = [f for f in required if f not in table]
        if missing:
            raise CatalogueError(f"{where}: lacks {', '.join(missing)}")
        for field, value in table.items():
            check = fields.get(field)
            if check is None:
                raise CatalogueError(f"{where}: unknown field {_show(field)}; valid: {', '.join(fields)}")
            problem = check(value)
            if problem:
                raise CatalogueError(f"{where}: {field}{problem}")
        out[table["name"]] = (table, where)
    return out


def _device(entry: dict[str, Any], families: dict[str, dict], where: str) -> Device:
    """A Device from a field-checked entry: its peaks given (``tops``) or from its cpu family."""
    entry = dict(entry)
    if entry["name"] == HOST:
        raise CatalogueError(f"{where}: the name {HOST!r} is the machine advise runs on; choose another")
    if "tops" in entry and "family" in entry:
        raise CatalogueError(f"{where}: give tops or family (a CPU instance), not both")
    family = entry.get("family")
    if family is not None:
        if family not in families:
            raise CatalogueError(f"{where}: unknown cpu_family {family!r}; known: {', '.join(families)}")
        if "cores" not in entry:
            raise CatalogueError(f"{where}: lacks cores (its peaks are cores x boost_ghz x its "
                                 "cpu_family's ops_per_cycle)")
        ghz = entry.get("boost_ghz", families[family]["boost_ghz"])  # the instance's own clock
        entry["tops"] = _cpu_tops(families[family], entry["cores"], ghz)
        problem = _DEVICE_FIELDS["tops"](entry["tops"])
        if problem:
            raise CatalogueError(f"{where}: tops (from cpu_family {family!r}){problem}")
    missing = [f for f in ("kind", "tops", "memory_gbps", "memory_gb") if f not in entry]
    if missing:
        raise CatalogueError(f"{where}: lacks {', '.join(missing)}")
    entry.setdefault("price_per_hour", None)  # unpriced: ranked after the priced
    entry.setdefault("source", "")
    entry.setdefault("backend", "")
    return Device(**{k: v for k, v in entry.items() if k in _FIELDS},
                  extra={k: v for k, v in entry.items() if k not in _FIELDS})


def _cpu_tops(family: dict, cores: int, ghz: float) -> dict[str, float]:
    return {p: cores * ghz * ops / 1e3 for p, ops in family["ops_per_cycle"].items()}


def cpu_flags() -> tuple[str, set[str], dict[str, int]]:
    """Vendor, feature flags and cache sizes (bytes: l2 total, l3) of this machine's CPU."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    vendor, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id" and not vendor:
            vendor = value.strip()
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
    caches = {}
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(root.glob("index*")) if root.exists() else []:
        level = (index / "level").read_text().strip()
        size = (index / "size").read_text().strip()
        kind = (index / "type").read_text().strip()
        if kind == "Instruction" or not size.endswith("K"):
            continue
        caches[f"l{level}"] = int(size[:-1]) * 1024
    return vendor, flags, caches


def host_device(families: dict[str, dict]) -> Device | None:
    """This machine's CPU: the first family its vendor and flags match, at the family's boost
    clock on ``os.cpu_count()`` cores, with cache levels and a measured memory bandwidth."""
    vendor, flags, caches = cpu_flags()
    family = next((f for f in families.values()
                   if f.get("vendor", "") in ("", vendor) and set(f["match"]) <= flags
                   and not set(f.get("absent", [])) & flags), None)
    if family is None:
        return None
    cores = os.cpu_count() or 1
    ghz = family["boost_ghz"]
    per_cycle = family.get("cache_bytes_per_cycle", {})
    levels = []
    if "l2" in caches and "l2" in per_cycle:
        levels.append((caches["l2"] * cores, cores * per_cycle["l2"] * ghz))
    if "l3" in caches and "l3" in per_cycle:
        levels.append((caches["l3"], cores * per_cycle["l3"] * ghz))
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return Device(
        name=HOST, kind="cpu", backend="ort-cpu",
        tops=_cpu_tops(family, cores, ghz), memory_gbps=measure_bandwidth(cores),
        memory_gb=round(memory_gb, 1), price_per_hour=None,
        source=f"detected: {vendor}, flags {', '.join(sorted(set(family['match'])))}, {cores} "
               f"cores; per-cycle peaks and {ghz} GHz boost from cpu_family {family['name']!r} "
               f"({family['source']}); memory bandwidth measured (copy, {cores} threads)",
        caches=levels, here=True)


def measure_bandwidth(threads: int, megabytes: int = 256, repeat: int = 7) -> float:
    """DRAM bandwidth in GB/s on ``threads`` threads, each over its own ``megabytes / threads``
    and timed on its own (a thread that starts late does not dilute the others): the fastest of a
    copy (three times its size moves: read, read for ownership, write), an in-place scale (twice:
    read, write back) and a sum (once), best of ``repeat``. The fastest pattern is kept because the
    bound needs what a kernel can reach, not what numpy's copy does."""
    n = megabytes * 2**20 // 8 // threads
    pairs = [(np.ones(n), np.empty(n)) for _ in range(threads)]
    kernels = {3: lambda p: np.copyto(p[1], p[0]), 2: lambda p: np.multiply(p[0], 1.0, out=p[0]),
               1: lambda p: np.add.reduce(p[0])}

    def timed(kernel, pair) -> float:
        start = time.perf_counter()
        kernel(pair)
        return time.perf_counter() - start

    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for moved, kernel in kernels.items():
            for _ in range(repeat):
                seconds = list(pool.map(lambda p, k=kernel: timed(k, p), pairs))
                best = max(best, sum(moved * n * 8 / s for s in seconds) / 1e9)
    return round(best, 1)


@dataclasses.dataclass
class LayerBound:
    node: str
    op_type: str
    ops: float
    bytes: float
    seconds: float
    bound_by: str  # "compute" or the memory level

    @property
    def intensity(self) -> float:
        return self.ops / self.bytes if self.bytes else 0.0


def layer_bounds(costs: list[LayerMacs], device: Device, precision: str) -> list[LayerBound] | None:
    """Each layer's roofline time on ``device`` at ``precision``; None if the device lacks it."""
    allowed = BACKEND_PRECISIONS.get(device.backend, tuple(device.tops))
    if precision not in device.tops or precision not in allowed:
        return None
    float_peak = device.tops.get("fp32") or max(device.tops.values())
    rows = []
    for c in costs:
        matrix = c.op_type in _MATRIX and c.macs > 0
        scale = BITS[precision] / 32 if matrix else 1.0
        ops = 2.0 * c.macs if matrix else float(c.write_bytes) / 4
        moved = _traffic(c) * scale
        peak = device.tops[precision] if matrix else float_peak
        compute = ops / (peak * 1e12)
        level, bandwidth = "memory", device.memory_gbps
        # The fastest level this layer's own data fits in: its inputs were just written by the
        # layers before it, so a cache that can hold them may still hold them, and an elementwise
        # op may write over its input (onnxruntime reuses buffers), so the footprint is the
        # larger side. Optimistic on purpose: the bound must stay a lower bound.
        footprint = (2 * c.write_bytes if c.op_type in _SELECTS
                     else max(c.weight_bytes + c.read_bytes, c.write_bytes)) * scale
        for size, gbps in device.caches:
            if footprint <= size:
                level, bandwidth = f"cache {size // 1024} KiB", gbps
                break
        memory = moved / (bandwidth * 1e9)
        rows.append(LayerBound(c.node, c.op_type, ops, moved, max(compute, memory),
                               "compute" if compute >= memory else level))
    return rows


# Ops whose output is a view of their input (or only its shape): no element is read or written.
_VIEWS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Size"})
# Ops that read only the elements they write (a row of an embedding table, a slice).
_SELECTS = frozenset({"Gather", "GatherElements", "GatherND", "Slice"})


def _traffic(c: LayerMacs) -> float:
    """Bytes a layer must move: a view moves none; a selection (Gather from an embedding table,
    Slice) reads only what it writes."""
    if c.op_type in _VIEWS:
        return 0.0
    if c.op_type in _SELECTS:
        return float(2 * c.write_bytes)
    return float(c.bytes)


@dataclasses.dataclass
class Choice:
    device: Device
    precision: str
    bound_ms: float
    predicted_ms: float
    basis: str  # "measured", "calibrated on <device>", "bound only"
    batch: int
    fits: bool
    measured_ms: float | None = None
    efficiency: float | None = None

    @property
    def throughput(self) -> float | None:
        """Samples per second; None for a model whose bound is zero (no work the counts see)."""
        return self.batch / (self.predicted_ms / 1e3) if self.predicted_ms > 0 else None

    @property
    def cost_per_million(self) -> float | None:
        if self.device.price_per_hour is None:
            return None
        return self.device.price_per_hour / 3600 * self.predicted_ms / 1e3 / self.batch * 1e6

    def meets(self, slo_ms: float | None) -> bool | None:
        return None if slo_ms is None else self.predicted_ms <= slo_ms

    def to_json(self, slo_ms: float | None = None) -> dict[str, Any]:
        return {"device": self.device.name, "kind": self.device.kind,
                "backend": self.device.backend, "precision": self.precision,
                "bound_ms": self.bound_ms, "predicted_ms": self.predicted_ms,
                "measured_ms": self.measured_ms, "efficiency": self.efficiency,
                "basis": self.basis, "throughput_per_s": self.throughput,
                "cost_per_million": self.cost_per_million, "fits_memory": self.fits,
                "meets_slo": self.meets(slo_ms), "price_source": self.device.price_source,
                "source": self.device.source, "checked": self.device.checked}


def footprint_bytes(costs: list[LayerMacs], precision: str) -> float:
    """Weights at ``precision`` plus the largest layer's activations (a lower bound on memory)."""
    scale = BITS[precision] / 32
    return sum(c.weight_bytes for c in costs) * scale + max(
        (c.read_bytes + c.write_bytes for c in costs), default=0)


def rank(choices: list[Choice], slo_ms: float | None) -> list[Choice]:
    """Those that fit and meet the SLO first, each group cheapest first (unpriced last)."""
    def key(c: Choice):
        cost = c.cost_per_million
        return (not c.fits, c.meets(slo_ms) is False, cost is None, cost or 0.0, c.predicted_ms)

    return sorted(choices, key=key)


def choices_for(costs: list[LayerMacs], devices: list[Device], precisions: list[str], batch: int,
                measured: dict[tuple[str, str], float] | None = None) -> list[Choice]:
    """Every (device, precision) the device supports, bounded, then calibrated by ``measured``
    ({(device name, precision): ms}) where measured, and scaled by that kind's efficiency where not."""
    measured = measured or {}
    out = []
    for device in devices:
        for precision in precisions:
            bounds = layer_bounds(costs, device, precision)
            if bounds is None:
                continue
            bound_ms = sum(b.seconds for b in bounds) * 1e3
            fits = footprint_bytes(costs, precision) <= device.memory_gb * 1e9
            out.append(Choice(device, precision, bound_ms, bound_ms, "bound only", batch, fits))
    efficiencies: dict[str, tuple[float, str]] = {}
    for c in out:
        ms = measured.get((c.device.name, c.precision))
        if ms is not None:
            c.measured_ms, c.predicted_ms, c.basis = ms, ms, "measured"
            c.efficiency = c.bound_ms / ms
            if c.efficiency > 0:  # a zero bound scales nothing
                efficiencies.setdefault(c.device.kind, (c.efficiency, c.device.name))
    for c in out:
        if c.basis == "bound only" and c.device.kind in efficiencies:
            efficiency, where = efficiencies[c.device.kind]
            c.efficiency = efficiency
            c.predicted_ms = c.bound_ms / efficiency
            c.basis = f"scaled by {where}"
    return out


@dataclasses.dataclass
class Advice:
    model: str
    batch: int
    slo_ms: float | None
    ranked: list[Choice]
    layers: dict[str, list[LayerBound]]  # "device/precision" -> bounds, for the plot
    costs: list[LayerMacs]
    # This CPU at fp32, per node: onnxruntime's profiler (graph optimisations off, so every node
    # runs as itself) beside the node's bound; empty without a measurement.
    host_layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def below_bound(self) -> list[dict[str, Any]]:
        """Layers measured faster than their bound: each one says the bound is wrong."""
        return [r for r in self.host_layers
                if r["measured_ms"] is not None and r["measured_ms"] < r["bound_ms"]]

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "batch": self.batch, "slo_ms": self.slo_ms,
                "ranking": [c.to_json(self.slo_ms) for c in self.ranked],
                "layers": [c.to_json() for c in self.costs], "host_layers": self.host_layers,
                "host_layers_below_bound": len(self.below_bound)}

    def dumps(self) -> str:
        """advise.json's text: strict JSON, so a NaN or an infinity raises instead of being written."""
        return json.dumps(self.to_json(), indent=2, sort_keys=True, allow_nan=False) + "\n"


def lent_gpu(catalogue: list[Device]) -> Device | None:
    """The catalogue entry of the NVIDIA GPU on this machine, if onnxruntime can use CUDA and
    ``nvidia-smi`` names a GPU the catalogue has."""
    import shutil
    import subprocess

    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers() or not shutil.which("nvidia-smi"):
        return None
    run = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False)
    return gpu_entry(run.stdout.splitlines()[0] if run.returncode == 0 and run.stdout else "",
                     catalogue)


def gpu_entry(reported: str, catalogue: list[Device]) -> Device | None:
    """The catalogue GPU whose model number (T4, L4, A10, A100, H100, H200) ``reported`` names."""
    words = reported.upper().replace("-", " ").split()
    for device in catalogue:
        parts = device.name.upper().split("-")
        if device.kind == "gpu" and len(parts) > 1 and parts[1] in words:
            return device
    return None


def measure_host(model_bytes: bytes, feed: dict[str, np.ndarray], repeat: int = 50,
                 providers: list[str] | None = None) -> float:
    """p50 ms of onnxruntime here (CPU by default: all cores, default graph optimisations)."""
    from slimgraph.backends.ort import session_for
    from slimgraph.bench.timing import interleaved
    from slimgraph.passes.quantize.calibrate import inputs_of

    session = session_for(model_bytes, providers=providers)
    feed = inputs_of(session, feed)
    return interleaved({"m": lambda: session.run(None, feed)}, warmup=5, repeat=repeat)["m"].p50_ms


def check_request(batch: Any, slo_ms: Any, precisions: list[str] | None) -> list[str]:
    """Refuse a batch below 1, an SLO that is not a finite number of ms > 0, or an unknown
    precision; the precisions asked (all four when none are), each once."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputSpecError(f"advise: batch must be an integer >= 1, got {_show(batch)}")
    if slo_ms is not None and (isinstance(slo_ms, bool) or not isinstance(slo_ms, (int, float))
                               or not math.isfinite(slo_ms) or slo_ms <= 0):
        raise InputSpecError(f"advise: slo_ms must be a finite number of milliseconds > 0, "
                             f"got {_show(slo_ms)}")
    for p in precisions or ():
        if not isinstance(p, str) or p not in BITS:
            raise InputSpecError(f"advise: unknown precision {_show(p)}; valid: {', '.join(BITS)}")
    return list(dict.fromkeys(precisions or BITS))


def advise(model: Any, *, batch: int = 1, slo_ms: float | None = None,
           precisions: list[str] | None = None, devices: str | Path | None = None,
           measure: bool = True, repeat: int = 50) -> Advice:
    """Rank every catalogue device and precision for ``model`` (anything ``slimgraph.load``
    takes, or an artifact directory) at ``batch``; measure fp32 here unless ``measure=False``."""
    import onnx_ir as ir

    import slimgraph
    from slimgraph.calibration import stack_feeds

    precisions = check_request(batch, slo_ms, precisions)
    catalogue = load_catalogue(devices)  # before the model: a bad catalogue fails fast
    path = Path(str(model)) if isinstance(model, (str, Path)) else None
    if path is not None and path.is_dir() and (path / "manifest.json").exists():
        model = path / "model.onnx"
    loaded = slimgraph.load(model)
    ir.passes.common.ShapeInferencePass()(loaded.model)
    costs = layer_costs(loaded.model, batch)
    measured, host_layers = {}, []
    here = next((d for d in catalogue if d.here), None)
    if measure and here is not None and "fp32" in precisions and loaded.calibration:
        feeds = list(loaded.calibration)
        feed = stack_feeds([feeds[i % len(feeds)] for i in range(batch)])
        model_bytes = ir.to_proto(loaded.model).SerializeToString()
        measured[(here.name, "fp32")] = measure_host(model_bytes, feed, repeat)
        host_layers = _host_layers(model_bytes, feed, costs, here, repeat)
        gpu = lent_gpu(catalogue)
        if gpu is not None:
            measured[(gpu.name, "fp32")] = measure_host(model_bytes, feed, repeat,
                                                        ["CUDAExecutionProvider"])
    ranked = rank(choices_for(costs, catalogue, precisions, batch, measured), slo_ms)
    layers = {}
    for c in ranked[:3] + [c for c in ranked if c.device.here]:
        key = f"{c.device.name} / {c.precision}"
        layers.setdefault(key, layer_bounds(costs, c.device, c.precision))
    return Advice(loaded.source.get("name", str(model)), batch, slo_ms, ranked, layers, costs,
                  host_layers)


def _host_layers(model_bytes: bytes, feed: dict[str, np.ndarray], costs: list[LayerMacs],
                 here: Device, runs: int) -> list[dict[str, Any]]:
    from slimgraph.backends.ort import kernel_time_by_node

    per_node = kernel_time_by_node(model_bytes, feed, runs,
                                   {"graph_optimization_level": "disabled"})
    rows = []
    for bound in layer_bounds(costs, here, "fp32"):
        us = per_node.get(bound.node)
        rows.append({"node": bound.node, "op_type": bound.op_type,
                     "bound_ms": bound.seconds * 1e3, "bound_by": bound.bound_by,
                     "measured_ms": None if us is None else us / 1e3,
                     "efficiency": (bound.seconds * 1e6 / us) if us else None})
    return rows


def plot_roofline(advice: Advice, path: Path) -> Path | None:
    """Roofs of the top choices and this CPU, with the layers as points at their bounds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = np.logspace(-4, 4, 200)
    by_name = {f"{c.device.name} / {c.precision}": c for c in advice.ranked}
    for i, (key, bounds) in enumerate(advice.layers.items()):
        choice = by_name[key]
        peak = choice.device.tops[choice.precision] * 1e12
        line = ax.plot(xs, np.minimum(peak, xs * choice.device.memory_gbps * 1e9), "-",
                       linewidth=1.2, label=f"{key} roof")[0]
        if choice.device.caches:  # the fastest cache's roof, dotted
            ax.plot(xs, np.minimum(peak, xs * choice.device.caches[0][1] * 1e9), ":",
                    linewidth=1, color=line.get_color())
        points = [b for b in bounds if b.ops > 0 and b.bytes > 0 and b.seconds > 0]
        ax.scatter([b.intensity for b in points], [b.ops / b.seconds for b in points],
                   s=12, alpha=0.6, color=line.get_color(),
                   marker="os^vD"[i % 5], label=f"{key} layers at their bound")
        if choice.device.here and choice.precision == "fp32" and advice.host_layers:
            measured = {r["node"]: r["measured_ms"] for r in advice.host_layers}
            done = [(b, measured[b.node]) for b in points if measured.get(b.node)]
            ax.scatter([b.intensity for b, _ in done], [b.ops / (ms / 1e3) for b, ms in done],
                       s=14, facecolors="none", edgecolors="black", linewidths=0.6,
                       label=f"{key} layers as measured (profiler)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (operations / byte)")
    ax.set_ylabel("operations / s at the bound")
    # "$" would start matplotlib's mathtext, which fails on text that is not TeX: keep it literal.
    ax.set_title(f"{advice.model}, batch {advice.batch}: roofline".replace("$", r"\$"))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
