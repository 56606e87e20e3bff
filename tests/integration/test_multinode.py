"""Real multi-node runs on this machine: a Ray cluster of a head and two worker nodes, each its own raylet
(tests/multinode.py, `ray.cluster_utils.Cluster`; the head on 127.0.0.1, the worker nodes on 127.0.0.2, .3, ...),
joined by `distune run --address`.

- `cluster.placement: STRICT_SPREAD`: the two workers land on two distinct nodes (each rank prints its node),
  gloo spans them, the run completes.
- A whole node lost mid-run (the node of rank 0, with the W&B process: its raylet and workers killed), and a
  replacement node added, as an autoscaler or KubeRay would: Ray restarts the group from the last checkpoint,
  and the run ends where the uninterrupted STRICT_SPREAD run did (weights within 1e-4, every step's loss,
  one W&B run). `slow`.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import tiny
from faults import EVERY, STEPS, restarts, same_as_straight, sections

ROOT = Path(__file__).resolve().parents[2]


class MultiNode:
    """tests/multinode.py in its own process group: commands in, one JSON line out per command."""

    def __init__(self, workers: int, cpus: int):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "multinode.py"), str(workers), str(cpus)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True, cwd=ROOT)
        self.info = self._answer(180)

    def _answer(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"tests/multinode.py gave no answer in {timeout} s"
        line = self.proc.stdout.readline()
        assert line, f"tests/multinode.py exited ({self.proc.poll()})"
        return json.loads(line)

    def command(self, text: str, timeout: float = 120) -> dict:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self._answer(timeout)

    def stop(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # only what this test started
            self.proc.wait()


@pytest.fixture(scope="module")
def nodes():
    cluster = MultiNode(workers=2, cpus=2)  # head: 1 CPU; each worker node: rank 0 + the coordinator, or rank 1
    yield cluster
    cluster.stop()


def _config(tmp_path: Path, tiny_model, tiny_data, name: str) -> Path:
    cfg = tiny.base_config(tiny_model, tiny_data, tmp_path / "runs", **sections(name))
    cfg["cluster"]["placement"] = "STRICT_SPREAD"
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cfg_file: Path, address: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distune", "run", str(cfg_file), "--address", address,
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _placements(out: str) -> list[dict[int, str]]:
    """Per attempt (in order): rank -> node id, from the lines each rank prints when it starts."""
    attempts: list[dict[int, str]] = []
    for rank, node in re.findall(r"^rank (\d+): node (\w+) \(127\.0\.0\.(?:[2-9]|\d\d+), ", out, re.M):
        if not attempts or int(rank) in attempts[-1]:
            attempts.append({})
        attempts[-1][int(rank)] = node
    return attempts


@pytest.fixture(scope="module")
def spread(nodes, tmp_path_factory, tiny_model, tiny_data):
    tmp = tmp_path_factory.mktemp("spread")
    proc = _run(_config(tmp, tiny_model, tiny_data, "spread"), nodes.info["address"])
    try:
        out, _ = proc.communicate(timeout=480)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, tmp / "runs" / "spread"


def test_strict_spread_puts_each_worker_on_its_own_node(spread, nodes):
    rc, out, run_dir = spread
    assert rc == 0, out[-3000:]
    [placed] = _placements(out)
    assert sorted(placed) == [0, 1], out[-3000:]
    assert placed[0] != placed[1]  # two raylets, so the gloo group spans two nodes
    assert {placed[0], placed[1]} <= {n[:12] for n in nodes.info["nodes"]}  # the worker nodes, not the head
    assert json.loads((run_dir / "results.json").read_text())["step"] == STEPS


@pytest.mark.slow  # ~4 min: a run, a lost node, a replacement node and a restart
def test_lost_node_restarts_on_a_replacement_and_matches(spread, nodes, tmp_path, tiny_model, tiny_data,
                                                        record_property):
    assert spread[0] == 0, spread[1][-3000:]
    cfg_file = _config(tmp_path, tiny_model, tiny_data, "lost-node")
    run_dir = tmp_path / "runs" / "lost-node"
    proc = _run(cfg_file, nodes.info["address"])
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 300
        # A checkpoint counts once Ray registered it; by the time the next one is being written, the first is.
        while not (run_dir / f"step_{2 * EVERY}").exists():
            assert proc.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
            time.sleep(0.05)
        victim = _placements("".join(lines))[0][0]  # rank 0's node: the coordinator and W&B die with it
        lost_at = time.time()
        assert nodes.command(f"remove {victim}")["removed"].startswith(victim)
        nodes.command("add")  # STRICT_SPREAD needs two worker nodes again
        proc.wait(timeout=480)
        reader.join(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines)
    assert proc.returncode == 0, out[-4000:]
    # Where each rank ran last: an attempt that fails part-way prints only some ranks, so attempts cannot be told
    # apart by rank order alone.
    first, again = _placements(out)[0], {}
    for attempt in _placements(out):
        again |= attempt
    assert victim not in again.values() and again[0] != again[1], out[-3000:]
    resumed_at, redone = restarts(out)
    assert resumed_at >= EVERY and resumed_at % EVERY == 0  # from a checkpoint, not from scratch
    figures = same_as_straight(run_dir, spread[2]) | {"resumed_at": resumed_at, "steps_redone": redone,
                                                      "restart_s": round(time.time() - lost_at, 1),
                                                      "nodes_before": first, "nodes_after": again}
    record_property("node_lost", figures)
    print(f"\nnode of rank 0 lost: {figures}")
