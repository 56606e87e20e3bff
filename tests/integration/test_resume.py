"""Stop a run part-way, run it again: it resumes from the checkpoint and ends exactly where an
uninterrupted run ends (weights, losses, data order, dropout RNG), logging into the same W&B run. The same
runs check that no planted key leaks and that the embedded cluster listens on loopback only."""

import ipaddress
import json
import subprocess

import psutil
import pytest
from safetensors.torch import load_file

import wandb_records
from conftest import SECRET
from distune.training import fit


def _cfg(make_config, name, extra=()):
    return make_config(
        list(extra), run={"name": name}, method={"name": "lora", "dropout": 0.1}, deepspeed={"stage": 2},
        cluster={"num_workers": 2}, checkpoint={"every": 2, "keep": 2}, wandb={"mode": "offline"},
        train={"max_steps": 6, "lr": 1e-2, "warmup_steps": 2, "min_lr_ratio": 0.1}, eval={"every": 3})


def _losses(run_dir):
    return {row["_step"]: row["train/loss"] for row in wandb_records.logged(run_dir)["history"] if "train/loss" in row}


@pytest.mark.slow  # 100 s; resume exactness is in the default run via tests/distributed (torchrun, and on
# another worker count) and tests/reliability/test_faults.py (a save killed half-way)
def test_stop_and_resume_matches_uninterrupted_run(ray_cluster, make_config, tiny_model):
    straight = _cfg(make_config, "straight")
    fit(straight, str(tiny_model), show_progress=False)

    resumed = _cfg(make_config, "resumed", ["train.stop_after_steps=4"])
    fit(resumed, str(tiny_model), show_progress=False)
    first = json.loads((resumed.run_dir / "results.json").read_text())
    assert first["step"] == 4 and "export" not in first
    assert sorted(p.name for p in resumed.run_dir.glob("step_*")) == ["step_2", "step_4"]

    fit(_cfg(make_config, "resumed"), str(tiny_model), show_progress=False)
    second = json.loads((resumed.run_dir / "results.json").read_text())
    assert second["step"] == 6 and "before" not in second  # resumed at step 4, no second "before" eval

    # Same end point as the uninterrupted run.
    a = load_file(straight.run_dir / "export" / "adapter_model.safetensors")
    b = load_file(resumed.run_dir / "export" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-6, k
    straight_res = json.loads((straight.run_dir / "results.json").read_text())
    assert second["after"]["eval/loss"] == pytest.approx(straight_res["after"]["eval/loss"], abs=1e-6)
    la, lb = _losses(straight.run_dir), _losses(resumed.run_dir)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4, 5, 6]
    for step in la:
        assert lb[step] == pytest.approx(la[step], abs=1e-6), step

    # One W&B run across both invocations, with what the spine promises to log.
    logged = wandb_records.logged(resumed.run_dir)
    run_id = (resumed.run_dir / "wandb_run_id").read_text().strip()
    assert len(logged["run_ids"]) == 2 and set(logged["run_ids"]) == {run_id}
    keys = set().union(*logged["history"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/step_time_s",
            "eval/loss"} <= keys
    assert logged["config"]["train"]["lr"] == 1e-2
    lrs = [row["train/lr"] for row in logged["history"] if "train/lr" in row]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[1]  # warmup, then cosine decay

    # The W&B key (present in every worker's environment) is written nowhere: not in the run folder (config,
    # checkpoints, W&B files), not in Ray's session logs. And the embedded cluster listens on loopback only.
    from ray._private import worker as ray_worker

    for where in (resumed.run_dir, ray_worker._global_node.get_session_dir_path()):
        leaked = subprocess.run(["grep", "-rl", "--binary-files=text", SECRET, str(where)], capture_output=True,
                                text=True)
        assert leaked.stdout == "", f"the planted key is in {leaked.stdout}"
    sockets = _listening(_cluster_processes())
    assert sockets, "found no listening sockets: the check would prove nothing"
    exposed = sorted(s for s in sockets if not _is_loopback(s[0]))
    assert not exposed, f"listening beyond loopback: {exposed}"


def _cluster_processes() -> list[psutil.Process]:
    from ray._private import worker as ray_worker

    node = ray_worker._global_node
    # Ray's own processes (GCS, raylet, agents, workers), not this test process: its torch TCPStore from
    # other tests binds every interface, as PyTorch's TCPStore always does (a limit named in the README).
    roots = [psutil.Process(info.process.pid) for infos in node.all_processes.values() for info in infos]
    out = {}
    for root in roots:
        for p in [root, *root.children(recursive=True)]:
            out[p.pid] = p
    return list(out.values())


def _listening(processes: list[psutil.Process]) -> set[tuple[str, int, str]]:
    pids = {p.pid: p for p in processes}
    found = set()
    for c in psutil.net_connections(kind="inet"):
        if c.pid in pids and c.status == psutil.CONN_LISTEN:
            found.add((c.laddr.ip, c.laddr.port, pids[c.pid].name()))
    return found


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback

