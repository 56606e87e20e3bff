"""`online`: the teacher runs on the training ranks every step (replicated, or ZeRO-3-partitioned across them:
method.teacher.placement). Dense logits or top-k, and hidden states. Imports neither ray nor deepspeed."""

from __future__ import annotations

import torch

from distune.tasks import model_inputs
from distune.logits import head_at
from distune.signals.base import BuildContext, Prepared, Signal, TeacherOutput, register_signal, topk_logprobs
from distune.signals.loading import load_teacher, teacher_blueprint


@register_signal("online")
class OnlineSignal(Signal):
    """A frozen model (plain module or an inference engine with the same call surface) run every step."""

    column = 0  # its place among distune plan's columns
    table = "colocated"
    runs_here = dense = hidden_states = on_policy = True

    def __init__(self, model, vocab_size: int, top_k: int | None, temperature: float, hidden_states: bool = False):
        self.model, self.vocab_size, self.top_k = model, vocab_size, top_k
        self.temperature, self.wants_hidden = temperature, hidden_states

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], positions: torch.Tensor) -> TeacherOutput:
        with head_at(self.model, positions) as sel:  # the head runs on the KD positions only
            out = self.model(**model_inputs(batch), output_hidden_states=self.wants_hidden)
        # Padded embedding rows (ids no tokenizer produces) are cut off: both sides see the same vocabulary.
        logits = sel.pick(out.logits)[:, : self.vocab_size]
        hidden = tuple(out.hidden_states) if self.wants_hidden else None
        if self.top_k is None:
            return TeacherOutput(logits=logits, hidden=hidden)
        ids, logp = topk_logprobs(logits, self.top_k, self.temperature)
        return TeacherOutput(topk_ids=ids, topk_logp=logp, hidden=hidden)

    @classmethod
    def build(cls, name: str, prep: Prepared, ctx: BuildContext) -> OnlineSignal:
        spec = prep.spec
        partitioned = spec.partitioned(ctx.stage)
        model = None
        if partitioned:
            # Built already partitioned, each rank reading only its slices; loaded whole (and partitioned by
            # DeepSpeed) where its checkpoint cannot be read that way (validate printed why).
            plan, _ = teacher_blueprint(prep)
            model = ctx.load_partitioned(plan, spec.dtype) if plan is not None else None
        engine = ctx.frozen_engine(model if model is not None else load_teacher(prep), spec.dtype, partitioned)
        return cls(engine, prep.vocab_size, spec.top_k, spec.temperature, spec.hidden_states)
