"""The task interface: what a model is trained to predict, and everything that differs by it.

A task owns its head (the transformers class it loads), its sample type and how a row renders into one,
collation into a batch, the loss of its head's output, evaluation and metrics, the statistics line a run prints,
and the configuration checks only it knows. A new task is one module with one `@register_task` class (or a
third-party package declaring it in the `distune.tasks` entry-point group). Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from distune.registry import Registry

ENTRY_POINT_GROUP = "distune.tasks"
IGNORE = -100  # the label of a position no loss trains (the Hugging Face convention)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached; stay tensors until logged


@dataclass
class EvalOptions:
    """What evaluating a task may use besides the model and the samples."""

    choices: list[str] | None = None  # eval.choices (tasks that score choices)
    choice_ids: list[list[int]] | None = None  # their token ids, as the response template renders them
    labels: list[str] | None = None  # class or tag names, index = id
    max_answer_tokens: int = 30  # the longest answer span a span head's prediction may be
    per_row: dict | None = None  # filled with {line: 1 if right else 0} over all held-out samples (where defined)


class Batch(dict):
    """A collated micro-batch: tensors by name, and the task that collated it (which owns its loss)."""

    def __init__(self, task: Task, tensors: dict[str, torch.Tensor]):
        super().__init__(tensors)
        self.task = task

    def to(self, device, non_blocking: bool = False) -> Batch:
        return Batch(self.task, {k: v.to(device, non_blocking=non_blocking) for k, v in self.items()})

    def __reduce__(self):  # pickles with its task (a batch sent to another process)
        return (Batch, (self.task, dict(self)))


class Task:
    """One task. Subclasses set the class attributes and implement what their rows and heads need."""

    name: ClassVar[str] = ""
    head: ClassVar[str | None] = None  # the transformers Auto class of its head; None: a causal LM
    labelled: ClassVar[str | None] = None  # what its label set counts ("classes", "tags"): data.labels applies
    packs: ClassVar[bool] = False  # several samples may share one row (data.packing)
    distills: ClassVar[str | None] = None  # what a teacher signal gives it: "tokens", "classes", or None
    scores_choices: ClassVar[bool] = False  # eval.choices applies

    # -- the model ----------------------------------------------------------------------------------

    def head_class(self):
        import transformers

        return getattr(transformers, self.head or "AutoModelForCausalLM")

    def head_options(self, labels: list[str] | None) -> dict:
        """from_pretrained / config keywords of its head (e.g. the number of classes)."""
        if labels is None:
            return {}
        return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {name: i for i, name in enumerate(labels)}}

    # -- configuration ------------------------------------------------------------------------------

    def check(self, cfg, method) -> None:
        """Raise ValueError naming the key for a configuration this task cannot run. By default: packing and
        eval.choices need the task to allow them."""
        if cfg.data.packing and not self.packs:
            raise ValueError(f"data.packing: a {self.name} head reads one sample per row; set it false")
        if cfg.eval.choices and not self.scores_choices:
            raise ValueError(f"eval.choices: a {self.name} model is scored by its head (over data.labels for "
                             f"classifiers); remove eval.choices")

    # -- data ----------------------------------------------------------------------------------------

    def label_names(self, renderer, line: int, row: dict) -> set[str]:
        """The label names one row uses (labelled tasks)."""
        raise NotImplementedError

    def render(self, renderer, line: int, row: dict, canonical: bool, labels: list[str] | None):
        """One row -> this task's sample, or None to drop the row (counted by `summarise`'s `dropped`). A
        DataError names the row (skipped under data.bad_rows: skip)."""
        raise NotImplementedError

    def summarise(self, train: list, eval_samples: list, data_cfg, labels: list[str] | None, dropped: list[int],
                  renderer) -> tuple[dict, list[str]]:
        """(statistics, warnings) of one source's splits: the common counts by default."""
        truncated = truncated_count(train, eval_samples, data_cfg.max_length)
        stats = totals(train, eval_samples, truncated)
        if self.labelled:
            stats[self.labelled] = len(labels)
        return stats, []

    def mixture_stats(self, parts: list, train: list, labels: list[str] | None) -> dict:
        """This task's own statistics of a data.tasks mixture (`parts`: each task's Splits)."""
        return {self.labelled: len(labels)} if self.labelled else {}

    def stats_line(self, stats: dict, labels: list[str] | None) -> str:
        """Its part of the run's `data:` line."""
        return f"{len(labels)} {self.labelled}" if self.labelled else ""

    def show(self, tokenizer, sample, labels: list[str] | None, max_length: int) -> tuple[str, str]:
        """(header details, text) of one sample for `distune plan --show-samples`."""
        return f"{len(sample.input_ids)} tokens", tokenizer.decode(sample.input_ids)

    # -- batches, loss, evaluation --------------------------------------------------------------------

    def collate(self, samples: list, pad_id: int) -> Batch:
        raise NotImplementedError

    def loss(self, model, batch: Batch, loss_chunk: int | None = None) -> LossOutput:
        raise NotImplementedError

    def evaluate(self, model, shard: list[tuple[object, float]], micro_batch: int, pad_id: int, device,
                 options: EvalOptions) -> dict[str, float]:
        """Metrics over all ranks (`shard`: this rank's (sample, weight) pairs, longest first)."""
        raise NotImplementedError


