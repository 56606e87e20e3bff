"""Start the process group and wrap a model with DeepSpeed ZeRO (training or inference-only).

The optimizer is built here from the parameters that require grad (the method set them); the
schedule is linear warmup then cosine decay to lr * min_lr_ratio.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*")  # torch 2.13 under ZeRO-3, per step
warnings.filterwarnings("ignore", category=FutureWarning, module="deepspeed")

import deepspeed  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402

from distune.engine.ds_config import ZERO3_GATHER  # noqa: E402
from distune.engine.host_memory import return_large_frees  # noqa: E402


def init_distributed(tf32: bool = True) -> tuple[int, int]:
    """Join the process group Ray / torchrun prepared, or make a world of one. Returns (rank, world).
    `tf32`: fp32 matmuls and convolutions use TF32 on a GPU that has it (Ampere on; model.tf32)."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if get_accelerator().device_name() == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    if get_accelerator().device_name() == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        use_tf32(tf32)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def use_tf32(on: bool) -> bool:
    """TF32 for fp32 matmuls and convolutions where the current GPU has it (compute capability 8.0 on); whether it
    is on. torch's default is off for matmuls: an fp32 run on an A100/H100 would use a fraction of the GPU."""
    on = on and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    return on


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    return torch.device(get_accelerator().current_device_name())


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup, then cosine to min_ratio at `total`; 0 past `total` (a parameter group whose schedule ends
    before the run's, e.g. one adapter of several: with lr 0 AdamW leaves it unchanged)."""

    def f(step: int) -> float:
        if step >= total:
            return 0.0
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_training_engine(model: torch.nn.Module, ds_config: dict, train_cfg, total_steps: int,
                          groups: list[dict] | None = None, compile_model: bool = False, checkpointing: bool = False):
    """`checkpointing`: the model recomputes its blocks in backward (gradient checkpointing)."""
    offloaded = "offload_optimizer" in ds_config.get("zero_optimization", {})
    # DeepSpeedCPUAdam: the offloaded optimizer's step runs on the host, vectorised (AVX) and threaded; torch's
    # AdamW there is several times slower. On a CPU-only run, nothing is offloaded to anywhere else.
    cpu_adam = offloaded and get_accelerator().device_name() == "cuda"
    optimizer, scheduler = build_optimizer(model, train_cfg, total_steps, groups, cpu_adam=cpu_adam)
    # Keep large frees off glibc's heap where a step frees many large host tensors: ZeRO-3 gathers whole
    # parameters; checkpointed backward on CPU recomputes and frees block activations (engine/host_memory.py).
    zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
    if zero3 or (checkpointing and get_accelerator().device_name() == "cpu"):
        return_large_frees()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    if compile_model:
        # DeepSpeed's own entry point: it compiles the wrapped module and keeps its ZeRO hooks working.
        engine.compile()
    return engine


def build_optimizer(model: torch.nn.Module, train_cfg, total_steps: int, groups: list[dict] | None = None,
                    cpu_adam: bool = False):
    """AdamW (DeepSpeed's CPU AdamW with `cpu_adam`: an offloaded optimizer) + LambdaLR. `groups` (from the method; default: every trainable parameter in one group) are dicts with `params` and
    optional `name`, `lr` (absolute; default train.lr), `lr_scale` (x lr; LoRA+), `warmup_steps`, `total_steps`,
    `min_lr_ratio` (a schedule of the group's own; the run's by default). Each group keeps its own AdamW state."""
    if groups is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ValueError("the method left no parameter with requires_grad=True: nothing would train")
    torch_groups, lambdas = [], []
    for g in groups:
        params = [p for p in g["params"] if p.requires_grad]
        lr = g.get("lr") or train_cfg.lr
        lr = lr * g.get("lr_scale", 1.0)
        schedule = lr_lambda(g.get("warmup_steps", train_cfg.warmup_steps), g.get("total_steps") or total_steps,
                             g.get("min_lr_ratio", train_cfg.min_lr_ratio))
        if train_cfg.weight_decay:
            # Biases and norms take no weight decay.
            parts = [([p for p in params if p.ndim >= 2], train_cfg.weight_decay),
                     ([p for p in params if p.ndim < 2], 0.0)]
        else:
            # One group: every extra group is another set of flat buffers and kernels in ZeRO's optimizer.
            parts = [(params, 0.0)]
        for part, decay in parts:
            if part:
                torch_groups.append({"params": part, "weight_decay": decay, "lr": lr, "name": g.get("name", "default")})
                lambdas.append(schedule)
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(torch_groups, lr=train_cfg.lr, betas=train_cfg.betas, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(torch_groups, lr=train_cfg.lr, betas=train_cfg.betas)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def start_round(engine) -> None:
    """Before a round of micro-batches that trains other parameters than the round before it (one adapter of
    several). ZeRO-3 copies a gradient into its partition buffer on a step's first micro-batch and adds to it on the
    others, so a parameter first reached later in the step would add to the previous step's stale gradient. Its
    zero_grad starts a new copy window (its parameters hold no gradient between backwards: they were partitioned).
    Stages 0-2 accumulate into cleared buffers: nothing to do."""
    if engine.zero_optimization_stage() == 3:
        engine.optimizer.zero_grad()


def frozen_ds_config(train_ds_config: dict, dtype: str) -> dict:
    """The DeepSpeed config of a frozen ZeRO-3-partitioned model (a teacher), whatever stage the student trains at:
    no optimizer, the student's parameter offload if it has one."""
    zero = train_ds_config["zero_optimization"]
    return {
        "train_micro_batch_size_per_gpu": train_ds_config["train_micro_batch_size_per_gpu"],
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False, **ZERO3_GATHER,
                              **({"offload_param": zero["offload_param"]} if "offload_param" in zero else {})},
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
        "steps_per_print": 10**9,
    }


def build_frozen_engine(model: torch.nn.Module, train_ds_config: dict, dtype: str, partitioned: bool):
    """A frozen model (a teacher) for forward passes next to the training engine.

    Partitioned: a ZeRO-3 DeepSpeed engine without optimizer, its parameters split across the ranks (every rank
    must then run its forward every step: the gathers are collective), whatever stage the student trains at.
    Otherwise replicated: a plain module on this rank's device.
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if not partitioned:
        return model.to(device())
    return_large_frees()  # every forward gathers and frees whole parameters: keep them off the heap
    engine, _, _, _ = deepspeed.initialize(model=model, config=frozen_ds_config(train_ds_config, dtype),
                                           dist_init_required=False)
    engine.eval()
    return engine
