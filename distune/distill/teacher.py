"""Teacher signals behind one seam: what the student's loss sees of the teacher.

A signal is called with the (student-side) batch and the positions the loss trains, and returns the
teacher's view of exactly those positions (`TeacherOutput`): dense logits, or top-k ids + log-probs at
the distillation temperature, and optionally hidden states. Three sources implement it:
- `OnlineTeacher`: a frozen model on the same ranks (replicated, or a ZeRO-3 inference engine built by
  the runner) runs its forward every step;
- `CachedTeacher`: top-k read from the batch, which the data layer filled from `distune cache-teacher`;
- a remote actor group (distune.cluster.teachers) serving top-k to the student ranks.
Imports neither ray nor deepspeed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distune.data.loader import model_inputs
from distune.logits import head_at


@dataclass
class TeacherSpec:
    """What the runner must build for a teacher (returned by a method's `frozen_models`)."""

    path: str
    dtype: str = "bf16"
    trust_remote_code: bool = False
    signal: str = "online"  # online | cached | remote
    top_k: int | None = None  # None: dense logits (online only)
    temperature: float = 1.0
    hidden_states: bool = False
    cache_dir: str | None = None
    remote: dict = field(default_factory=dict)  # actors, cpus_per_actor, gpus_per_actor, prefetch
    prompt: str | None = None  # the teacher's own prompt template / system message (cross-architecture)
    system: str | None = None
    positions: str = "response"  # response | all: which positions the KD term covers (see kd_positions)
    placement: str = "auto"  # online: auto | partitioned | replicated (see TeacherOptions.placement)

    def partitioned(self, student_stage: int) -> bool:
        """Whether an online teacher is ZeRO-3-partitioned across the ranks (auto: when the student is)."""
        return self.placement == "partitioned" or (self.placement == "auto" and student_stage == 3)


@dataclass
class TeacherOutput:
    """The teacher at the selected positions `[N, ...]` (N = number of trained positions in the batch)."""

    logits: torch.Tensor | None = None  # [N, V] dense (vocabulary already aligned)
    topk_ids: torch.Tensor | None = None  # [N, k], sorted by descending probability
    topk_logp: torch.Tensor | None = None  # [N, k] log-probs at the distillation temperature
    hidden: tuple[torch.Tensor, ...] | None = None  # full [B, L, H] hidden states (online only)
    wait_s: float | None = None  # remote only: seconds the student rank waited for the answer
    prefetched: bool | None = None  # remote only: the answer was asked for before this batch's turn


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, L-1] bool: position p is trained when it predicts a labelled token p+1."""
    return labels[:, 1:] != -100


def kd_positions(batch: dict[str, torch.Tensor], which: str) -> torch.Tensor:
    """[B, L-1] bool: the positions the KD term covers.

    `response`: the trained positions (the CE loss's). `all`: every position predicting a real token of
    the same row (prompt included), so a student pruned from a bigger model also relearns language
    modelling from the teacher's distributions ("healing", as Minitron distils on whole sequences)."""
    if which == "response":
        return trained_positions(batch["labels"])
    mask = batch["attention_mask"].bool()
    return mask[:, 1:] & mask[:, :-1]


def topk_logprobs(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely ids and their log-probs under softmax(logits / T), computed in fp32."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    values, ids = logp.topk(k, dim=-1)
    return ids, values


class OnlineTeacher:
    """A frozen model (plain module or an inference engine with the same call surface) run every step."""

    def __init__(self, model, vocab_size: int, top_k: int | None, temperature: float, hidden_states: bool = False):
        self.model, self.vocab_size, self.top_k = model, vocab_size, top_k
        self.temperature, self.hidden_states = temperature, hidden_states

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], positions: torch.Tensor) -> TeacherOutput:
        with head_at(self.model, positions) as sel:  # the head runs on the KD positions only
            out = self.model(**model_inputs(batch), output_hidden_states=self.hidden_states)
        # Padded embedding rows (ids no tokenizer produces) are cut off: both sides see the same vocabulary.
        logits = sel.pick(out.logits)[:, : self.vocab_size]
        hidden = tuple(out.hidden_states) if self.hidden_states else None
        if self.top_k is None:
            return TeacherOutput(logits=logits, hidden=hidden)
        ids, logp = topk_logprobs(logits, self.top_k, self.temperature)
        return TeacherOutput(topk_ids=ids, topk_logp=logp, hidden=hidden)


class CachedTeacher:
    """Top-k from the batch: the loader scattered the cache rows onto the trained positions."""

    def __init__(self, vocab_size: int | None = None):
        self.vocab_size = vocab_size  # the student's logits are cut to it, as with the online teacher

    def __call__(self, batch: dict[str, torch.Tensor], positions: torch.Tensor | None) -> TeacherOutput:
        if "teacher_class_logp" in batch:  # a classifier student: the teacher's class log-probs [B, C]
            return TeacherOutput(logits=batch["teacher_class_logp"])
        if "teacher_topk_ids" not in batch:
            raise ValueError("signal 'cached' but the batch carries no teacher top-k: the cache was not attached")
        return TeacherOutput(topk_ids=batch["teacher_topk_ids"][:, :-1][positions],
                             topk_logp=batch["teacher_topk_logp"][:, :-1][positions].float())