def totals(train_s: list, eval_s: list, truncated: int) -> dict:
    n = lengths(train_s)
    return {"train_rows": len(train_s), "eval_rows": len(eval_s), "truncated": truncated,
            "mean_tokens": float(n.sum()) / max(1, len(n)), "max_tokens": int(n.max()) if len(n) else 0}


def lengths(samples) -> np.ndarray:
    """Token counts of `samples`: a stored split's array (no sample is built), else counted."""
    known = getattr(samples, "lengths", None)
    if known is not None:
        return np.asarray(known)
    return np.asarray([len(s.input_ids) for s in samples], dtype=np.int64)


def truncated_count(train: list, eval_samples: list, max_length: int) -> int:
    return int((lengths(train) >= max_length).sum() + (lengths(eval_samples) >= max_length).sum())


def ragged(samples, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets [n+1]) of a list-of-ints field over `samples`: a stored split's own arrays (no sample is
    built), else concatenated here."""
    stored = getattr(samples, "ragged", None)
    if stored is not None:
        return stored(name)
    parts = [getattr(s, name) for s in samples]
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    return np.fromiter(itertools.chain.from_iterable(parts), np.int64, int(offsets[-1])), offsets


def padded(samples: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids and their attention mask (the inputs of every head's batch)."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, :len(s.input_ids)] = torch.tensor(s.input_ids)
        mask[i, :len(s.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def encode_fast(renderer, line: int, *texts, **kwargs):
    """Tokenize with word ids / offsets (token-level heads); needs a fast tokenizer."""
    from distune.errors import DataError

    tok = renderer.tok
    if not tok.is_fast:
        raise DataError(f"model.path: {type(tok).__name__} is not a fast tokenizer; token classification and "
                        "question answering need word ids and offset mappings")
    try:
        return tok(*texts, truncation=kwargs.pop("truncation", True), max_length=renderer.cfg.max_length, **kwargs)
    except Exception as e:  # e.g. a question alone longer than max_length: the tokenizer refuses to truncate
        raise DataError(f"{renderer.source.at(line)}: cannot tokenize ({str(e).splitlines()[0]})") from None


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a model's forward gets: ids + attention mask, or ids + position ids for packed rows."""
    if "position_ids" in batch:
        # use_cache=False: with a KV cache object present transformers does not look for packed positions.
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "token_type_ids" in batch:  # question/context pairs for encoders with segment embeddings
        inputs["token_type_ids"] = batch["token_type_ids"]
    return inputs


def forward(model, chunk: list[tuple[object, float]], task: Task, pad_id: int, device):
    """(model output, batch on device, weights) of one eval micro-batch of a head."""
    weights = torch.tensor([w for _, w in chunk], device=device, dtype=torch.float64)
    batch = task.collate([s for s, _ in chunk], pad_id).to(device)
    return model(**model_inputs(batch)), batch, weights


TASKS = Registry("task", ENTRY_POINT_GROUP, Task)
register_task = TASKS.register  # class decorator: `@register_task("sequence_classification")`
