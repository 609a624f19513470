"""advise: roofline arithmetic on hand-made numbers, the catalogue and its sources, host
detection, calibration, ranking and the CLI."""

from __future__ import annotations

import json
import tomllib

import pytest

import slimgraph.advise as adv
import slimgraph.advise.host as host_module
from slimgraph.advise import CATALOGUE, Choice, Device, choices_for, layer_bounds, rank
from slimgraph.cli import main
from slimgraph.errors import CatalogueError
from slimgraph.model_stats import LayerMacs


def _device(**kw) -> Device:
    base = dict(name="d", kind="gpu", backend="other", tops={"fp32": 1.0, "int8": 4.0},
                memory_gbps=100.0, memory_gb=1.0, price_per_hour=3.6, source="test")
    return Device(**{**base, **kw})


def test_layer_bound_is_the_slower_of_compute_and_memory():
    # 1e9 MACs = 2e9 ops at 1 TOPS fp32 = 2 ms; 4e6 bytes at 100 GB/s = 0.04 ms: compute-bound.
    gemm = LayerMacs("mm", "MatMul", 10**9, weight_bytes=2 * 10**6, read_bytes=10**6,
                     write_bytes=10**6)
    # An elementwise op on 1e8 bytes: 1e8 / 100e9 = 1 ms of memory, 2.5e7 ops at 1 TOPS = 0.025 ms.
    relu = LayerMacs("r", "Relu", 0, read_bytes=5 * 10**7, write_bytes=5 * 10**7)
    fp32 = layer_bounds([gemm, relu], _device(), "fp32")
    assert fp32[0].seconds == pytest.approx(2e-3) and fp32[0].bound_by == "compute"
    assert fp32[1].seconds == pytest.approx(1e-3) and fp32[1].bound_by == "memory"
    # int8: the matrix op at 4 TOPS and a quarter of its bytes; the Relu stays float.
    int8 = layer_bounds([gemm, relu], _device(), "int8")
    assert int8[0].seconds == pytest.approx(0.5e-3) and int8[0].bytes == pytest.approx(10**6)
    assert int8[1].seconds == pytest.approx(1e-3)
    assert layer_bounds([gemm], _device(), "bf16") is None  # the device lacks it


def test_data_that_fits_a_cache_streams_at_its_bandwidth():
    relu = LayerMacs("r", "Relu", 0, read_bytes=10**6, write_bytes=10**6)
    cached = _device(caches=[(4 * 10**6, 1000.0)])
    assert layer_bounds([relu], cached, "fp32")[0].seconds == pytest.approx(2e6 / 1000e9)
    big = LayerMacs("r", "Relu", 0, read_bytes=10**7, write_bytes=10**7)
    assert layer_bounds([big], cached, "fp32")[0].seconds == pytest.approx(2e7 / 100e9)


def test_backend_limits_the_precisions():
    cpu = _device(backend="ort-cpu", tops={"fp32": 1.0, "bf16": 2.0, "int8": 4.0})
    costs = [LayerMacs("mm", "MatMul", 10**6)]
    assert layer_bounds(costs, cpu, "bf16") is None  # onnxruntime's CPU kernels: fp32 and int8
    assert layer_bounds(costs, cpu, "int8") is not None


def test_every_catalogue_figure_names_its_source():
    data = tomllib.loads(CATALOGUE.read_text())
    names = [d["name"] for d in data["device"]]
    for wanted in ("nvidia-t4", "nvidia-l4", "nvidia-a10", "nvidia-a100-80gb", "nvidia-h100-sxm",
                   "nvidia-h200", "google-tpu-v5e"):
        assert wanted in names
    assert any(d["kind"] == "fpga" and d["dsp"] > 0 and d["bram18"] > 0 for d in data["device"])
    for entry in data["device"]:
        assert entry["source"].startswith("http"), entry["name"]
        assert entry["price_source"].startswith("http"), entry["name"]
        assert isinstance(entry["checked"], bool)
    for family in data["cpu_family"]:
        assert family["source"], family["name"]
    fpga = next(d for d in data["device"] if d["kind"] == "fpga")
    assert fpga["tops"]["int8"] == pytest.approx(fpga["dsp"] * 4 * fpga["clock_mhz"] / 1e6, rel=1e-3)


def test_user_devices_add_and_replace(tmp_path):
    extra = tmp_path / "mine.toml"
    extra.write_text(
        '[[device]]\nname = "nvidia-t4"\nkind = "gpu"\nbackend = "ort-cuda"\n'
        'tops = { fp32 = 1.0 }\nmemory_gbps = 1.0\nmemory_gb = 1.0\nprice_per_hour = 9.0\n'
        'source = "mine"\n\n'
        '[[device]]\nname = "my-box"\nkind = "cpu"\nbackend = "ort-cpu"\nfamily = "x86-avx2"\n'
        'cores = 4\nmemory_gbps = 50.0\nmemory_gb = 32.0\nprice_per_hour = 0.2\nsource = "mine"\n\n'
        '[[device]]\nname = "my-slow-box"\nkind = "cpu"\nbackend = "ort-cpu"\nfamily = "x86-avx2"\n'
        'cores = 4\nboost_ghz = 2.0\nmemory_gbps = 50.0\nmemory_gb = 32.0\nsource = "mine"\n')
    devices = {d.name: d for d in adv.load_catalogue(extra, host=False)}
    assert devices["nvidia-t4"].price_per_hour == 9.0
    # x86-avx2: 32 fp32 ops/cycle/core at the family's 4.0 GHz on 4 cores = 0.512 TOPS.
    assert devices["my-box"].tops["fp32"] == pytest.approx(0.512)
    assert devices["my-slow-box"].tops["fp32"] == pytest.approx(0.256)  # its own clock
    bad = tmp_path / "bad.toml"
    bad.write_text('[[device]]\nname = "x"\nkind = "cpu"\nfamily = "nope"\ncores = 1\n')
    with pytest.raises(CatalogueError, match="unknown cpu_family"):
        adv.load_catalogue(bad, host=False)


