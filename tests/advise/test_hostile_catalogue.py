"""Hostile device catalogues (`advise --devices`) and advise options: each is refused in one line
naming the file, the device and the field, with exit code 2 and nothing written."""

from __future__ import annotations

import copy
import json
import math
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest
from conftest import make_tiny_cnn

import slimgraph.advise as adv
import slimgraph.advise.host as host_module
from slimgraph.cli import main
from slimgraph.errors import CatalogueError

SHIPPED = tomllib.loads(adv.CATALOGUE.read_text())
GPU = next(d for d in SHIPPED["device"] if d["name"] == "nvidia-t4")
CPU = next(d for d in SHIPPED["device"] if d.get("family"))
FPGA = next(d for d in SHIPPED["device"] if d["kind"] == "fpga")
FAMILY = SHIPPED["cpu_family"][0]


def _toml(value: Any) -> str:
    """The few TOML values a catalogue holds, NaN and infinities included."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml, value)) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"


def _catalogue(devices: list[dict], families: list[dict] = ()) -> str:
    tables = [("cpu_family", f) for f in families] + [("device", d) for d in devices]
    return "\n".join(f"[[{kind}]]\n" + "".join(f"{json.dumps(k)} = {_toml(v)}\n" for k, v in t.items())
                     for kind, t in tables)


def _set(base: dict, field: str, value: Any, family: dict | None = None) -> Callable[[], str]:
    """A catalogue of ``base`` with ``field`` set to ``value`` (deleted where value is ...);
    a dotted field reaches into a table (``tops.fp32``)."""
    def build() -> str:
        entry = copy.deepcopy(base)
        *path, last = field.split(".")
        target = entry
        for key in path:
            target = target[key]
        if value is ...:
            del target[last]
        else:
            target[last] = value
        return _catalogue([entry], [family] if family else [])

    return build


def _family(field: str, value: Any, **device: Any) -> Callable[[], str]:
    """A catalogue whose cpu family (used by one device, with ``device``'s fields) has ``field``
    set to ``value``."""
    def build() -> str:
        family = {**copy.deepcopy(FAMILY), "name": "my-family"}
        family[field] = value
        return _catalogue([{**CPU, "name": "my-box", "family": "my-family", **device}], [family])

    return build


NAN, INF = float("nan"), float("inf")
# name -> (catalogue text builder, the device or family the message names, fragment of the message)
DEVICE_CASES: dict[str, tuple[Callable[[], str], str, str]] = {
    "negative price": (_set(GPU, "price_per_hour", -0.5), "nvidia-t4", "price_per_hour = -0.5"),
    "zero price": (_set(GPU, "price_per_hour", 0.0), "nvidia-t4", "price_per_hour = 0.0"),
    "nan price": (_set(GPU, "price_per_hour", NAN), "nvidia-t4", "price_per_hour = nan"),
    "infinite price": (_set(GPU, "price_per_hour", INF), "nvidia-t4", "price_per_hour = inf"),
    "price as text": (_set(GPU, "price_per_hour", "0.5"), "nvidia-t4", "price_per_hour = '0.5'"),
    "nan peak": (_set(GPU, "tops.fp32", NAN), "nvidia-t4", "tops.fp32 = nan"),
    "zero peak": (_set(GPU, "tops.int8", 0.0), "nvidia-t4", "tops.int8 = 0.0"),
    "negative peak": (_set(GPU, "tops.fp16", -65.0), "nvidia-t4", "tops.fp16 = -65.0"),
    "huge peak": (_set(GPU, "tops.fp32", 1e300), "nvidia-t4", "tops.fp32 = 1e+300"),
    "tiny peak": (_set(GPU, "tops.fp32", 1e-300), "nvidia-t4", "tops.fp32 = 1e-300"),
    "peak is a bool": (_set(GPU, "tops.fp32", True), "nvidia-t4", "tops.fp32 = True"),
    "unknown precision": (_set(GPU, "tops.fp8", 100.0), "nvidia-t4", "unknown key 'fp8'"),
    "no peaks": (_set(GPU, "tops", {}), "nvidia-t4", "tops = {}"),
    "peaks not a table": (_set(GPU, "tops", 8.1), "nvidia-t4", "tops = 8.1"),
    "no peaks at all": (_set(GPU, "tops", ...), "nvidia-t4", "lacks tops"),
    "zero bandwidth": (_set(GPU, "memory_gbps", 0.0), "nvidia-t4", "memory_gbps = 0.0"),
    "nan bandwidth": (_set(GPU, "memory_gbps", NAN), "nvidia-t4", "memory_gbps = nan"),
    "negative infinite bandwidth": (_set(GPU, "memory_gbps", -INF), "nvidia-t4", "memory_gbps = -inf"),
    "huge bandwidth": (_set(GPU, "memory_gbps", 1e200), "nvidia-t4", "memory_gbps = 1e+200"),
    "bandwidth as text": (_set(GPU, "memory_gbps", "fast"), "nvidia-t4", "memory_gbps = 'fast'"),
    "no bandwidth": (_set(GPU, "memory_gbps", ...), "nvidia-t4", "lacks memory_gbps"),
    "zero memory": (_set(GPU, "memory_gb", 0), "nvidia-t4", "memory_gb = 0"),
    "negative memory": (_set(GPU, "memory_gb", -16.0), "nvidia-t4", "memory_gb = -16.0"),
    "memory is a list": (_set(GPU, "memory_gb", [16.0]), "nvidia-t4", "memory_gb = [16.0]"),
    "no kind": (_set(GPU, "kind", ...), "nvidia-t4", "lacks kind"),
    "unknown kind": (_set(GPU, "kind", "quantum"), "nvidia-t4", "kind = 'quantum'"),
    "kind is a number": (_set(GPU, "kind", 3), "nvidia-t4", "kind = 3"),
    "backend with spaces": (_set(GPU, "backend", "ort cuda; rm"), "nvidia-t4", "backend = 'ort cuda; rm'"),
    "source is a number": (_set(GPU, "source", 7), "nvidia-t4", "source = 7"),
    "checked is text": (_set(GPU, "checked", "yes"), "nvidia-t4", "checked = 'yes'"),
    "misspelt field": (_set(GPU, "memory_gbs", 320.0), "nvidia-t4", "unknown field 'memory_gbs'"),
    "peaks and family": (_set(GPU, "family", "amd-zen4"), "nvidia-t4", "not both"),
    "name is markup": (_set(GPU, "name", "[bold]t4[/]"), "[[device]] #1", "name = '[bold]t4[/]'"),
    "name is a dollar sign": (_set(GPU, "name", "$\\frac$"), "[[device]] #1", "name = "),
    "empty name": (_set(GPU, "name", ""), "[[device]] #1", "name = ''"),
    "long name": (_set(GPU, "name", "x" * 500), "[[device]] #1", "..."),
    "name is a number": (_set(GPU, "name", 4), "[[device]] #1", "name = 4"),
    "no name": (_set(GPU, "name", ...), "[[device]] #1", "name = None"),
    "the host's name": (_set(GPU, "name", adv.HOST), adv.HOST, "the machine advise runs on"),
    "zero cores": (_set(CPU, "cores", 0), CPU["name"], "cores = 0"),
    "fractional cores": (_set(CPU, "cores", 1.5), CPU["name"], "cores = 1.5"),
    "no cores": (_set(CPU, "cores", ...), CPU["name"], "lacks cores"),
    "nan clock": (_set(CPU, "boost_ghz", NAN), CPU["name"], "boost_ghz = nan"),
    "absurd clock": (_set(CPU, "boost_ghz", 5e3), CPU["name"], "boost_ghz = 5000.0"),
    "unknown family": (_set(CPU, "family", "nope"), CPU["name"], "unknown cpu_family 'nope'"),
    "peaks past the ceiling": (_family("ops_per_cycle", {"fp32": 9e4}, cores=100_000), "my-box",
                               "tops (from cpu_family 'my-family').fp32 = "),
    "negative dsp count": (_set(FPGA, "dsp", -9024), FPGA["name"], "dsp = -9024"),
    "nan fpga clock": (_set(FPGA, "clock_mhz", NAN), FPGA["name"], "clock_mhz = nan"),
    "family: nan ops": (_family("ops_per_cycle", {"fp32": NAN}), "my-family", "ops_per_cycle.fp32 = nan"),
    "family: zero clock": (_family("boost_ghz", 0), "my-family", "boost_ghz = 0"),
    "family: match is text": (_family("match", "avx2"), "my-family", "match = 'avx2'"),
    "family: unknown cache": (_family("cache_bytes_per_cycle", {"l4": 8}), "my-family", "unknown key 'l4'"),
    "family: misspelt field": (_family("boost_mhz", 4000), "my-family", "unknown field 'boost_mhz'"),
}


def _twice() -> str:
    return _catalogue([GPU, GPU])


FILE_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "not toml": (lambda p: p.write_text("[[device]\nname = "), "not a TOML device catalogue"),
    "not utf-8": (lambda p: p.write_bytes(b"\xff\xfe[[device]]\x81"), "not a TOML device catalogue"),
    "missing": (lambda p: None, "cannot read the device catalogue"),
    "a folder": (lambda p: p.mkdir(), "cannot read the device catalogue"),
    "device is a number": (lambda p: p.write_text("device = 5\n"), "must be a list of [[device]]"),
    "devices are numbers": (lambda p: p.write_text("device = [1, 2]\n"), "must be a list of [[device]]"),
    "unknown table": (lambda p: p.write_text("[[gpu]]\nname = 'x'\n"), "unknown key 'gpu'"),
    "a device twice": (lambda p: p.write_text(_twice()), "named twice"),
}


@pytest.fixture(autouse=True)
def _no_bandwidth_run(monkeypatch):
    """The host's measured bandwidth is not what these tests are about: skip the seconds it takes."""
    monkeypatch.setattr(host_module, "measure_bandwidth", lambda threads: 20.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    onnx.save_model(make_tiny_cnn(), path)
    return path


def _one_line(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    text = str(exc.value)
    assert "\n" not in text and text.strip(), text
    for fragment in fragments:
        assert fragment in text, (fragment, text)


def test_the_shipped_catalogue_passes_its_own_checks():
    names = {d.name for d in adv.load_catalogue(host=False)}
    assert {d["name"] for d in SHIPPED["device"]} == names


def test_the_generator_writes_a_catalogue_the_loader_takes(tmp_path):
    path = tmp_path / "same.toml"
    path.write_text(_catalogue([GPU, CPU, FPGA], [{**FAMILY, "name": "my-family"}]))
    devices = {d.name: d for d in adv.load_catalogue(path, host=False)}
    assert devices["nvidia-t4"].tops == GPU["tops"]


@pytest.mark.parametrize("case", DEVICE_CASES)
def test_hostile_device_is_refused_naming_file_device_and_field(tmp_path, case):
    build, device, fragment = DEVICE_CASES[case]
    path = tmp_path / "mine.toml"
    path.write_text(build())
    with pytest.raises(CatalogueError) as exc:
        adv.load_catalogue(path, host=False)
    _one_line(exc, f"{path}: ", device, fragment)


@pytest.mark.parametrize("case", FILE_CASES)
def test_hostile_catalogue_file_is_refused_naming_it(tmp_path, case):
    build, fragment = FILE_CASES[case]
    path = tmp_path / "mine.toml"
    build(path)
    with pytest.raises(CatalogueError) as exc:
        adv.load_catalogue(path, host=False)
    _one_line(exc, f"{path}: ", fragment)


def _refused(argv: list[str], capsys, out: Path, *fragments: str) -> None:
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


@pytest.mark.parametrize("case", ["negative price", "nan peak", "name is markup"])
def test_cli_refuses_a_hostile_catalogue_before_writing(tiny, tmp_path, capsys, case):
    build, device, fragment = DEVICE_CASES[case]
    path, out = tmp_path / "mine.toml", tmp_path / "adv"
    path.write_text(build())
    _refused(["advise", str(tiny), "--devices", str(path), "--no-measure", "-o", str(out)],
             capsys, out, str(path), device, fragment)


@pytest.mark.parametrize("flag, value, fragment", [
    ("--batch", "0", "batch must be an integer >= 1, got 0"),
    ("--batch", "-4", "batch must be an integer >= 1, got -4"),
    ("--slo-ms", "nan", "slo_ms must be a finite number"),
    ("--slo-ms", "inf", "got inf"),
    ("--slo-ms", "-5", "got -5.0"),
    ("--slo-ms", "0", "got 0.0"),
    ("--precisions", "fp32,fp8", "unknown precision 'fp8'"),
    ("--precisions", "FP16", "unknown precision 'FP16'"),
])
def test_cli_refuses_hostile_advise_options(tiny, tmp_path, capsys, flag, value, fragment):
    out = tmp_path / "adv"
    _refused(["advise", str(tiny), flag, value, "--no-measure", "-o", str(out)], capsys, out,
             fragment)


def test_advise_writes_strict_json_through_a_staged_folder(tiny, tmp_path, capsys):
    mine = tmp_path / "mine.toml"
    mine.write_text(_catalogue([{**GPU, "name": "my-gpu", "price_per_hour": 0.01}]))
    out = tmp_path / "adv"
    argv = ["advise", str(tiny), "--devices", str(mine), "--no-measure", "--precisions", "fp32",
            "-o", str(out), "--quiet"]
    assert main(argv) == 0

    def refuse(constant: str) -> None:
        raise AssertionError(f"advise.json holds {constant}")

    data = json.loads((out / "advise.json").read_text(), parse_constant=refuse)
    assert data["ranking"][0]["device"] == "my-gpu"  # the cheapest, at a positive price
    assert sorted(p.name for p in out.iterdir()) == ["advise.json", "roofline.png"]
    capsys.readouterr()
    assert main(argv) == 2 and "exists; pass --force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".adv.")] == []


def test_a_failed_write_leaves_nothing(tiny, tmp_path, monkeypatch):
    def broken_plot(advice, path):
        path.write_bytes(b"half a png")
        raise RuntimeError("disk full")

    monkeypatch.setattr(adv, "plot_roofline", broken_plot)
    out = tmp_path / "adv"
    with pytest.raises(RuntimeError, match="disk full"):
        main(["advise", str(tiny), "--no-measure", "--precisions", "fp32", "-o", str(out)])
    assert list(tmp_path.iterdir()) == []  # neither OUT nor its staging sibling


def test_a_nan_can_never_reach_advise_json():
    device = adv.Device("d", "gpu", "other", {"fp32": 1.0}, 1.0, 1.0, 1.0, "test")
    choice = adv.Choice(device, "fp32", math.nan, math.nan, "bound only", 1, True)
    advice = adv.Advice("m", 1, None, [choice], {}, [])
    with pytest.raises(ValueError, match="JSON compliant"):
        advice.dumps()
