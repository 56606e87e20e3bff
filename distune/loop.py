"""The training loop: loss -> backward -> step, with log / eval / checkpoint cadence. No callbacks.

`engine` is anything with DeepSpeed's engine surface (forward, backward, step, get_lr, get_global_grad_norm,
set_gradient_accumulation_boundary, module); this module never imports deepspeed or ray.

Each optimizer step runs one round of grad_accum micro-batches per feed that has steps left (one feed, or one
per adapter: see distune.feeds), the method's `activate(model, feed)` before each round. DeepSpeed divides every
loss by its gradient_accumulation_steps (= grad_accum), as a run of that feed alone does; the boundary, where
the optimizer steps, is set explicitly on the step's last micro-batch, so it holds for any number of rounds. Metrics
stay tensors between log steps: `.item()` is a device sync, paid once per `log_every` steps. The ranks agree every
step whether to stop (SIGTERM) over a CPU (gloo) group of their own, which waits for no device work.

A frozen signal with a `prefetch(batch)` method (the remote teacher) is handed each feed's next micro-batch
before the current one's forward, so its work overlaps the student's; the data position saved in checkpoints
is still that of the batches trained on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    # Data position per feed ("" = the single feed): its next micro-batch is (epoch, batch).
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)

    def position(self, feed: str) -> tuple[int, int]:
        return tuple(self.positions.get(feed, (0, 0)))

    def as_client_state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_client_state(cls, client: dict, old_world: int = 1, world: int = 1) -> TrainState:
        """Positions count micro-batches per rank; on another worker count the same global sample is at
        batch * old_world / world (a global batch is a contiguous slice of the epoch's permutation, for any
        worker count: distune.data.loader.ShardedBatches)."""
        if "positions" not in client:  # one (epoch, batch) position rather than one per feed: the single feed's
            client = {"step": client["step"], "positions": {"": (client["epoch"], client["batch"])}}
        positions = {}
        for k, (epoch, batch) in client["positions"].items():
            if (batch * old_world) % world:
                raise ValueError(f"data position {batch} micro-batches x {old_world} workers does not split over "
                                 f"{world} workers")
            positions[k] = (epoch, batch * old_world // world)
        return cls(step=client["step"], positions=positions)


def _announced(batches, hooks: list[Callable[[dict], None]]):
    """`batches`, each (epoch, index, batch) yielded after the next one has been passed to every hook."""
    current = next(batches)
    for hook in hooks:
        hook(current[2])
    for upcoming in batches:
        for hook in hooks:
            hook(upcoming[2])
        yield current
        current = upcoming
    yield current


class _Window:
    """What the loop sums between two log steps, kept as tensors on the device; `flush` is the one sync."""

    def __init__(self, feeds: list, grad_accum: int, device: torch.device):
        self.feeds, self.grad_accum = feeds, grad_accum
        self.loss = {f.name: torch.zeros((), device=device) for f in feeds}
        self.rounds = {f.name: 0 for f in feeds}  # micro-batch rounds since the last log, per feed
        self.tokens = torch.zeros((), device=device, dtype=torch.long)
        self.extra: dict[str, torch.Tensor] = {}
        self.t_last, self.steps = time.perf_counter(), 0

    def add(self, feed: str, out, batch) -> None:
        self.loss[feed] += out.loss.detach()
        self.tokens += batch["attention_mask"].sum()
        for key, v in out.metrics.items():
            self.extra[key] = self.extra.get(key, 0) + v.detach().float()

    def flush(self, lr: float, state: TrainState, grad_norm) -> dict[str, float]:
        """The interval's metrics (global mean losses per feed, token rate across ranks, the method's own terms),
        then a fresh window."""
        feeds = self.feeds
        counted = [f for f in feeds if self.rounds[f.name]]
        packed = torch.stack([self.loss[f.name] / (self.rounds[f.name] * self.grad_accum) for f in counted]
                             + [self.tokens.float()])
        dist.all_reduce(packed)
        now = time.perf_counter()
        world = dist.get_world_size()
        losses = {f.name: packed[i].item() / world for i, f in enumerate(counted)}
        position = state.position(feeds[0].name)
        metrics = {
            "train/loss": sum(losses.values()) / len(losses),
            "train/lr": lr,
            "train/tokens_per_s": packed[-1].item() / (now - self.t_last),
            "train/step_time_s": (now - self.t_last) / self.steps,
            "train/epoch": position[0] + position[1] / feeds[0].batches.per_epoch,
        }
        if len(feeds) > 1:
            metrics |= {f"{name}/train/loss": v for name, v in losses.items()}
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        # A loss that is its CE (full, lora, ...) would log train/ce = train/loss; a composite one (distill:
        # CE + KD [+ hidden]) logs its CE term on its own.
        only_ce = set(self.extra) <= {"ce", "trained_tokens"}
        for k, v in self.extra.items():
            if k != "ce" or not only_ce:
                metrics[f"train/{k}"] = (v / (sum(self.rounds.values()) * self.grad_accum)).item()
        for f in feeds:
            self.loss[f.name].zero_()
            self.rounds[f.name] = 0
        self.tokens.zero_()
        self.extra.clear()
        self.t_last, self.steps = time.perf_counter(), 0
        return metrics


def _cpu_group():
    """The process group for the per-step stop vote: the default one where it is gloo already (CPU workers), else a
    gloo group over the same ranks, so that a CPU tensor carries the vote and no device stream is waited for."""
    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


@dataclass
class Cadence:
    total_steps: int
    stop_step: int  # < total_steps when this invocation ends early (train.stop_after_steps)
    grad_accum: int
    log_every: int
    eval_every: int | None
    ckpt_every: int | None


def train(engine, method, frozen: dict, feeds: list, state: TrainState, cadence: Cadence,
          device: torch.device, evaluate: Callable[[], dict], save: Callable[[TrainState], None],
          log: Callable[[dict, int], None], emit: Callable[[dict], None],
          start_round: Callable[[], None] = lambda: None,
          stop_requested: Callable[[], bool] = lambda: False) -> TrainState:
    """Run optimizer steps from `state` up to `cadence.stop_step` over `feeds` (distune.feeds.Feed); `start_round`
    runs before each feed's round when there are several (the engine's accumulation window). When any rank's
    `stop_requested()` says so, checkpoint after the current step and return early. Returns the final state."""
    prefetch = [s.prefetch for s in frozen.values() if getattr(s, "prefetch", None)]
    iters = {f.name: f.batches.iterate(*state.position(f.name)) for f in feeds}
    if prefetch:
        iters = {name: _announced(it, prefetch) for name, it in iters.items()}
    window = _Window(feeds, cadence.grad_accum, device)
    last_saved = state.step
    stop_votes = _cpu_group()
    while state.step < cadence.stop_step:
        lr = float(engine.get_lr()[0])  # the rate this step uses (the scheduler moves it after the step)
        active = [f for f in feeds if state.step < f.steps]  # a feed past its steps has lr 0: it is skipped
        for n, feed in enumerate(active):
            method.activate(engine.module, feed.name)
            if len(feeds) > 1:
                start_round()
            for k in range(cadence.grad_accum):
                engine.set_gradient_accumulation_boundary(n == len(active) - 1 and k == cadence.grad_accum - 1)
                epoch, index, batch = next(iters[feed.name])
                batch = batch.to(device, non_blocking=True)
                out = method.loss(engine, batch, frozen)
                engine.backward(out.loss)
                engine.step()  # DeepSpeed steps the optimizer only at the boundary
                window.add(feed.name, out, batch)
            per_epoch = feed.batches.per_epoch
            state.positions[feed.name] = (epoch, index + 1) if index + 1 < per_epoch else (epoch + 1, 0)
            window.rounds[feed.name] += 1
        state.step += 1
        window.steps += 1

        if state.step % cadence.log_every == 0 or state.step == cadence.stop_step:
            metrics = window.flush(lr, state, engine.get_global_grad_norm())
            log(metrics, state.step)
            emit({"kind": "step", "step": state.step, "loss": metrics["train/loss"],
                  "tokens_per_s": metrics["train/tokens_per_s"]})

        at_end = state.step == cadence.stop_step
        if cadence.eval_every and state.step % cadence.eval_every == 0 and not at_end:
            metrics = evaluate()
            log(metrics, state.step)
            emit({"kind": "eval", "step": state.step, "metrics": metrics})
            window.t_last = time.perf_counter()  # eval time is not training time
        # Every rank takes part in this scalar all-reduce every step, so they agree on the step to stop at.
        told = torch.tensor([float(stop_requested())])
        dist.all_reduce(told, op=dist.ReduceOp.MAX, group=stop_votes)
        preempted = bool(told.item()) and not at_end
        wants_ckpt = cadence.ckpt_every and state.step % cadence.ckpt_every == 0
        stopping_early = at_end and state.step < cadence.total_steps
        if wants_ckpt or stopping_early or preempted or (at_end and cadence.ckpt_every):
            if state.step != last_saved:
                save(state)
                last_saved = state.step
            window.t_last = time.perf_counter()
        if preempted:
            emit({"kind": "info", "text": f"stop requested: checkpoint of step {state.step} written; run the same "
                                          "command again to resume"})
            break
    return state
