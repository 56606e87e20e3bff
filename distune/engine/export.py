"""Gather parameters to rank 0 for export, also under ZeRO-3 (where each rank holds a slice).

Without the gather a ZeRO-3 module's parameters are empty placeholders on every rank: saving them is
the "empty adapter" bug. `gather_state_dict` refuses to return an empty tensor.
"""

from __future__ import annotations

import torch

import deepspeed


def release_gathered(engine) -> None:
    """Partition every parameter again before a gather for export. After an eval forward, ZeRO-3's prefetch may
    leave parameters gathered or still in flight for a backward that never comes (with stage3_max_live_parameters
    below the model's size), and a gather's exit cannot partition a parameter in flight."""
    if engine.zero_optimization_stage() == 3:
        engine.empty_partition_cache()


def gather_state_dict(module: torch.nn.Module, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Full-size CPU tensors on rank 0 ({} elsewhere). Collective: every rank must call it."""
    rank = torch.distributed.get_rank()
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if keys is not None and name not in keys:
            continue
        # One parameter at a time keeps the peak at one full tensor per rank.
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None, enabled=hasattr(param, "ds_id")):
            if rank == 0:
                out[name] = param.detach().to("cpu", copy=True)
    if keys is None and rank == 0:
        params = {n for n, _ in module.named_parameters(remove_duplicate=False)}
        for name, buf in module.state_dict().items():
            if name not in params and name not in out:
                out[name] = buf.detach().to("cpu", copy=True)
    if rank == 0:
        empty = [n for n, t in out.items() if t.numel() == 0]
        if empty or (keys and not out):
            raise RuntimeError(f"export gathered empty tensors ({empty[:3] or 'none matched'}): refusing to write")
    return out
