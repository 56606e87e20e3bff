"""Nothing listens beyond loopback and no planted key leaks: a real run on the embedded cluster, then every
listening socket of that cluster's processes is checked, and the run folder (config, checkpoints, W&B files)
and Ray's session logs are searched for the sentinel WANDB_API_KEY that conftest puts in every worker's
environment. (Rendered Kubernetes manifests: tests/k8s; the CLI's own output: tests/reliability/test_bad_inputs.py
and tests/integration/test_submit.py.)"""

from __future__ import annotations

import ipaddress
import subprocess

import psutil

from conftest import SECRET
from distune.cluster.trainer import fit


def _cluster_processes() -> list[psutil.Process]:
    from ray._private import worker as ray_worker

    node = ray_worker._global_node
    roots = [psutil.Process()] + [psutil.Process(info.process.pid) for infos in node.all_processes.values()
                                   for info in infos]
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


def test_embedded_cluster_binds_loopback_and_no_key_leaks(ray_cluster, make_config, tiny_model):
    cfg = make_config(run={"name": "secure"}, method={"name": "lora"}, deepspeed={"stage": 2},
                      cluster={"num_workers": 2}, checkpoint={"every": 1, "keep": 2}, wandb={"mode": "offline"},
                      train={"max_steps": 2})
    fit(cfg, str(tiny_model), show_progress=False)

    sockets = _listening(_cluster_processes())
    assert sockets, "found no listening sockets: the check would prove nothing"
    exposed = sorted(s for s in sockets if not _is_loopback(s[0]))
    assert not exposed, f"listening beyond loopback: {exposed}"

    from ray._private import worker as ray_worker

    session = ray_worker._global_node.get_session_dir_path()
    for where in (cfg.run_dir, session):
        leaked = subprocess.run(["grep", "-rl", "--binary-files=text", SECRET, str(where)],
                                capture_output=True, text=True)
        assert leaked.stdout == "", f"the planted key is in {leaked.stdout}"
    assert list(cfg.run_dir.glob("step_*")) and list(cfg.run_dir.glob("wandb/*run-*/*.wandb"))  # searched real files
