"""Our config -> a DeepSpeed config dict. `deepspeed.extra` is merged last (raw DeepSpeed keys win)."""

from __future__ import annotations

import copy
from typing import Any


# How many parameters ZeRO-3 keeps gathered during a step. DeepSpeed's default (1e9 each) keeps every parameter that
# is used again within a billion parameters, i.e. a whole model of a billion parameters between its forward and
# backward: a 1.17B LoRA run on 2 ranks then peaked at 1.75x the model's bytes per rank (bench/sharded_load.py).
# 1e8 gathers a layer or two at a time and gathers again in backward, as FSDP does by default.
ZERO3_GATHER = {"stage3_max_live_parameters": 1e8, "stage3_max_reuse_distance": 1e8}


def build_ds_config(cfg, grad_accum: int) -> dict[str, Any]:
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.stage}
    # Pinned host memory: GPU<->host copies run at full PCIe speed and overlap compute. On CPU workers there is no
    # device to copy to (and pinning needs CUDA).
    pin = cfg.cluster.use_gpu is True
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if ds.stage == 3:
        # Export gathers parameters itself; DeepSpeed need not consolidate a 16-bit copy on every save.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        zero.update(ZERO3_GATHER)
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.model.dtype == "bf16"},
        "fp16": {"enabled": cfg.model.dtype == "fp16"},
        # We pass a torch optimizer; with offload DeepSpeed would otherwise insist on its own CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    # DeepSpeed clips at 1.0 when the key is absent: 0 is how it is told not to clip (train.grad_clip: null).
    out["gradient_clipping"] = cfg.train.grad_clip or 0.0
    return _merge(out, cfg.deepspeed.extra)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
