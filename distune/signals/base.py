"""The teacher-signal interface: what a student's loss sees of its teacher, and the registry of signals.

A signal is called with the (student-side) batch and the positions the loss trains, and returns the
teacher's view of exactly those positions (`TeacherOutput`): dense logits, or top-k ids + log-probs at
the distillation temperature, and optionally hidden states. A signal is one registered class: it declares
what it can serve (class attributes), checks a teacher's options against that, is built for a rank by
`build`, and may be told each micro-batch ahead of its turn (`prefetch`). Imports neither ray nor deepspeed,
nor the methods that ask for teachers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from distune.registry import Registry


@dataclass
class TeacherSpec:
    """What the runner must build for a teacher (returned by a method's `frozen_models`)."""

    path: str
    dtype: str = "bf16"
    trust_remote_code: bool = False
    signal: str = "online"  # a registered signal name (distune.signals)
    top_k: int | None = None  # None: dense logits (signals with `dense`)
    temperature: float = 1.0
    hidden_states: bool = False
    cache_dir: str | None = None
    cache_compress: bool = False  # cache-teacher writes compressed npz shards instead of memory-mappable ones
    remote: dict = field(default_factory=dict)  # actors, cpus_per_actor, gpus_per_actor, prefetch
    prompt: str | None = None  # the teacher's own prompt template / system message (cross-architecture)
    system: str | None = None
    positions: str = "response"  # response | all: which positions the KD term covers (see kd_positions)
    placement: str = "auto"  # where a teacher that runs on the training ranks lives: auto | partitioned | replicated

    def partitioned(self, student_stage: int) -> bool:
        """Whether the teacher is ZeRO-3-partitioned across the ranks (auto: when the student is)."""
        return self.placement == "partitioned" or (self.placement == "auto" and student_stage == 3)


@dataclass
class TeacherOutput:
    """The teacher at the selected positions `[N, ...]` (N = number of trained positions in the batch)."""

    logits: torch.Tensor | None = None  # [N, V] dense (vocabulary already aligned)
    topk_ids: torch.Tensor | None = None  # [N, k], sorted by descending probability
    topk_logp: torch.Tensor | None = None  # [N, k] log-probs at the distillation temperature
    hidden: tuple[torch.Tensor, ...] | None = None  # full [B, L, H] hidden states
    wait_s: float | None = None  # seconds the student rank waited for the answer (signals served elsewhere)
    prefetched: bool | None = None  # the answer was asked for before this batch's turn


@dataclass
class Prepared:
    """A teacher resolved and checked on this machine (distune.signals.teachers.preflight)."""

    spec: TeacherSpec
    source: str
    config: object  # transformers PretrainedConfig
    vocab_size: int | None  # logit columns shared with the student (None: a class-probability teacher)


@dataclass
class BuildContext:
    """What building a signal on a training rank may use; the runner provides it, so that no signal reaches into
    the engine or the cluster layer itself."""

    stage: int  # the student's ZeRO stage
    task: object  # the student's task (distune.tasks.Task)
    train_samples: list  # this rank's training samples (a cache attaches its rows to them)
    frozen_engine: Callable  # (model, dtype, partitioned: bool) -> an inference engine with the model's call surface
    load_partitioned: Callable  # (blueprint, dtype) -> the teacher built already partitioned across the ranks
    served: dict = field(default_factory=dict)  # teacher name -> a signal the cluster layer built (actors)


class Signal:
    """One teacher signal. Subclasses register with `@register_signal(name)` and set what they serve."""

    name: ClassVar[str] = ""
    table: ClassVar[str] = ""  # its column in `distune plan`'s memory table (where the teacher's memory goes)
    column: ClassVar[int] = 100  # the column's place in that table
    runs_here: ClassVar[bool] = False  # the teacher's weights live on the training ranks (placement applies)
    dense: ClassVar[bool] = False  # can give whole [N, V] logits (else top-k, 64 by default)
    hidden_states: ClassVar[bool] = False  # can give the teacher's hidden states
    on_policy: ClassVar[bool] = False  # can score sequences that exist only at train time (the student's samples)
    classes: ClassVar[bool] = False  # can give a classifier student class probabilities
    reads_cache: ClassVar[bool] = False  # reads what `distune cache-teacher` wrote (method.cache_dir)
    served: ClassVar[bool] = False  # runs in a Ray actor group of its own, started by the cluster layer
    vocab_size: int | None = None  # the student's logits are cut to it, as the teacher's are
    model = None  # the teacher's model where it runs on this rank (then scored before training too)
    # `prefetch(batch)`, where a signal defines it: the loop hands it each CPU micro-batch before its turn, so work
    # elsewhere (a remote teacher's forward) overlaps the student's step.
    prefetch = None

    def __call__(self, batch: dict[str, torch.Tensor], positions: torch.Tensor | None) -> TeacherOutput:
        raise NotImplementedError

    @classmethod
    def check_run(cls, spec: TeacherSpec, task, cfg) -> None:
        """Raise ValueError naming the key for a run configuration this signal cannot serve (validation, before
        anything is loaded). No-op by default."""

    @classmethod
    def preflight(cls, prep: Prepared, task, check_cache: bool) -> None:
        """Checks on the driver and on every rank before building (e.g. a cache matches). Raise ValueError."""

    @classmethod
    def build(cls, name: str, prep: Prepared, ctx: BuildContext) -> Signal:
        """This rank's signal for the teacher `name` (its key under the method's frozen models)."""
        raise NotImplementedError

    @classmethod
    def actors(cls, spec: TeacherSpec) -> dict | None:
        """The Ray actor group it needs ({actors, cpus_per_actor, gpus_per_actor}), or None."""
        return None


DEFAULT_SIGNAL = "online"
ENTRY_POINT_GROUP = "distune.signals"
SIGNALS = Registry("teacher signal", ENTRY_POINT_GROUP, Signal)
register_signal = SIGNALS.register  # class decorator: `@register_signal("cached")`


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
