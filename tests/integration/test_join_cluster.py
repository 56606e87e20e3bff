"""`distune run --address` joins a Ray cluster started separately, by launch/'s bring-up scripts (loopback)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

import tiny

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(script: str, *args: str) -> subprocess.Popen:
    """One of launch/'s bring-up scripts, blocking, in its own process group (stopped by that group only).
    Its own Ray temp dir, apart from the test session's cluster."""
    env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY": str(Path(sys.executable).with_name("ray")),
           "RAY_TMPDIR": f"{os.environ['RAY_TMPDIR']}/join"}
    return subprocess.Popen(["bash", str(ROOT / "launch" / script), *args, "--", "--block"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # only what we started, by its process group
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_run_joins_a_cluster_started_by_the_launch_script(tmp_path, tiny_model, tiny_data):
    """launch/ray-head.sh (loopback), then `distune run --address`. Nodes joining with launch/ray-worker.sh
    are exercised across network namespaces in tests/cluster."""
    port, dash = _free_port(), _free_port()
    head = _start("ray-head.sh", "--port", str(port), "--dashboard-port", str(dash), "--cpus", "3")
    nodes = [head]
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert head.poll() is None, head.communicate()[0]
            time.sleep(0.5)
        cfg = tiny.base_config(tiny_model, tiny_data, tmp_path / "runs", method={"name": "lora"},
                               cluster={"num_workers": 2}, deepspeed={"stage": 2}, train={"max_steps": 2})
        cfg_file = tmp_path / "cfg.yaml"
        cfg_file.write_text(yaml.safe_dump(cfg))
        out = subprocess.run([sys.executable, "-m", "distune", "run", str(cfg_file), "--address",
                              f"127.0.0.1:{port}", "--no-progress"], capture_output=True, text=True, timeout=400)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        results = json.loads((tmp_path / "runs" / "t" / "results.json").read_text())
        assert results["step"] == 2
    finally:
        for node in reversed(nodes):
            _stop(node)
    # The head printed how to join and submit; the dashboard stayed on loopback.
    text = head.communicate()[0]
    assert f"--head 127.0.0.1:{port}" in text and f"--address http://127.0.0.1:{dash}" in text
