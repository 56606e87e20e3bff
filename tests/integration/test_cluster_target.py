"""`cluster.use_gpu: auto` and `dtype: auto` are decided by the Ray cluster a job runs on, not by the machine that
starts it: the cluster's GPU resources, and what a task placed like a worker finds on its machine."""

import pytest

import distune.hardware as hardware
from distune.config import ConfigError, load_config
from distune.cluster.target import resolve_on_cluster

import tiny
from ray_nodes import cli, free_port, start_node, stop_node, wait_for_ports


def test_a_cpu_cluster_decides_for_a_driver_that_sees_a_gpu(ray_cluster, tiny_model, tiny_data, tmp_path,
                                                             monkeypatch):
    """The driver claims CUDA (patched here: this machine has none); the session's cluster advertises no GPU, so the
    job runs on CPUs, in the dtype the workers' own CPU computes natively."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    raw = tiny.base_config(tiny_model, tiny_data, tmp_path / "runs", model={"dtype": "auto"},
                           cluster={"use_gpu": "auto", "num_workers": "auto"})
    cfg = load_config(raw, resolve=False)
    assert (cfg.cluster.use_gpu, cfg.model.dtype) == ("auto", "auto")
    line = resolve_on_cluster(cfg)
    monkeypatch.undo()
    expected = hardware.auto_dtype(False, hardware.facts())  # this machine's CPU, the cluster's only node
    assert (cfg.cluster.use_gpu, cfg.model.dtype) == (False, expected)
    assert line == f"the cluster has CPUs: cluster.use_gpu=False, cluster.num_workers=2, model.dtype={expected}"
    # An explicit true on a cluster without GPUs is a one-line error naming the key.
    cfg = load_config({**raw, "cluster": {**raw["cluster"], "use_gpu": True}}, resolve=False)
    with pytest.raises(ConfigError, match=r"^cluster.use_gpu: true, but the Ray cluster advertises no GPU"):
        resolve_on_cluster(cfg)


def _run_on(head, port: int, tmp_path, cfg: dict):
    """`distune run CFG --address` against the head started by the test; the head is stopped after."""
    import yaml

    try:
        wait_for_ports(head, [port])
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return cli("run", str(path), "--address", f"127.0.0.1:{port}", "--no-progress")
    finally:
        stop_node(head)


def test_a_gpu_cluster_decides_for_a_driver_without_one(tmp_path, tiny_model, tiny_data):
    """A head that advertises 2 GPUs, joined by a driver that has none: `use_gpu: auto` becomes true. The probe task
    given one of those GPUs then finds no CUDA device (they are advertised only: this machine has none), which is
    a one-line error before any worker starts, not a run on gloo in fp32."""
    port, dash = free_port(), free_port()
    head = start_node("ray-head.sh", "--port", str(port), "--dashboard-port", str(dash), "--cpus", "2", "--gpus", "2",
                  ray_args=(f"--dashboard-agent-listen-port={free_port()}",))
    out = _run_on(head, port, tmp_path, tiny.base_config(tiny_model, tiny_data, tmp_path / "runs",
                                                         model={"dtype": "auto"}, cluster={"use_gpu": "auto"}))
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert "Traceback" not in text and text.count("error:") == 1, text[-3000:]
    assert out.stderr.strip().splitlines()[-1:] == [
        "error: cluster.use_gpu: auto: the Ray cluster advertises 2 GPUs, but a task given one sees no CUDA device "
        "(a node started with --num-gpus on a machine without CUDA, or CUDA_VISIBLE_DEVICES emptied); set "
        "cluster.use_gpu: false, or fix the node"], text[-3000:]
    assert not (tmp_path / "runs").exists()  # nothing written before the error


def test_a_worker_killed_by_rays_memory_monitor_ends_the_run_with_one_line(tmp_path, tiny_model, tiny_data):
    """A node whose memory monitor kills at what the machine uses now plus ~1.5 GB (two workers loading torch and
    DeepSpeed pass it): the run ends with one line that says so and what lowers the peak, not Ray's OOM report."""
    from distune.plan import _meminfo

    mem = _meminfo()
    threshold = (mem["MemTotal"] - mem["MemAvailable"] + 1.5 * 2**30) / mem["MemTotal"]
    port = free_port()
    head = start_node("ray-head.sh", "--port", str(port), "--dashboard-port", str(free_port()), "--cpus", "2",
                      ray_args=(f"--dashboard-agent-listen-port={free_port()}",),
                      env={"RAY_memory_usage_threshold": f"{threshold:.4f}", "RAY_memory_monitor_refresh_ms": "100"})
    out = _run_on(head, port, tmp_path, tiny.base_config(tiny_model, tiny_data, tmp_path / "runs",
                                                         cluster={"num_workers": 2}, deepspeed={"stage": 2},
                                                         train={"max_steps": 50}))
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "Traceback" not in text and text.count("error:") == 1, text[-3000:]
    line = next(x for x in out.stderr.splitlines() if x.startswith("error:"))
    assert line.startswith("error: a worker was killed by Ray's memory monitor"), line
    assert "model.gradient_checkpointing: true" in line and "train.micro_batch_size" in line, line
