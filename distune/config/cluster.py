"""The `cluster:` section: how many workers, on GPUs or CPUs, placed how, with which environment (never secrets).

Imports only distune.config.strict (and never ray).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from distune.config.strict import Strict


class ClusterSection(Strict):
    num_workers: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        1, description="Training workers (ranks), one GPU each on GPUs. auto: one per GPU where the job runs (this "
        "machine's GPUs for a local run, the Ray cluster's for --address / submit), 2 on CPUs; where the global "
        "batch is not a multiple of micro_batch_size x workers, auto lowers the micro-batch to the largest that "
        "divides it. Recorded resolved in run_dir/config.yaml.")
    use_gpu: bool | Literal["auto"] = Field(
        "auto", description="auto: GPUs if the cluster the job runs on has them (a local run: this machine sees CUDA; "
        "--address / submit / k8s render: the Ray cluster advertises GPU resources). Resolved before any worker "
        "starts, and recorded resolved in run_dir/config.yaml.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs Ray reserves for each training worker.")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts from the last checkpoint (-1: forever).")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement of the workers: PACK fills a node before the next (fewest nodes); SPREAD "
        "prefers distinct nodes; STRICT_PACK one node or nothing; STRICT_SPREAD one worker per node or nothing "
        "(needs --address of a cluster with a node per worker; Ray Train also places an empty coordinator bundle, "
        "so keep one node more than workers).")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for workers.")

    @field_validator("env")
    @classmethod
    def _no_secrets(cls, v: dict[str, str]) -> dict[str, str]:
        # Configs get copied into run folders, W&B and manifests: secrets must never live in them.
        for key in v:
            if looks_secret(key):
                raise ValueError(f"{key} looks like a secret; set it in the environment (on Kubernetes: from a "
                                 f"Secret, see k8s/README.md), not in the config")
        return v


def looks_secret(name: str) -> bool:
    """Whether an environment variable's name says it holds a credential (WANDB_API_KEY, HF_TOKEN, ...)."""
    return any(word in name.upper() for word in ("KEY", "TOKEN", "SECRET", "PASSWORD"))
