"""hls4ml 1.3.0 as a benchmark peer on slimgraph's built-in "digits-cnn" and "mlp".

hls4ml is benchmark-only and NOT a slimgraph dependency. Install into the venv with:

    .venv/bin/pip install hls4ml==1.3.0   # pulls h5py, pyDigitalWaveTools==1.1, quantizers; no torch/TF
    .venv/bin/pip install qonnx==1.0.0    # optional: only for the qonnx route in int8_qdq()

measure() converts the float torch module with the PyTorch frontend (Vitis backend,
granularity="model" so weights, biases, accumulators and results all use `precision`),
builds the C simulation with g++ (compile()) and runs it over the held-out split.
Channels: io_parallel uses ChannelsLastConversion="full" (hls4ml inserts the input
transpose, so NCHW is fed); io_stream cannot do that, so it uses "internal" and NHWC is fed.
Run `python benchmarks/hls4ml_peer.py` to print all results as JSON (stdout only).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimgraph.frontend.builtin import get_builtin

DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "hls4ml_peer"


def _data(name: str) -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
    b = get_builtin(name)
    ev = b.evaluation()
    key = next(iter(ev.feeds[0]))
    x = np.concatenate([f[key] for f in ev.feeds]).astype(np.float32)
    return b.module.eval(), np.ascontiguousarray(x), np.concatenate(ev.labels)


def _bytes(root: Path, skip: tuple[str, ...] = ()) -> int:
    return sum(
        p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and p.suffix not in (".so", ".o") and not any(s in p.parts for s in skip)
    )


def _scores(y: np.ndarray, ref: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    y = np.asarray(y, dtype=np.float32).reshape(ref.shape)
    return {
        "csim_accuracy": float((y.argmax(1) == labels).mean()),
        "agreement_with_float": float((y.argmax(1) == ref.argmax(1)).mean()),
        "max_abs_logit_diff": float(np.abs(y - ref).max()),
    }


def measure(
    name: str,
    precision: str = "ap_fixed<16,6>",
    io_type: str = "io_parallel",
    workdir: Path = DEFAULT_WORKDIR,
) -> dict[str, Any]:
    """Convert + csim one built-in model; never raises (failures land in "error")."""
    res: dict[str, Any] = {"model": name, "precision": precision, "io_type": io_type, "error": None}
    try:
        import hls4ml

        res["hls4ml_version"] = hls4ml.__version__
        module, x, labels = _data(name)
        with torch.no_grad():
            ref = module(torch.from_numpy(x)).numpy()
        res["n_test"] = len(labels)
        res["float_accuracy"] = float((ref.argmax(1) == labels).mean())
        chw = x.ndim == 4
        clc = "internal" if io_type == "io_stream" and chw else "full"
        feed = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if clc == "internal" else x
        out = Path(workdir) / f"{name}-{re.sub(r'[^0-9a-z]+', '_', precision)}-{io_type}"
        res.update(backend="Vitis", granularity="model", channels_last_conversion=clc, output_dir=str(out))
        with contextlib.redirect_stdout(sys.stderr):
            t = time.perf_counter()
            cfg = hls4ml.utils.config_from_pytorch_model(
                module,
                tuple(x.shape[1:]),
                granularity="model",
                backend="Vitis",
                default_precision=precision,
                channels_last_conversion=clc,
            )
            hm = hls4ml.converters.convert_from_pytorch_model(
                module, hls_config=cfg, output_dir=str(out), backend="Vitis", io_type=io_type
            )
            res["convert_s"] = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
            hm.compile()  # writes the project, then g++ -O3 builds the csim shared library
            res["csim_build_s"] = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
            y = hm.predict(feed)
            res["predict_s"] = round(time.perf_counter() - t, 3)
        res.update(_scores(y, ref, labels))
        # firmware/ minus the compiled .so: the HLS C++ input incl. vendored ap_types/nnet_utils
        # headers and weights (written twice, as .h and .txt); "model_" excludes the vendored headers.
        res["firmware_bytes"] = _bytes(out / "firmware")
        res["model_firmware_bytes"] = _bytes(out / "firmware", skip=("ap_types", "nnet_utils"))
        res["output_dir_bytes"] = _bytes(out)  # whole project (tcl, bridge, yml) minus .so/.o
    except Exception as e:  # noqa: BLE001 - a peer failure is a result, not a crash
        res["error"] = f"{type(e).__name__}: {e}"
    return res


def _add_zero_points(model: Any) -> Any:
    """QCDQToQuant needs 3-input DequantizeLinear; add the ONNX-default zero point explicitly."""
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and len(n.input) == 2:
            model.set_initializer(n.input[0] + "_zp", np.zeros((), model.get_initializer(n.input[0]).dtype))
            n.input.append(n.input[0] + "_zp")
    return model


def _direct_error(model: Any, out: Path) -> str | None:
    import hls4ml

    cfg = {"Model": {"Precision": "ap_fixed<16,6>", "ReuseFactor": 1}}
    try:
        with contextlib.redirect_stdout(sys.stderr):
            hls4ml.converters.convert_from_onnx_model(
                model, output_dir=str(out), backend="Vitis", hls_config=cfg
            )
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def int8_qdq(onnx_path: Path, workdir: Path = DEFAULT_WORKDIR, name: str = "digits-cnn") -> dict[str, Any]:
    """Feed a plain int8 QDQ ONNX file to hls4ml's ONNX frontend; then try the qonnx route."""
    import hls4ml
    import onnx
    from hls4ml.converters import get_supported_onnx_layers

    model = onnx.load(str(onnx_path))
    ops = sorted({n.op_type for n in model.graph.node})
    res: dict[str, Any] = {
        "onnx": str(onnx_path),
        "hls4ml_version": hls4ml.__version__,
        "ops": ops,
        "unsupported_ops": sorted(set(ops) - set(get_supported_onnx_layers())),
        "direct_error": None,
    }
    res["direct_error"] = _direct_error(model, Path(workdir) / "qdq-direct")
    q: dict[str, Any] = {"step": None, "error": None, "warnings": []}
    res["qonnx_route"] = q
    caught: list[warnings.WarningMessage] = []
    try:
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
        from qonnx.transformation.gemm_to_matmul import GemmToMatMul
        from qonnx.transformation.qcdq_to_qonnx import QCDQToQuant
        from qonnx.util.cleanup import cleanup_model

        q["qonnx_version"] = importlib.metadata.version("qonnx")
        q["shim"] = "explicit zero-point inputs added to 2-input DequantizeLinear nodes"
        steps = [
            ("cleanup", cleanup_model),
            ("add_zero_points", _add_zero_points),
            ("QCDQToQuant", lambda m: m.transform(QCDQToQuant())),
            ("cleanup", cleanup_model),
            ("ChannelsLast", lambda m: m.transform(ConvertToChannelsLastAndClean())),
            ("GemmToMatMul", lambda m: m.transform(GemmToMatMul())),
            ("cleanup", cleanup_model),
        ]
        with warnings.catch_warnings(record=True) as rec, contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("always")
            caught = rec
            m = ModelWrapper(str(onnx_path))
            for step, fn in steps:
                q["step"] = step
                m = fn(m)
                if step == "cleanup" and "direct_error_after_cleanup" not in res:  # Cast/Mul folded away
                    res["direct_error_after_cleanup"] = _direct_error(m.model, Path(workdir) / "qdq-direct")
            q["ops_after"] = sorted({n.op_type for n in m.graph.node})
            q["step"] = "hls4ml convert"
            cfg = hls4ml.utils.config_from_onnx_model(m.model, granularity="name", backend="Vitis")
            hm = hls4ml.converters.convert_from_onnx_model(
                m.model, output_dir=str(Path(workdir) / "qdq-qonnx"), backend="Vitis", hls_config=cfg
            )
            q["step"] = "compile"
            hm.compile()
            q["step"] = "predict"
            _, x, labels = _data(name)
            y = np.asarray(hm.predict(x)).reshape(len(labels), -1)
            q["csim_accuracy"] = float((y.argmax(1) == labels).mean())
            q["step"] = "done"
    except Exception as e:  # noqa: BLE001
        q["error"] = f"{type(e).__name__}: {e}"
    finally:
        q["warnings"] = sorted({" ".join(str(w.message).split()) for w in caught})
    return res


if __name__ == "__main__":
    work = DEFAULT_WORKDIR
    precisions = ("ap_fixed<16,6>", "ap_fixed<8,3>")
    results = [measure(n, p, workdir=work) for n in ("digits-cnn", "mlp") for p in precisions]
    qdq = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/peer/dcnn-int8/model.onnx")
    results.append(int8_qdq(qdq, workdir=work))
    print(json.dumps(results, indent=2))