def test_host_detection_picks_the_family_its_flags_match(monkeypatch):
    families = {f["name"]: f for f in tomllib.loads(CATALOGUE.read_text())["cpu_family"]}
    monkeypatch.setattr(host_module, "measure_bandwidth", lambda threads: 42.0)
    monkeypatch.setattr(host_module.os, "cpu_count", lambda: 2)
    zen4 = {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"}
    monkeypatch.setattr(host_module, "cpu_flags", lambda: ("AuthenticAMD", zen4, {"l2": 2**20, "l3": 2**25}))
    host = adv.host_device(families)
    assert "amd-zen4" in host.source and host.memory_gbps == 42.0 and host.here
    assert host.tops["fp32"] == pytest.approx(2 * 4.4 * 32 / 1e3)
    assert host.caches == [(2 * 2**20, 2 * 64 * 4.4), (2**25, 2 * 32 * 4.4)]
    monkeypatch.setattr(host_module, "cpu_flags", lambda: ("AuthenticAMD", zen4 | {"avx_vnni"}, {}))
    assert "amd-zen5" in adv.host_device(families).source
    monkeypatch.setattr(host_module, "cpu_flags", lambda: ("GenuineIntel", {"avx2", "fma"}, {}))
    assert "x86-avx2" in adv.host_device(families).source
    monkeypatch.setattr(host_module, "cpu_flags", lambda: ("", {"neon"}, {}))
    assert adv.host_device(families) is None


def test_a_measurement_scales_its_kind_and_leaves_the_others_at_their_bound():
    costs = [LayerMacs("mm", "MatMul", 10**9)]
    here = _device(name="here", kind="cpu", here=True, price_per_hour=None)
    other_cpu = _device(name="cloud-cpu", kind="cpu", tops={"fp32": 2.0, "int8": 8.0})
    gpu = _device(name="gpu", tops={"fp32": 10.0})
    choices = choices_for(costs, [here, other_cpu, gpu], ["fp32", "int8"], 1,
                          {("here", "fp32"): 8.0})  # bound 2 ms, measured 8 ms: efficiency 0.25
    by = {(c.device.name, c.precision): c for c in choices}
    assert by["here", "fp32"].basis == "measured" and by["here", "fp32"].efficiency == 0.25
    assert by["here", "int8"].predicted_ms == pytest.approx(0.5 / 0.25)
    assert by["cloud-cpu", "fp32"].predicted_ms == pytest.approx(1.0 / 0.25)
    assert by["gpu", "fp32"].basis == "bound only"
    assert by["gpu", "fp32"].predicted_ms == pytest.approx(0.2)
    assert ("gpu", "int8") not in by
    # $3.6/h for 0.2 ms per batch of 1: 3.6 / 3600 * 0.2e-3 * 1e6 = $0.20 per million.
    assert by["gpu", "fp32"].cost_per_million == pytest.approx(0.2)


def test_rank_puts_what_fits_and_meets_the_slo_first():
    def choice(name, ms, price, fits=True):
        return Choice(_device(name=name, price_per_hour=price), "fp32", ms, ms, "bound only", 1,
                      fits)

    ranked = rank([choice("slow-cheap", 50, 0.1), choice("fast-dear", 5, 10.0),
                   choice("fast-cheap-too-big", 1, 0.1, fits=False), choice("fast-ok", 8, 1.0)],
                  slo_ms=10)
    assert [c.device.name for c in ranked] == ["fast-ok", "fast-dear", "slow-cheap",
                                               "fast-cheap-too-big"]


def test_measured_latency_is_never_below_the_bound():
    result = adv.advise("digits-cnn", batch=1, precisions=["fp32"], repeat=20)
    here = next(c for c in result.ranked if c.device.here)
    assert here.basis == "measured"
    assert here.measured_ms >= here.bound_ms > 0
    # Per node, from onnxruntime's profiler with the graph as it is: every node matched.
    assert len(result.host_layers) == len(result.costs)
    assert all(r["measured_ms"] is not None for r in result.host_layers)
    assert result.below_bound == []


def test_cli_json_and_plot(tmp_path, capsys, tiny_cnn_path):
    out = tmp_path / "adv"
    assert main(["advise", str(tiny_cnn_path), "--batch", "4", "--slo-ms", "5", "--no-measure",
                 "--precisions", "fp32,int8", "-o", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["batch"] == 4 and {r["precision"] for r in data["ranking"]} <= {"fp32", "int8"}
    assert all(r["basis"] == "bound only" for r in data["ranking"])
    assert (out / "roofline.png").stat().st_size > 0
    assert json.loads((out / "advise.json").read_text())["ranking"] == data["ranking"]
    assert main(["advise", str(tiny_cnn_path), "--precisions", "fp8", "-o", str(out)]) != 0


def test_a_lent_gpu_is_found_in_the_catalogue_by_its_model_number():
    catalogue = adv.load_catalogue(host=False)
    assert adv.gpu_entry("NVIDIA H200", catalogue).name == "nvidia-h200"
    assert adv.gpu_entry("NVIDIA H100 80GB HBM3", catalogue).name == "nvidia-h100-sxm"
    assert adv.gpu_entry("NVIDIA A100-SXM4-80GB", catalogue).name == "nvidia-a100-80gb"
    assert adv.gpu_entry("Tesla T4", catalogue).name == "nvidia-t4"
    assert adv.gpu_entry("NVIDIA GeForce RTX 4090", catalogue) is None
