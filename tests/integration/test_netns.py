"""Two network hosts on one machine: the Ray head in one network namespace, a worker node in another, joined by a
veth pair (10.213.<n>.1 <-> 10.213.<n>.2, addresses that exist inside these two namespaces only). Each side is
brought up by launch/'s own scripts, and `distune run --address` (itself inside the head's namespace) trains
with one rank per host, gloo over the veth link. Needs root and `ip netns` (skipped otherwise); everything it
starts is stopped by process group, and whatever is left in its namespaces is killed by PID before they go.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

import tiny

ROOT = Path(__file__).resolve().parents[2]
IFNAME = "dt0"  # the same name at both ends (renamed inside each namespace): one GLOO_SOCKET_IFNAME for all


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture(scope="module")
def hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    tag = os.getpid() % 250 + 1
    a, b = f"dt-head-{os.getpid()}", f"dt-node-{os.getpid()}"
    if _ip("netns", "add", a, check=False).returncode:
        pytest.skip("`ip netns add` is not permitted here")
    try:
        _ip("netns", "add", b)
        _ip("link", "add", f"dta{tag}", "type", "veth", "peer", "name", f"dtb{tag}")
        for ns, end, addr in ((a, f"dta{tag}", f"10.213.{tag}.1"), (b, f"dtb{tag}", f"10.213.{tag}.2")):
            _ip("link", "set", end, "netns", ns)
            _ip("-n", ns, "link", "set", end, "name", IFNAME)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", IFNAME)
            _ip("-n", ns, "link", "set", IFNAME, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield {"head_ns": a, "node_ns": b, "head_ip": f"10.213.{tag}.1", "node_ip": f"10.213.{tag}.2"}
    finally:
        for ns in (a, b):
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():  # only processes in our namespaces
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _ip("netns", "del", ns, check=False)  # takes the veth pair with it


def _in_ns(ns: str, *cmd: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=ROOT)


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # only what we started, by its process group
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate()[0]


def _wait_for_port(ns: str, ip: str, port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    probe = f"import socket; socket.create_connection(('{ip}', {port}), timeout=2)"
    while subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", probe], capture_output=True).returncode:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, f"{ip}:{port} never opened"
        time.sleep(1)


@pytest.mark.slow  # 65 s (root only); multi-node is in the default run through test_multinode.py
def test_a_run_spans_two_network_namespaces(hosts, tmp_path, tiny_model, tiny_data):
    env = {**os.environ, "RAY": str(Path(sys.executable).with_name("ray")), "DISTUNE_IFNAME": IFNAME,
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # distune's embedded-cluster setting (this process's)
    # Each namespace is its own port space (Ray's default ports are free there), but both share this filesystem:
    # a temp dir each.
    head_env = {**env, "RAY_TMPDIR": tempfile.mkdtemp(prefix="dn-", dir="/tmp")}
    node_env = {**env, "RAY_TMPDIR": tempfile.mkdtemp(prefix="dn-", dir="/tmp")}
    head = _in_ns(hosts["head_ns"], "bash", "launch/ray-head.sh", "--node-ip", hosts["head_ip"], "--cpus", "2",
                  "--", "--block", env=head_env)
    started = [head]
    try:
        _wait_for_port(hosts["head_ns"], hosts["head_ip"], 6379, head)
        node = _in_ns(hosts["node_ns"], "bash", "launch/ray-worker.sh", "--head", f"{hosts['head_ip']}:6379",
                      "--node-ip", hosts["node_ip"], "--cpus", "2", "--", "--block", env=node_env)
        started.append(node)
        cfg = tiny.base_config(tiny_model, tiny_data, tmp_path / "runs", method={"name": "lora"},
                               deepspeed={"stage": 2}, train={"max_steps": 4},
                               cluster={"num_workers": 2, "placement": "SPREAD", "env": {"GLOO_SOCKET_IFNAME": IFNAME}})
        cfg_file = tmp_path / "netns.yaml"
        cfg_file.write_text(yaml.safe_dump(cfg))
        deadline = time.time() + 120
        while True:  # the worker node has joined once the cluster counts 4 CPUs
            probe = _in_ns(hosts["head_ns"], sys.executable, "-c", (
                f"import ray, json; ray.init(address='{hosts['head_ip']}:6379', logging_level='ERROR');"
                "print(json.dumps(ray.cluster_resources()))"), env={**head_env, "RAY_AUTH_MODE": "token"}
                if (Path.home() / ".ray" / "auth_token").is_file() else head_env)
            text = probe.communicate(timeout=120)[0]
            found = re.search(r'\{.*"CPU": ([\d.]+).*\}', text)
            if found and float(found.group(1)) >= 4:
                break
            assert node.poll() is None, node.communicate()[0][-3000:]
            assert time.time() < deadline, text[-2000:]
            time.sleep(2)
        run = _in_ns(hosts["head_ns"], sys.executable, "-m", "distune", "run", str(cfg_file), "--address",
                     f"{hosts['head_ip']}:6379", "--no-progress", env=head_env)
        started.append(run)
        out = run.communicate(timeout=480)[0]
    finally:
        texts = [_stop(p) for p in reversed(started)]
    assert run.returncode == 0, out[-4000:] + "\n---\n" + "\n---\n".join(t[-1500:] for t in texts)
    ranks = dict(re.findall(r"^rank (\d+): node \w+ \(([\d.]+), ", out, re.M))
    assert sorted(ranks.values()) == sorted([hosts["head_ip"], hosts["node_ip"]]), out[-3000:]  # one per host
    assert json.loads((tmp_path / "runs" / "t" / "results.json").read_text())["step"] == 4
