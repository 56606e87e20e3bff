"""Ray nodes started by launch/'s bring-up scripts on loopback, each in its own process group and Ray temp dir (apart
from the test session's embedded cluster), and the `distune` command line run against them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(script: str, *args: str, ray_args: tuple[str, ...] = (), env: dict | None = None) -> subprocess.Popen:
    """One of launch/'s bring-up scripts, blocking, in its own process group (stopped by that group only).
    Its own Ray temp dir, apart from the test session's cluster; `env`: more of the node's environment."""
    # A short temp dir: Ray's unix sockets live under it (path length limits).
    env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY": str(Path(sys.executable).with_name("ray")),
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="dj-", dir="/tmp"), **(env or {})}
    return subprocess.Popen(["bash", str(ROOT / "launch" / script), *args, "--", "--block", *ray_args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_ports(proc: subprocess.Popen, ports: list[int], timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    waiting = set(ports)
    while waiting and time.time() < deadline:
        for p in list(waiting):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", p)) == 0:
                    waiting.discard(p)
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.5)
    assert not waiting, f"ports {waiting} never opened"


def stop_node(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # only what we started, by its process group
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distune", *args], capture_output=True, text=True, timeout=400,
                          env={**os.environ, **(env or {})})


