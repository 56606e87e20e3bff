"""`distune run --address` joins a Ray cluster started separately (`ray start --head` on loopback)."""

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_joins_existing_cluster(tmp_path, tiny_model, tiny_data):
    port = _free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=3", "--include-dashboard=false", f"--temp-dir={os.environ['RAY_TMPDIR']}/join"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
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
        os.killpg(head.pid, signal.SIGTERM)  # only the head we started, by its process group
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
