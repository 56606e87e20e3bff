"""The cluster decides `cluster.use_gpu: auto` and `dtype: auto`, not the machine that starts the job.

For `distune run --address` (and a submitted job, whose driver runs `distune run --address auto` on the head):
`use_gpu: auto` is true when the cluster advertises GPU resources; `dtype: auto` follows what a Ray task placed
like a training worker (one GPU, or none) finds on its machine (`hardware.facts`). A laptop, or a CPU-only head,
that starts a job on a GPU cluster gets GPUs and bf16; a GPU workstation joined to a CPU cluster gets CPUs.
"""

from __future__ import annotations

from distune.config import ConfigError, RunConfig, resolve_for_hardware
from distune.hardware import Facts, facts

from distune.cluster.session import ray

PROBE_TIMEOUT_S = 120.0


@ray.remote(num_cpus=0, max_retries=0)
def _facts(hide_gpus: bool) -> Facts:
    if hide_gpus:  # a CPU worker sees no GPU (cluster.session.gpu_env); its CPU is what counts
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return facts()


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def resolve_on_cluster(cfg: RunConfig, timeout_s: float = PROBE_TIMEOUT_S) -> str:
    """Resolve `cfg`'s `auto`s on the connected Ray cluster (ray.init done); a line that says what was decided."""
    gpus = cluster_gpus()
    wanted = cfg.cluster.use_gpu
    if wanted is True and not gpus:
        raise ConfigError("cluster.use_gpu: true, but the Ray cluster advertises no GPU resources; set it to auto "
                          "or false, or add GPU nodes")
    gpu = bool(gpus) if wanted == "auto" else bool(wanted)
    # A task placed like a worker: on a GPU node (a GPU node may be busy or still starting: wait, then assume).
    probe = _facts.options(num_gpus=1 if gpu else 0).remote(not gpu)
    try:
        seen = ray.get(probe, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(probe, force=True)
        seen = Facts(known=False)
    if gpu and seen.known and not seen.gpus:
        raise ConfigError(f"cluster.use_gpu: {wanted}: the Ray cluster advertises {gpus:g} GPUs, but a task given "
                          f"one sees no CUDA device (a node started with --num-gpus on a machine without CUDA, or "
                          f"CUDA_VISIBLE_DEVICES emptied); set cluster.use_gpu: false, or fix the node")
    resolve_for_hardware(cfg, seen, gpu=gpu, gpus=int(gpus))
    where = (f"{gpus:g} GPUs" + (f" ({seen.gpu_name})" if seen.gpu_name else "")) if gpu else "CPUs"
    guess = "" if seen.known else f" (no GPU answered within {timeout_s:g} s: bf16 assumed)"
    return (f"the cluster has {where}: cluster.use_gpu={cfg.cluster.use_gpu}, "
            f"cluster.num_workers={cfg.cluster.num_workers}, model.dtype={cfg.model.dtype}{guess}")
