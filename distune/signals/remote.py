"""`remote`: a teacher in an actor group of its own (other GPUs, other nodes) serving top-k log-probs to the
student ranks. The actors and how a request reaches them are the cluster layer's (distune.cluster.teachers
passes a transport); this module is the student rank's side, with prefetch. Only the KD positions' top-k travel
back ([N, k] ids + fp32 log-probs), not [B, L, V] logits.

With `remote.prefetch` the training loop announces each micro-batch before its turn (distune.loop), so the
actor computes the next batches' top-k while the student runs forward and backward on this one; a request the
loop did not announce (GKD's on-policy samples) is sent when it comes, as without prefetch. Imports neither ray
nor deepspeed.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from distune.tasks import model_inputs
from distune.signals.base import BuildContext, Prepared, Signal, TeacherOutput, TeacherSpec, kd_positions, register_signal


@register_signal("remote")
class RemoteSignal(Signal):
    """Forwards batches through `transport` (ask(inputs, positions) -> handle; get(handle) -> (ids, logp)) and hands
    back their top-k. `positions` is the KD term's choice (TeacherSpec.positions): an announced batch is asked for
    exactly the positions the method will ask for, so a prefetched answer is the answer."""

    column = 2  # its place among distune plan's columns
    table = "remote"
    on_policy = served = True

    def __init__(self, transport, vocab_size: int, positions: str = "response", prefetch: bool = True):
        self.transport, self.vocab_size, self.positions = transport, vocab_size, positions
        self.enabled = prefetch
        self.pending: deque = deque()  # (input_ids, positions, handle), oldest first

    def _ask(self, batch: dict[str, torch.Tensor], positions: torch.Tensor):
        inputs = {k: v.cpu() if torch.is_tensor(v) else v for k, v in model_inputs(batch).items()}
        return self.transport.ask(inputs, positions.cpu())

    def prefetch(self, batch: dict[str, torch.Tensor]) -> None:
        if self.enabled:
            positions = kd_positions(batch, self.positions)
            self.pending.append((batch["input_ids"], positions, self._ask(batch, positions)))
            while len(self.pending) > 8:  # never asked for (e.g. a run stopping early): bounded
                self.pending.popleft()

    def __call__(self, batch: dict[str, torch.Tensor], positions: torch.Tensor) -> TeacherOutput:
        ids, where = batch["input_ids"].cpu(), positions.cpu()
        handle = None
        for i, (p_ids, p_where, p_handle) in enumerate(self.pending):
            if torch.equal(p_ids, ids) and torch.equal(p_where, where):  # False on other shapes too
                # Announced batches come in order: the ones before this were replaced (GKD's on-policy samples).
                for _ in range(i + 1):
                    self.pending.popleft()
                handle = p_handle
                break
        prefetched = handle is not None
        t = time.perf_counter()
        top_ids, logp = self.transport.get(handle if prefetched else self._ask(batch, positions))
        device = batch["input_ids"].device
        return TeacherOutput(topk_ids=top_ids.to(device), topk_logp=logp.to(device),
                             wait_s=time.perf_counter() - t, prefetched=prefetched)

    @classmethod
    def build(cls, name: str, prep: Prepared, ctx: BuildContext) -> Signal:
        if name not in ctx.served:
            raise ValueError("method.signal: remote needs the Ray actor group `distune run` starts; running without "
                             "Ray, use signal online or cached")
        return ctx.served[name]

    @classmethod
    def actors(cls, spec: TeacherSpec) -> dict:
        return spec.remote
