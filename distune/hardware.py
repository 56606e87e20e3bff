"""What the machine computes natively: the choice behind `dtype: auto`.

bf16 is only fast where the hardware has it: a CUDA GPU from Ampere on, or a CPU with AVX512-BF16, AMX or ARM's
BF16 extension. Elsewhere torch emulates it: on the 2-core AVX2 EPYC this project is tested on, a bf16 matmul
runs at 1.0 GFLOP/s against fp32's 31.7 (1 thread, 800x576 @ 576x1536), so a bf16 run is some 30x slower.
Imports torch inside functions only (the config module imports this one).
"""

from __future__ import annotations

from pathlib import Path


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
    """cluster.use_gpu: `auto` means "if this (driver) machine sees CUDA", as in cluster.fit."""
    if setting == "auto":
        import torch

        return torch.cuda.is_available()
    return bool(setting)


def auto_dtype(uses_gpu: bool) -> str:
    """bf16 where it is native; fp32 elsewhere. A GPU target the driver cannot see (a remote cluster's) is assumed
    to have bf16, as every data-centre GPU since the A100 does; fp16 is never chosen (it needs loss scaling)."""
    import torch

    if uses_gpu:
        return "bf16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"
