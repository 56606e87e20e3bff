"""The remote teacher: a Ray actor group with its own resources (e.g. other GPUs) serving top-k log-probs.

Each actor holds a full teacher replica. Student rank r asks actor r % actors, so the load spreads and
one rank's requests stay in order. Only the trained positions' top-k travel back ([N, k] ids + fp32
log-probs), not [B, L, V] logits.
"""

from __future__ import annotations

import ray
import torch

from distune.data.loader import model_inputs
from distune.distill.teacher import OnlineTeacher, TeacherOutput


@ray.remote
class TeacherActor:
    def __init__(self, prep, use_gpu: bool):
        from distune.frozen import load_teacher

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        model = load_teacher(prep).to(self.device).eval()
        self.teacher = OnlineTeacher(model, prep.vocab_size, prep.spec.top_k, prep.spec.temperature)

    def ready(self) -> bool:
        return True

    def topk(self, inputs: dict, positions):
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        out = self.teacher(batch, positions.to(self.device))
        return out.topk_ids.cpu(), out.topk_logp.cpu()


def start_teachers(prep, use_gpu: bool) -> list:
    """The actor group for one teacher; returns once every replica has loaded (errors surface here)."""
    r = prep.spec.remote
    actors = [TeacherActor.options(num_cpus=r["cpus_per_actor"], num_gpus=r["gpus_per_actor"] if use_gpu else 0)
              .remote(prep, use_gpu) for _ in range(r["actors"])]
    ray.get([a.ready.remote() for a in actors])
    return actors


class RemoteTeacher:
    """The teacher signal on a student rank: forwards the batch to its actor and waits for the top-k."""

    def __init__(self, actors: list, vocab_size: int):
        self.actors, self.vocab_size = actors, vocab_size

    def __call__(self, batch: dict[str, torch.Tensor], positions: torch.Tensor) -> TeacherOutput:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        actor = self.actors[rank % len(self.actors)]
        inputs = {k: v.cpu() if torch.is_tensor(v) else v for k, v in model_inputs(batch).items()}
        ids, logp = ray.get(actor.topk.remote(inputs, positions.cpu()))
        device = batch["input_ids"].device
        return TeacherOutput(topk_ids=ids.to(device), topk_logp=logp.to(device))
