"""The training loop: loss -> backward -> step, with log / eval / checkpoint cadence. No callbacks.

`engine` is anything with DeepSpeed's engine surface (forward, backward, step, get_lr,
get_global_grad_norm); this module never imports deepspeed or ray. Metrics stay tensors between log
steps: `.item()` is a device sync, paid once per `log_every` steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position: the next micro-batch is (epoch, batch)
    batch: int = 0

    def as_client_state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_client_state(cls, client: dict) -> TrainState:
        return cls(step=client["step"], epoch=client["epoch"], batch=client["batch"])


@dataclass
class Cadence:
    total_steps: int
    stop_step: int  # < total_steps when this invocation ends early (train.stop_after_steps)
    grad_accum: int
    log_every: int
    eval_every: int | None
    ckpt_every: int | None


def train(engine, method, frozen: dict, batch_iter, per_epoch: int, state: TrainState, cadence: Cadence,
          device: torch.device, evaluate: Callable[[], dict], save: Callable[[TrainState], None],
          log: Callable[[dict, int], None], emit: Callable[[dict], None]) -> TrainState:
    """Run optimizer steps from `state` up to `cadence.stop_step`. Returns the final state."""
    loss_acc = torch.zeros((), device=device)
    tokens_acc = torch.zeros((), device=device, dtype=torch.long)
    extra_acc: dict[str, torch.Tensor] = {}
    t_last, steps_since = time.perf_counter(), 0
    last_saved = state.step
    while state.step < cadence.stop_step:
        lr = float(engine.get_lr()[0])  # the rate this step uses (the scheduler moves it after the step)
        for _ in range(cadence.grad_accum):
            epoch, index, batch = next(batch_iter)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            out = method.loss(engine, batch, frozen)
            engine.backward(out.loss)
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            loss_acc += out.loss.detach()
            tokens_acc += batch["attention_mask"].sum()
            for k, v in out.metrics.items():
                extra_acc[k] = extra_acc.get(k, 0) + v.detach().float()
        state.step += 1
        state.epoch, state.batch = (epoch, index + 1) if index + 1 < per_epoch else (epoch + 1, 0)
        steps_since += 1

        if state.step % cadence.log_every == 0 or state.step == cadence.stop_step:
            # The one sync per log interval: global mean loss and token count across ranks.
            packed = torch.stack([loss_acc / (steps_since * cadence.grad_accum), tokens_acc.float()])
            dist.all_reduce(packed)
            now = time.perf_counter()
            world = dist.get_world_size()
            metrics = {
                "train/loss": packed[0].item() / world,
                "train/lr": lr,
                "train/tokens_per_s": packed[1].item() / (now - t_last),
                "train/step_time_s": (now - t_last) / steps_since,
                "train/epoch": state.epoch + state.batch / per_epoch,
            }
            norm = engine.get_global_grad_norm()
            if norm is not None:
                metrics["train/grad_norm"] = float(norm)
            for k, v in extra_acc.items():
                if k != "ce":
                    metrics[f"train/{k}"] = (v / (steps_since * cadence.grad_accum)).item()
            log(metrics, state.step)
            emit({"kind": "step", "step": state.step, "loss": metrics["train/loss"],
                  "tokens_per_s": metrics["train/tokens_per_s"]})
            loss_acc.zero_()
            tokens_acc.zero_()
            extra_acc.clear()
            t_last, steps_since = time.perf_counter(), 0

        at_end = state.step == cadence.stop_step
        if cadence.eval_every and state.step % cadence.eval_every == 0 and not at_end:
            metrics = evaluate()
            log(metrics, state.step)
            emit({"kind": "eval", "step": state.step, "metrics": metrics})
            t_last = time.perf_counter()  # eval time is not training time
        wants_ckpt = cadence.ckpt_every and state.step % cadence.ckpt_every == 0
        stopping_early = at_end and state.step < cadence.total_steps
        if wants_ckpt or stopping_early or (at_end and cadence.ckpt_every):
            if state.step != last_saved:
                save(state)
                last_saved = state.step
            t_last = time.perf_counter()
    return state
