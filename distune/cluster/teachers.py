"""The remote teacher: a Ray actor group with its own resources (e.g. other GPUs) serving top-k log-probs.

Each actor holds a full teacher replica: on its GPU, spread over its GPUs (`gpus_per_actor` > 1: a layer range
on each, for a teacher bigger than one device), or on CPU; an actor without GPUs sees none. Student rank r asks
actor r % actors, so the load spreads and one rank's requests stay in order. Only the KD positions' top-k travel back ([N, k] ids + fp32 log-probs),
not [B, L, V] logits.

With `remote.prefetch` the training loop announces each micro-batch before its turn (distune.loop), so the
actor computes the next batches' top-k while the student runs forward and backward on this one; a request the
loop did not announce (GKD's on-policy samples) is sent when it comes, as without prefetch.
"""

from __future__ import annotations

import time
from collections import deque

import ray
import torch

from distune.cluster.tasks import gpu_env
from distune.data.loader import model_inputs
from distune.distill.teacher import OnlineTeacher, TeacherOutput, kd_positions


@ray.remote
class TeacherActor:
    def __init__(self, prep, use_gpu: bool):
        from distune.frozen import place_teacher

        # Ray set CUDA_VISIBLE_DEVICES to this actor's GPUs (none for a 0-GPU actor): those are all it sees.
        on = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        model, self.device = place_teacher(prep, on)
        self.teacher = OnlineTeacher(model, prep.vocab_size, prep.spec.top_k, prep.spec.temperature)

    def ready(self) -> bool:
        return True

    def devices(self) -> dict:
        """What this actor sees: CUDA_VISIBLE_DEVICES, torch's GPU count, and where the teacher's weights are."""
        import os

        return {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpus": torch.cuda.device_count(),
                "weights": sorted({str(p.device) for p in self.teacher.model.parameters()})}

    def topk(self, inputs: dict, positions):
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        out = self.teacher(batch, positions.to(self.device))
        return out.topk_ids.cpu(), out.topk_logp.cpu()


def start_teachers(prep, use_gpu: bool) -> list:
    """The actor group for one teacher; returns once every replica has loaded (errors surface here)."""
    r = prep.spec.remote
    gpus = r["gpus_per_actor"] if use_gpu else 0
    actors = [TeacherActor.options(num_cpus=r["cpus_per_actor"], num_gpus=gpus,
                                   runtime_env={"env_vars": gpu_env({}, gpus)}).remote(prep, use_gpu)
              for _ in range(r["actors"])]
    ray.get([a.ready.remote() for a in actors])
    return actors


class RemoteTeacher:
    """The teacher signal on a student rank: forwards batches to its actor and hands back their top-k.

    `positions` is the KD term's choice (TeacherSpec.positions): an announced batch is asked for exactly the
    positions the method will ask for, so a prefetched answer is the answer."""

    def __init__(self, actors: list, vocab_size: int, positions: str = "response", prefetch: bool = True):
        self.actors, self.vocab_size, self.positions = actors, vocab_size, positions
        self.enabled = prefetch
        self.pending: deque = deque()  # (input_ids, positions, ObjectRef), oldest first

    def _ask(self, batch: dict[str, torch.Tensor], positions: torch.Tensor):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        actor = self.actors[rank % len(self.actors)]
        inputs = {k: v.cpu() if torch.is_tensor(v) else v for k, v in model_inputs(batch).items()}
        return actor.topk.remote(inputs, positions.cpu())

    def prefetch(self, batch: dict[str, torch.Tensor]) -> None:
        """Called by the loop with a CPU micro-batch before its turn."""
        if self.enabled:
            positions = kd_positions(batch, self.positions)
            self.pending.append((batch["input_ids"], positions, self._ask(batch, positions)))
            while len(self.pending) > 8:  # never asked for (e.g. a run stopping early): bounded
                self.pending.popleft()

    def __call__(self, batch: dict[str, torch.Tensor], positions: torch.Tensor) -> TeacherOutput:
        ids, where = batch["input_ids"].cpu(), positions.cpu()
        ref = None
        for i, (p_ids, p_where, p_ref) in enumerate(self.pending):
            if torch.equal(p_ids, ids) and torch.equal(p_where, where):  # False on other shapes too
                # Announced batches come in order: the ones before this were replaced (GKD's on-policy samples).
                for _ in range(i + 1):
                    self.pending.popleft()
                ref = p_ref
                break
        prefetched = ref is not None
        t = time.perf_counter()
        top_ids, logp = ray.get(ref if prefetched else self._ask(batch, positions))
        device = batch["input_ids"].device
        return TeacherOutput(topk_ids=top_ids.to(device), topk_logp=logp.to(device),
                             wait_s=time.perf_counter() - t, prefetched=prefetched)
