"""run --ray: `slimgraph run` joins a Ray cluster that is already running (a head started with
`ray start`, as an operator would), by HOST:PORT and by `auto` with RAY_ADDRESS. Its outputs equal
one onnxruntime session's exactly, its 2 replicas are in that cluster's own actor table under the
job the run drove, the run disconnects when done, and the cluster is still up after it.

Each run is main() in a fresh interpreter whose environment carries the cluster's auth, as an
operator's shell would: Ray fixes a process's token auth mode at import or on its first local
ray.init (test_run's fixture does one in the pytest process), and a driver whose mode differs from
the cluster's either cannot connect or connects and loses its actors (the workers' calls back to
it are refused). So nothing here starts or joins Ray in the pytest process, and the head is
stopped by killing exactly its own processes, never `ray stop` (which kills every Ray of this user,
any in-process one included)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

CPUS = 2  # the head's --num-cpus

# main(argv) in this interpreter, then a second driver on the cluster reads its tables from the
# GCS. No public API lists another job's actors without the dashboard, hence ray._private.state.
DRIVER = """
import json, sys
from collections import Counter

import ray
from ray._private import state

from slimgraph.cli import main

address, argv = sys.argv[1], sys.argv[2:]
rc = main(argv)
left = not ray.is_initialized()
ray.shutdown()
ray.init(address=address, log_to_driver=False, configure_logging=False)
runners = Counter(a["JobID"] for a in state.actors().values()
                  if a["ActorClassName"] == "StageRunner")
jobs = {j["JobID"]: j for j in state.jobs()}
print(json.dumps({"rc": rc, "left": left, "cpus": ray.cluster_resources().get("CPU"),
                  "runners": [[jobs[j]["DriverPid"], jobs[j]["IsDead"], n]
                              for j, n in runners.items()]}))
ray.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_session(sid: int) -> None:
    """SIGKILL every process in session ``sid``: the head's GCS, raylet, agents and the workers
    the raylet forks (each in a process group of its own, all in this session)."""
    if not Path("/proc").is_dir():  # no way to list the session here: stop every local Ray
        subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"],
                       capture_output=True, timeout=120, check=False)
        return
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if pid != os.getpid() and os.getsid(pid) == sid:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on a free port, started by the `ray` CLI in a session of its own (teardown kills
    exactly its processes), with a short temp dir (Ray's unix sockets live under it, and a socket
    path has ~107 bytes) and token auth with a token of its own (not ~/.ray's). Yields HOST:PORT
    and the environment a driver needs to join it."""
    pytest.importorskip("ray")
    exe = Path(sys.executable).with_name("ray")
    if not exe.exists():
        pytest.skip(f"no ray executable next to {sys.executable}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    head = subprocess.Popen(
        [str(exe), "start", "--head", f"--port={port}", f"--num-cpus={CPUS}",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True)
    try:
        log, _ = head.communicate(timeout=180)
        if head.returncode != 0:
            pytest.fail(f"ray start exited {head.returncode}:\n{log[-4000:]}")
        yield f"127.0.0.1:{port}", env
    finally:
        head.kill()  # only still running when `ray start` itself timed out
        _kill_session(head.pid)
        shutil.rmtree(temp, ignore_errors=True)


def _run_on_the_cluster(mlp, ray_head, tmp_path, ray_arg: str, **env: str) -> None:
    address, head_env = ray_head
    root, want = mlp
    out = tmp_path / "out.npz"
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, address, "run", str(root / "art"), "--data",
         str(root / "in.npz"), "-o", str(out), "--ray", ray_arg, "--workers", "2",
         "--batch", "8", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=head_env | env)
    stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 0, stderr[-4000:]
    got = json.loads(stdout.strip().splitlines()[-1])
    assert got["rc"] == 0, stderr[-4000:]
    assert got["left"]  # run disconnected from the cluster it joined
    assert got["cpus"] == CPUS  # and the cluster outlived the run: the head started here
    # On that cluster, one job driven by the run's process and ended, that made the 2 replicas
    # (a run that started a Ray of its own would leave nothing here).
    assert [r for r in got["runners"] if r[0] == driver.pid] == [[driver.pid, True, 2]], got
    with np.load(out) as result:
        assert list(result.files) == ["logits"]
        np.testing.assert_array_equal(result["logits"], want)


@pytest.mark.slow
def test_run_joins_a_running_cluster_by_address(mlp, ray_head, tmp_path):
    _run_on_the_cluster(mlp, ray_head, tmp_path, ray_head[0])


@pytest.mark.slow
def test_run_ray_auto_joins_the_cluster_in_ray_address(mlp, ray_head, tmp_path):
    # RAY_ADDRESS is what ray.init(address="auto") reads first.
    _run_on_the_cluster(mlp, ray_head, tmp_path, "auto", RAY_ADDRESS=ray_head[0])


@pytest.mark.slow
def test_a_driver_without_the_clusters_token_is_told_why(mlp, ray_head, tmp_path):
    # The head answers, so the connect check passes; Ray then refuses the driver until its connect
    # budget runs out (shortened here from ~20 s) and ray.init says only "Failed to connect". The
    # message must carry Ray's reason, the missing token.
    address, head_env = ray_head
    root, _ = mlp
    out = tmp_path / "out.npz"
    env = {k: v for k, v in head_env.items() if not k.startswith("RAY_AUTH_")}
    driver = subprocess.run(
        [sys.executable, "-m", "slimgraph.cli", "run", str(root / "art"), "--data",
         str(root / "in.npz"), "-o", str(out), "--ray", address, "--workers", "2", "--quiet"],
        capture_output=True, text=True, timeout=300,
        env=env | {"RAY_gcs_server_port_wait_time_s": "2", "HOME": str(tmp_path)})
    assert driver.returncode == 2, driver.stderr[-4000:]
    message = [line for line in driver.stderr.splitlines() if "run: cannot join" in line]
    assert message, driver.stderr[-4000:]
    assert "refused this driver's credentials" in message[0]
    assert "RAY_AUTH_TOKEN" in message[0]
    assert not out.exists()
