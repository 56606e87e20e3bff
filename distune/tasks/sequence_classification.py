"""`sequence_classification`: the prompt text in, one class out (a fresh classification head over data.labels);
scored by class loss and accuracy. A distillation student learns the teacher's class probabilities (its
verbalizer scores over the class names), which a teacher cache provides. Imports neither ray nor deepspeed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn

from distune.errors import DataError
from distune.tasks.base import Batch, EvalOptions, LossOutput, Task, forward, model_inputs, padded, register_task


@dataclass
class ClassSample:
    kind: ClassVar[str] = "sequence_classification"
    input_ids: list[int]
    line: int
    label: int  # the class index
    response: str  # the class name
    extras: dict | None = None  # per sample: e.g. a cached teacher's class log-probs [C]
    task: str | None = None


@register_task("sequence_classification")
class SequenceClassification(Task):
    head = "AutoModelForSequenceClassification"
    labelled = "classes"
    distills = "classes"

    def label_names(self, renderer, line: int, row: dict) -> set[str]:
        return {renderer.fill(renderer.cfg.response, renderer.normalise(line, row), line, "data.response").strip()}

    def render(self, renderer, line: int, row: dict, canonical: bool, labels: list[str]) -> ClassSample:
        """The prompt text as the model's input, the response as a class index."""
        row = renderer.normalise(line, row)
        text = renderer.prompt_text(line, row, canonical, normalised=True)
        name = renderer.fill(renderer.cfg.response, row, line, "data.response").strip()
        if name not in labels:
            raise DataError(f"{renderer.source.at(line)}: class {name!r} is not one of data.labels {labels}")
        ids = renderer.tok(text, truncation=True, max_length=renderer.cfg.max_length)["input_ids"]
        return ClassSample(ids, line, labels.index(name), name)

    def show(self, tokenizer, sample: ClassSample, labels, max_length: int) -> tuple[str, str]:
        return f"{len(sample.input_ids)} tokens, class {sample.response!r}", tokenizer.decode(sample.input_ids)

    def collate(self, samples: list[ClassSample], pad_id: int) -> Batch:
        """Padded inputs, one class index per sample, per-sample extras stacked."""
        batch = padded(samples, pad_id) | {"class_labels": torch.tensor([s.label for s in samples])}
        for key in samples[0].extras or {}:
            batch[key] = torch.stack([torch.as_tensor(s.extras[key]).float() for s in samples])
        return Batch(self, batch)

    def loss(self, model, batch: Batch, loss_chunk: int | None = None) -> LossOutput:
        out = model(**model_inputs(batch))
        loss = nn.functional.cross_entropy(out.logits.float(), batch["class_labels"])
        return LossOutput(loss, {"ce": loss.detach()})

    def evaluate(self, model, shard, micro_batch: int, pad_id: int, device, options: EvalOptions) -> dict[str, float]:
        """Mean class cross-entropy and accuracy of the head's argmax, over all ranks."""
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # [loss_sum, correct, counted]
        for start in range(0, len(shard), micro_batch):
            out, batch, weights = forward(model, shard[start:start + micro_batch], self, pad_id, device)
            logits = out.logits.float()
            loss = nn.functional.cross_entropy(logits, batch["class_labels"], reduction="none")
            totals[0] += (loss.double() * weights).sum()
            totals[1] += ((logits.argmax(-1) == batch["class_labels"]).double() * weights).sum()
            totals[2] += weights.sum()
        dist.all_reduce(totals)
        return {"eval/loss": (totals[0] / totals[2]).item(), "eval/accuracy": (totals[1] / totals[2]).item()}
