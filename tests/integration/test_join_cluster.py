"""A Ray cluster started separately by launch/'s bring-up script (loopback), used through the Jobs API:
`distune submit` (whose job runs `distune run --address auto` there), status, logs, list, and their errors."""

import json
import re
import time
from pathlib import Path

import pytest
import yaml

import distune.hardware as hardware
import tiny
from ray_nodes import cli, free_port, start_node, stop_node, wait_for_ports


@pytest.mark.slow  # 2 min, its own Ray cluster; `run --address` to a separate head stays in the default run (test_cluster_target)
def test_submit_to_a_cluster_started_by_the_launch_script(tmp_path, tiny_model, tiny_data):
    """launch/ray-head.sh (loopback), then `distune submit` through its dashboard: the job runs
    `distune run --address auto` on the head, joining that cluster."""
    port, dash = free_port(), free_port()
    # The dashboard agent's port too: its default (52365) is held by any other Ray on the machine (the test
    # session's own cluster), and without its agent a head answers "No available agent to submit job".
    head = start_node("ray-head.sh", "--port", str(port), "--dashboard-port", str(dash), "--cpus", "3",
                  ray_args=(f"--dashboard-agent-listen-port={free_port()}",))
    nodes = [head]
    try:
        wait_for_ports(head, [port, dash])  # the GCS, then the dashboard (the Jobs API)
        # `auto`s left for the cluster: the head resolves them from its own resources and workers.
        cfg = tiny.base_config(tiny_model, tiny_data, tmp_path / "runs", method={"name": "lora"},
                               model={"dtype": "auto"}, cluster={"num_workers": 2, "use_gpu": "auto"},
                               deepspeed={"stage": 2}, train={"max_steps": 2})
        _submit_status_logs_list(f"http://127.0.0.1:{dash}", cfg, tmp_path)
    finally:
        for node in reversed(nodes):
            stop_node(node)
    # The head printed how to join and submit; the dashboard stayed on loopback.
    text = head.communicate()[0]
    assert f"--head 127.0.0.1:{port}" in text and f"--address http://127.0.0.1:{dash}" in text


def _submit_status_logs_list(address: str, cfg: dict, tmp_path: Path) -> None:
    """The same head through the Jobs API: submit (validated here, run there), logs, status, list and stop on a
    running job; the same config submitted again resumes from the checkpoint the stop wrote (`--follow`); a wrong
    token and a dead address are one-line errors; the cluster's real token is never printed."""
    token_file = Path.home() / ".ray" / "auth_token"
    token = token_file.read_text().strip() if token_file.is_file() else None
    outputs = [_stop_then_resubmit(address, cfg, tmp_path)]

    bad = [cli("status", "nope", "--address", address),
           cli("status", "distune-t2", "--address", f"http://127.0.0.1:{free_port()}"),
           cli("list", "--address", address, env={"RAY_AUTH_TOKEN": "planted-wrong-token-5e1", "RAY_AUTH_MODE": "token"})]
    wants = ["error: job nope: no such job", "no Ray dashboard answers there", "refused this client's token"]
    for out, want in zip(bad, wants):
        outputs.append(out.stdout + out.stderr)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and want in out.stderr, outputs[-1][-2000:]
        assert "Traceback" not in outputs[-1]
    everything = "".join(outputs)
    assert "planted-wrong-token-5e1" not in everything
    if token:
        assert token not in everything


def _stop_then_resubmit(address: str, cfg: dict, tmp_path: Path) -> str:
    """`distune stop` on a running job: Ray sends its entrypoint SIGTERM, the run checkpoints at the next step
    boundary and the job ends STOPPED; submitting the same config again resumes from that checkpoint."""
    cfg = {**cfg, "run": {**cfg["run"], "name": "stopped"},
           "train": {**cfg["train"], "max_steps": 100_000, "log_every": 1}, "checkpoint": {"keep": 1}}
    cfg_file = tmp_path / "stopped.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "runs" / "stopped"
    sub = cli("submit", str(cfg_file), "--address", address, "--submission-id", "distune-t2")
    assert sub.returncode == 0 and "submitted distune-t2" in sub.stdout, sub.stdout + sub.stderr
    deadline = time.time() + 240
    while "step 2/100000" not in cli("logs", "distune-t2", "--address", address).stdout:
        assert time.time() < deadline, cli("logs", "distune-t2", "--address", address).stdout[-3000:]
        time.sleep(1)
    running = [cli(*args, "--address", address) for args in (("status", "distune-t2"), ("list",))]
    assert "distune-t2: RUNNING" in running[0].stdout, running[0].stdout + running[0].stderr
    assert re.search(r"distune-t2 +RUNNING +run=stopped", running[1].stdout), running[1].stdout + running[1].stderr
    stop = cli("stop", "distune-t2", "--address", address)
    assert stop.returncode == 0 and "distune-t2: stop requested" in stop.stdout, (
        stop.stdout + cli("status", "distune-t2", "--address", address).stdout
        + cli("logs", "distune-t2", "--address", address).stdout[-3000:])
    while "STOPPED" not in (status := cli("status", "distune-t2", "--address", address)).stdout:
        assert time.time() < deadline and "SUCCEEDED" not in status.stdout, status.stdout + status.stderr
        time.sleep(1)
    logs = cli("logs", "distune-t2", "--address", address).stdout
    dtype = hardware.auto_dtype(False, hardware.facts())  # the head's workers: this machine's CPU
    assert re.search(rf"the cluster has CPUs: cluster.use_gpu=False, cluster.num_workers=\d+, model.dtype={dtype}",
                     logs), logs[-3000:]
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (recorded["cluster"]["use_gpu"], recorded["model"]["dtype"]) == (False, dtype)
    stopped = json.loads((run_dir / "results.json").read_text())["step"]
    assert 2 <= stopped < 100_000 and (run_dir / f"step_{stopped}").is_dir(), logs[-3000:]
    assert f"checkpoint of step {stopped} written" in logs, logs[-3000:]
    # Resumed for two more steps only (train.stop_after_steps may change between invocations of one run).
    again = cli("submit", str(cfg_file), f"train.stop_after_steps={stopped + 2}", "--address", address,
                 "--submission-id", "distune-t3", "--follow")
    assert again.returncode == 0 and f"training: step {stopped} -> {stopped + 2}" in again.stdout, again.stdout[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["step"] == stopped + 2
    after = [cli(*args, "--address", address) for args in (("status", "distune-t3"), ("list",))]
    assert "distune-t3: SUCCEEDED" in after[0].stdout, after[0].stdout + after[0].stderr
    assert re.search(r"distune-t2 +STOPPED +run=stopped", after[1].stdout), after[1].stdout
    assert re.search(r"distune-t3 +SUCCEEDED +run=stopped", after[1].stdout), after[1].stdout
    return "".join(o.stdout + o.stderr for o in [sub, *running, stop, again, *after]) + logs
