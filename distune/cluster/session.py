"""The Ray session of this process: join a cluster or start an embedded one, and the environment of the
processes Ray starts. Every module of distune.cluster imports ray through here, so Ray's environment is set
before its first import.
"""

from __future__ import annotations

import os

# Before ray is imported: keep an embedded cluster on loopback, and make ray.train.report cheap
# (each report waits for a health-check tick; the default 2 s tick costs ~2 s per checkpoint).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

import ray  # noqa: E402

from distune.cluster.address import check_gcs_address  # noqa: E402
from distune.cluster.auth import token_auth_if_available  # noqa: E402
from distune.errors import ConfigError  # noqa: E402


def start_ray(address: str | None, num_cpus: int | None = None, verbose: bool = False) -> None:
    """Join `address`, or start an embedded cluster. Worker logs reach the terminal only when verbose
    (they stay in Ray's session logs either way; worker errors are re-raised on the driver)."""
    if ray.is_initialized():
        return
    if address:
        check_gcs_address(address)  # ray.init would retry for ~15 minutes where nothing listens
        token_auth_if_available()
        try:
            ray.init(address=address, log_to_driver=verbose)
        except ConnectionError as e:
            raise ConfigError(f"--address {address}: {str(e).strip().splitlines()[0]}") from None
    else:
        # "local": always a fresh embedded cluster, never a stale one from ray_current_cluster.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=verbose)


def gpu_env(env: dict, num_gpus: float) -> dict:
    """`env` for a task or actor given `num_gpus`: with none, no GPU is visible to it. Ray leaves
    CUDA_VISIBLE_DEVICES unset for a 0-GPU process, so torch would see every GPU of the node and put a model on
    cuda:0, next to a training rank's."""
    return {**env, "CUDA_VISIBLE_DEVICES": ""} if not num_gpus else dict(env)
