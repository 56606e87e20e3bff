"""`cached`: the teacher's top-k (or, for a classifier student, its class log-probs) written once by
`distune cache-teacher` (distune.signals.cache) and attached to the training samples, so training runs no
teacher. Imports neither ray nor deepspeed."""

from __future__ import annotations

import torch

from distune.signals import cache
from distune.signals.base import BuildContext, Prepared, Signal, TeacherOutput, register_signal


@register_signal("cached")
class CachedSignal(Signal):
    """Top-k from the batch: the loader scattered the cache rows onto the trained positions."""

    column = 1  # its place among distune plan's columns
    table = "cached"
    classes = reads_cache = True

    def __init__(self, vocab_size: int | None = None):
        self.vocab_size = vocab_size  # the student's logits are cut to it, as with the online teacher

    def __call__(self, batch: dict[str, torch.Tensor], positions: torch.Tensor | None) -> TeacherOutput:
        if "teacher_class_logp" in batch:  # a classifier student: the teacher's class log-probs [B, C]
            return TeacherOutput(logits=batch["teacher_class_logp"])
        if "teacher_topk_ids" not in batch:
            raise ValueError("signal 'cached' but the batch carries no teacher top-k: the cache was not attached")
        return TeacherOutput(topk_ids=batch["teacher_topk_ids"][:, :-1][positions],
                             topk_logp=batch["teacher_topk_logp"][:, :-1][positions].float())

    @classmethod
    def check_run(cls, spec, task, cfg) -> None:
        # Checked before preflight, which would first ask for the cache to be built.
        if task.distills == "classes" and cfg.data.tasks:
            raise ValueError("data.tasks: a classifier's teacher cache is keyed by data line, which tasks share; "
                             "use method.signal: online, or one data file")

    @classmethod
    def preflight(cls, prep: Prepared, task, check_cache: bool) -> None:
        if check_cache:
            spec = prep.spec
            cache.check_meta(cache.read_meta(spec.cache_dir), spec, prep.vocab_size, spec.cache_dir,
                             classes=task.distills == "classes")

    @classmethod
    def build(cls, name: str, prep: Prepared, ctx: BuildContext) -> CachedSignal:
        cache.attach(ctx.train_samples, prep.spec.cache_dir, classes=ctx.task.distills == "classes")
        return cls(prep.vocab_size)
