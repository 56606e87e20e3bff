"""The remote teacher's actor group: Ray actors with their own resources (e.g. other GPUs) serving top-k log-probs
to the student ranks, and the transport the `remote` signal (distune.signals.remote) sends its requests through.

Each actor holds a full teacher replica: on its GPU, spread over its GPUs (`gpus_per_actor` > 1: a layer range on
each, for a teacher bigger than one device), or on CPU; an actor without GPUs sees none. Student rank r asks
actor r % actors, so the load spreads and one rank's requests stay in order.
"""

from __future__ import annotations

import torch

from distune.cluster.session import gpu_env, ray
from distune.signals import OnlineSignal, RemoteSignal, TeacherSpec
from distune.signals.loading import place_teacher


@ray.remote
class TeacherActor:
    def __init__(self, prep, use_gpu: bool):
        # Ray set CUDA_VISIBLE_DEVICES to this actor's GPUs (none for a 0-GPU actor): those are all it sees.
        on = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        model, self.device = place_teacher(prep, on)
        self.teacher = OnlineSignal(model, prep.vocab_size, prep.spec.top_k, prep.spec.temperature)

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


class ActorTransport:
    """Requests to an actor group: student rank r asks actor r % actors (its requests stay in order)."""

    def __init__(self, actors: list):
        self.actors = actors

    def ask(self, inputs: dict, positions: torch.Tensor):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return self.actors[rank % len(self.actors)].topk.remote(inputs, positions)

    def get(self, ref) -> tuple[torch.Tensor, torch.Tensor]:
        return ray.get(ref)


class RemoteTeacher(RemoteSignal):
    """The `remote` signal of a student rank, over the actors of `start_teachers`."""

    def __init__(self, actors: list, vocab_size: int, positions: str = "response", prefetch: bool = True):
        super().__init__(ActorTransport(actors), vocab_size, positions, prefetch)


def start_remote_signals(cfg, model_source: str, use_gpu: bool, specs: dict[str, TeacherSpec]) -> dict:
    """name -> RemoteTeacher for every teacher in `specs` whose signal runs in an actor group of its own: the groups
    started (they live until killed: `stop`)."""
    from distune.models import load_model_config, load_tokenizer
    from distune.signals import get_signal
    from distune.signals.teachers import preflight

    served = {name: spec for name, spec in specs.items() if get_signal(spec.signal).served}
    if not served:
        return {}
    tokenizer = load_tokenizer(model_source, cfg.model.trust_remote_code)
    prepared = preflight(served, tokenizer, load_model_config(model_source, cfg.model.trust_remote_code))
    return {name: RemoteTeacher(start_teachers(prep, use_gpu), prep.vocab_size, prep.spec.positions,
                                prep.spec.remote["prefetch"])
            for name, prep in prepared.items()}


def stop(signals: dict) -> None:
    """End the actor groups of `start_remote_signals`."""
    for signal in signals.values():
        for actor in signal.transport.actors:
            ray.kill(actor)
