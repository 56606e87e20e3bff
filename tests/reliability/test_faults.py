"""Faults during a Ray run, each against one uninterrupted run of the same config (fixed seed):
a worker SIGKILLed mid-run (Ray restarts the group from the last checkpoint), a stop request (the
SIGTERM / preemption path: a checkpoint at the next step boundary, then resume), and a save killed
half-way (the previous checkpoint still loads). Each compares final weights and per-step losses and
checks that every restart logged into the same W&B run. The Ray ones are `slow` (pytest -m slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from distune.training import fit
from distune.config import dump_config
from faults import EVERY, STEPS, max_weight_diff, restarts, same_as_straight, sections


def _cfg(make_config, name: str, extra=()):
    return make_config(list(extra), **sections(name))


@pytest.fixture(scope="module")
def straight(ray_cluster, tmp_path_factory, tiny_model, tiny_data):
    """The uninterrupted run every fault is compared with."""
    import tiny
    from distune.config import load_config

    cfg = load_config(tiny.base_config(tiny_model, tiny_data, tmp_path_factory.mktemp("straight"),
                                       **sections("straight")))
    fit(cfg, str(tiny_model), show_progress=False)
    return cfg


def _train_workers() -> list[psutil.Process]:
    """The Ray Train worker processes of this test session's embedded cluster (not any other Ray on the box)."""
    from ray._private import worker as ray_worker

    raylet = ray_worker._global_node.all_processes["raylet"][0].process.pid
    return [p for p in psutil.Process(raylet).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline())]


