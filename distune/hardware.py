"""What the machines that run the workers compute natively: the choices behind `cluster.use_gpu: auto` and
`dtype: auto`.

bf16 is only fast where the hardware has it: a CUDA GPU from Ampere on, or a CPU with AVX512-BF16, AMX or ARM's
BF16 extension. Elsewhere torch emulates it: on the 2-core AVX2 EPYC this project is tested on, a bf16 matmul
runs at 1.0 GFLOP/s against fp32's 31.7 (1 thread, 800x576 @ 576x1536), so a bf16 run is some 30x slower.

`Facts` are read on a worker's machine (`facts()`): on this one for a local run, by a Ray task placed like a
training worker for a run on a cluster (`distune.cluster.target`). Imports torch inside functions only (the config
module imports this one).
"""

from __future__ import annotations

import os

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Facts:
    """What one worker's machine offers. `known=False`: nobody looked (a submit resolves on the cluster)."""

    gpus: int = 0
    gpu_name: str | None = None
    gpu_bf16: bool = False
    gpu_tf32: bool = False  # Ampere (compute capability 8.0) and later
    cpu_bf16: bool = False
    known: bool = True


def facts() -> Facts:
    """This process's view: the CUDA devices it may use, and its CPU."""
    import torch

    if not torch.cuda.is_available():
        return Facts(cpu_bf16=cpu_has_native_bf16())
    major, _ = torch.cuda.get_device_capability(0)
    return Facts(gpus=torch.cuda.device_count(), gpu_name=torch.cuda.get_device_name(0),
                 gpu_bf16=torch.cuda.is_bf16_supported(), gpu_tf32=major >= 8, cpu_bf16=cpu_has_native_bf16())


def cpu_has_native_bf16() -> bool:
    import torch

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)  # private torch probes: absent in some builds
        if check is not None and check():
            return True
    try:  # aarch64 lists its BF16 extension in the CPU features
        return any(line.startswith("Features") and " bf16" in line
                   for line in Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return False


def uses_gpu(setting: bool | str) -> bool:
    """cluster.use_gpu on this machine: `auto` means "if this machine sees CUDA" (a local run: the driver's machine
    is the cluster). A run on a Ray cluster resolves `auto` from the cluster instead (distune.cluster.target)."""
    if setting == "auto":
        import torch

        return torch.cuda.is_available()
    return bool(setting)


def worker_env(cfg) -> dict[str, str]:
    """The environment of a run's worker processes (Ray Train workers, Ray tasks): cluster.env, plus
    DS_ACCELERATOR=cpu for CPU workers. DeepSpeed picks its accelerator when it is imported: without this, a CPU
    worker on a machine with CUDA libraries would pick cuda."""
    return dict(cfg.cluster.env) | ({} if uses_gpu(cfg.cluster.use_gpu) else {"DS_ACCELERATOR": "cpu"})


def select_accelerator(cfg) -> bool:
    """The same choice for this process (a worker started without Ray), before deepspeed is imported. Returns
    whether it uses a GPU."""
    os.environ.update({k: v for k, v in worker_env(cfg).items() if k == "DS_ACCELERATOR"})
    return uses_gpu(cfg.cluster.use_gpu)


def gpu_count() -> int:
    """CUDA devices this process sees."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def auto_dtype(uses_gpu: bool, seen: Facts | None = None) -> str:
    """bf16 where it is native on the workers' hardware (`seen`; default: this machine's), fp32 elsewhere. fp16 is
    never chosen (it needs loss scaling). A GPU nobody has looked at is assumed to have bf16, as every data-centre
    GPU since the A100 does."""
    seen = facts() if seen is None else seen
    if uses_gpu:
        return "bf16" if not seen.known or seen.gpus == 0 or seen.gpu_bf16 else "fp32"
    return "bf16" if seen.cpu_bf16 else "fp32"