def _wait_for(path: Path, thread: threading.Thread, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert thread.is_alive(), f"the run ended before {path.name} appeared"
        assert time.time() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def _fit_in_thread(cfg, tiny_model) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def target():
        try:
            out["result"] = fit(cfg, str(tiny_model), show_progress=False)
        except BaseException as e:  # noqa: BLE001 - surfaced by the test
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


@pytest.mark.slow  # ~3 min: two Ray runs and a restart
def test_worker_sigkill_restarts_from_checkpoint_and_matches(straight, make_config, tiny_model, record_property,
                                                            capsys):
    cfg = _cfg(make_config, "killed")
    thread, out = _fit_in_thread(cfg, tiny_model)
    # A checkpoint counts once Ray registered it; by the time the next one is being written, the first is.
    _wait_for(cfg.run_dir / f"step_{2 * EVERY}", thread)
    victims = _train_workers()
    assert len(victims) == 2, victims
    # Rank 0 (the one running W&B's service): the worst case, its metrics since the last flush die with it.
    rank0 = [p for p in victims if any("wandb" in " ".join(c.cmdline()) for c in p.children(recursive=True))]
    assert len(rank0) == 1, victims
    killed_at = time.time()
    os.kill(rank0[0].pid, signal.SIGKILL)
    thread.join(600)
    assert not thread.is_alive() and "error" not in out, out.get("error")
    resumed_at, redone = restarts(capsys.readouterr().out)
    assert resumed_at >= EVERY and resumed_at % EVERY == 0  # from a checkpoint, not from scratch
    figures = same_as_straight(cfg.run_dir, straight.run_dir) | {"resumed_at": resumed_at, "steps_redone": redone,
                                                                    "restart_s": time.time() - killed_at}
    record_property("sigkill", figures)
    print(f"\nSIGKILL of a worker: {figures}")


def _cli_run(cfg_file: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distune", "run", str(cfg_file), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow  # ~3 min: three CLI invocations, each with its own Ray cluster
def test_sigterm_checkpoints_at_next_step_and_resumes(straight, make_config, tiny_model, tmp_path, record_property):
    """SIGTERM to `distune run` (a preempted head, `distune stop`): the workers checkpoint at the next step
    boundary, the command exits 143, and the same command resumes to the uninterrupted result."""
    cfg = _cfg(make_config, "preempted")
    cfg_file = tmp_path / "preempted.yaml"
    cfg_file.write_text(yaml.safe_dump(dump_config(cfg)))
    proc = _cli_run(cfg_file)
    try:
        deadline = time.time() + 240
        while not (cfg.run_dir / f"step_{EVERY}").exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.time() < deadline
            time.sleep(0.05)
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
        grace = time.time() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, out
    stopped = json.loads((cfg.run_dir / "results.json").read_text())["step"]
    assert EVERY <= stopped < STEPS and (cfg.run_dir / f"step_{stopped}").is_dir(), out
    assert f"checkpoint of step {stopped} written" in out and "run the same command again to resume" in out
    assert "Traceback" not in out

    again = subprocess.run([sys.executable, "-m", "distune", "run", str(cfg_file), "--no-progress"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"training: step {stopped} -> {STEPS}" in again.stdout  # nothing redone
    figures = same_as_straight(cfg.run_dir, straight.run_dir) | {"stopped_at": stopped, "grace_s": grace}
    record_property("sigterm", figures)
    print(f"\nSIGTERM to the driver: {figures}")


def test_save_killed_half_way_leaves_previous_checkpoint(make_config, tiny_model, tmp_path, record_property):
    """Without Ray (`python -m distune.worker`): the process is SIGKILLed while a checkpoint is being written
    (its temp folder exists); the previous published checkpoint is what the next run resumes from, the
    debris is never taken for a checkpoint, and the run ends where an uninterrupted one does."""
    recipe = sections("half-saved") | {"cluster": {"num_workers": 1}, "wandb": {"mode": "disabled"},
                                       "checkpoint": {"every": 1, "keep": 3}}
    cfg = make_config(**recipe)
    ref = make_config(**(recipe | {"run": {"name": "half-saved-ref"}}))
    files = {}
    for c in (cfg, ref):
        files[c.run.name] = tmp_path / f"{c.run.name}.yaml"
        files[c.run.name].write_text(yaml.safe_dump(dump_config(c)))
    worker = [sys.executable, "-m", "distune.worker"]
    subprocess.run(worker + [str(files[ref.run.name])], check=True, capture_output=True, timeout=300)

    ckpts = cfg.run_dir / "checkpoints"
    killed_in = None
    for _ in range(3):  # a save can be published between seeing its temp folder and the kill: then try the next
        proc = subprocess.Popen(worker + [str(files[cfg.run.name])], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.time() + 240
            while killed_in is None and proc.poll() is None and time.time() < deadline:
                published = [p for p in ckpts.glob("step_*")] if ckpts.is_dir() else []
                partial = [p for p in ckpts.glob(".tmp-step_*")] if ckpts.is_dir() else []
                if partial and published:  # a save in progress, with an earlier one to fall back on
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed_in = partial[0].name
                time.sleep(0.005)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if killed_in is None or (ckpts / killed_in).exists():
            break
        killed_in = None  # published just before the kill landed
    assert killed_in is not None, "never caught a save in progress"
    step = int(killed_in.removeprefix(".tmp-step_"))
    from distune.engine import checkpoint
    from distune.reporting import checkpoint_dirs

    latest = checkpoint_dirs(ckpts)[-1]
    assert int(latest.name[5:]) < step  # the killed save was never published
    checkpoint.read_meta(latest)  # complete: every rank's marker is there
    if (ckpts / killed_in / "meta.json").exists():
        with pytest.raises(checkpoint.CheckpointError, match="incomplete checkpoint"):
            checkpoint.read_meta(ckpts / killed_in)

    subprocess.run(worker + [str(files[cfg.run.name])], check=True, capture_output=True, timeout=300)
    assert not (ckpts / killed_in).exists()  # the next save of that step cleared the debris
    diff = max_weight_diff(cfg.run_dir, ref.run_dir)
    assert diff < 1e-4
    record_property("half_save", {"killed_during": killed_in, "resumed_from": latest.name, "weight_diff": diff})
    print(f"\nsave killed half-way ({killed_in}): resumed from {latest.name}, weight diff {diff:.2e}")
