"""`question_answering`: extractive QA, the answer's first and last token in question + context; scored by
SQuAD's exact match and token F1 of the best valid span.

Rows have `question` + `context` + either SQuAD's `answers: {text: [...], answer_start: [...]}` or flat `answer`
+ `answer_start` columns (after `data.columns`); templates, chat templates and the sample design do not apply.
Needs a fast tokenizer (offset mappings). Imports neither ray nor deepspeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn

from distune.tasks.causal_lm import Sample, mark_trained
from distune.errors import DataError
import distune.tasks.spans as spans
from distune.tasks.base import (IGNORE, Batch, EvalOptions, LossOutput, Task, encode_fast, forward, model_inputs, padded,
                                register_task, totals, truncated_count)
from distune.tasks.token_classification import check_own_columns


@dataclass
class AnswerSpan:
    """A QA sample's gold span and what decoding a predicted span back to text needs."""

    start: int  # token positions of the gold answer's first and last token
    end: int
    context: str
    offsets: list[tuple[int, int] | None]  # per token: its character span in the context; None outside it
    answers: list[str]  # every gold answer text (exact match and F1 take the best)


@dataclass
class SpanSample:
    kind: ClassVar[str] = "question_answering"
    input_ids: list[int]
    line: int
    span: AnswerSpan
    token_type_ids: list[int] | None = None  # segment ids of the pair, for encoders that have them (BERT)
    extras: dict | None = None
    task: str | None = None


@register_task("question_answering")
class QuestionAnswering(Task):
    head = "AutoModelForQuestionAnswering"

    def check(self, cfg, method) -> None:
        check_own_columns(self.name, cfg)
        super().check(cfg, method)

    def render(self, renderer, line: int, row: dict, canonical: bool, labels) -> SpanSample | None:
        return render_answer(renderer, line, row)

    def summarise(self, train, eval_samples, data_cfg, labels, dropped, renderer) -> tuple[dict, list[str]]:
        """A row whose answer lies beyond data.max_length is dropped and counted (no stride: one sample per row,
        so a row's answer is trained and scored from one window)."""
        truncated = truncated_count(train, eval_samples, data_cfg.max_length)
        stats = totals(train, eval_samples, truncated) | {"answers_cut": len(dropped)}
        warnings = [f"{len(dropped)} rows dropped: data.max_length={data_cfg.max_length} cuts their answer out of "
                    f"the context (first: {renderer.source.at(dropped[0])})"] if dropped else []
        return stats, warnings

    def mixture_stats(self, parts, train, labels) -> dict:
        return {"answers_cut": sum(p.stats["answers_cut"] for p in parts)}

    def stats_line(self, stats: dict, labels) -> str:
        return f"{stats['answers_cut']} answers cut"

    def show(self, tokenizer, sample: SpanSample, labels, max_length: int) -> tuple[str, str]:
        """The gold answer span «marked» in question + context."""
        span = [t if sample.span.start <= k <= sample.span.end else IGNORE for k, t in enumerate(sample.input_ids)]
        return (f"{len(sample.input_ids)} tokens, answer «marked»",
                mark_trained(tokenizer, Sample(sample.input_ids, span, sample.line)))

    def collate(self, samples: list[SpanSample], pad_id: int) -> Batch:
        """`start_positions` and `end_positions` [B], plus `token_type_ids` where the tokenizer gave segment ids."""
        batch = padded(samples, pad_id)
        batch["start_positions"] = torch.tensor([s.span.start for s in samples])
        batch["end_positions"] = torch.tensor([s.span.end for s in samples])
        if samples[0].token_type_ids is not None:
            types = torch.zeros(batch["input_ids"].shape, dtype=torch.long)
            for i, s in enumerate(samples):
                types[i, :len(s.token_type_ids)] = torch.tensor(s.token_type_ids)
            batch["token_type_ids"] = types
        return Batch(self, batch)

    def loss(self, model, batch: Batch, loss_chunk: int | None = None) -> LossOutput:
        """The mean of the start-position and end-position cross-entropies (BERT's SQuAD loss)."""
        out = model(**model_inputs(batch))
        loss = span_loss(out.start_logits, out.end_logits, batch["start_positions"], batch["end_positions"])
        return LossOutput(loss, {"ce": loss.detach()})

    def evaluate(self, model, shard, micro_batch: int, pad_id: int, device, options: EvalOptions) -> dict[str, float]:
        """Mean of start / end CE; the best valid span (in the context, start <= end, at most max_answer_tokens
        long) decoded to text and scored with SQuAD's exact match and token F1."""
        totals_ = torch.zeros(4, dtype=torch.float64, device=device)  # [loss, exact, f1, counted]
        for start in range(0, len(shard), micro_batch):
            chunk = shard[start:start + micro_batch]
            out, batch, weights = forward(model, chunk, self, pad_id, device)
            starts, ends = out.start_logits.float(), out.end_logits.float()
            loss = (nn.functional.cross_entropy(starts, batch["start_positions"], reduction="none")
                    + nn.functional.cross_entropy(ends, batch["end_positions"], reduction="none")) / 2
            totals_[0] += (loss.double() * weights).sum()
            totals_[3] += weights.sum()
            for i, ((s, _), w) in enumerate(zip(chunk, weights.tolist())):
                n = len(s.input_ids)
                allowed = torch.tensor([o is not None for o in s.span.offsets])
                first, last = spans.best_span(starts[i, :n], ends[i, :n], allowed, options.max_answer_tokens)
                text = s.span.context[s.span.offsets[first][0]:s.span.offsets[last][1]].strip()
                totals_[1] += spans.exact_match(text, s.span.answers) * w
                totals_[2] += spans.token_f1(text, s.span.answers) * w
        dist.all_reduce(totals_)
        return {"eval/loss": (totals_[0] / totals_[3]).item(), "eval/exact_match": (totals_[1] / totals_[3]).item(),
                "eval/f1": (totals_[2] / totals_[3]).item()}


def span_loss(start_logits: torch.Tensor, end_logits: torch.Tensor, starts: torch.Tensor,
              ends: torch.Tensor) -> torch.Tensor:
    ce = nn.functional.cross_entropy
    return (ce(start_logits.float(), starts) + ce(end_logits.float(), ends)) / 2


def render_answer(renderer, line: int, row: dict) -> SpanSample | None:
    """Question first, then the context (truncated, never the question), with the gold answer's first and
    last context token. None when truncation cut the answer off: the caller drops and counts the row."""
    row = renderer.normalise(line, row)
    at = renderer.source.at(line)
    question, context = row.get("question"), row.get("context")
    if not isinstance(question, str) or not isinstance(context, str):
        raise DataError(f"{at}: question_answering rows need string 'question' and 'context' columns "
                        f"(data.columns renames yours); row has {', '.join(map(repr, row))}")
    texts, starts = _answers(at, row)
    for text, start in zip(texts, starts):
        if context[start:start + len(text)] != text:
            raise DataError(f"{at}: answer {text!r} is not at answer_start {start} of the context (found "
                            f"{context[start:start + len(text)]!r})")
    enc = encode_fast(renderer, line, question, context, truncation="only_second", return_offsets_mapping=True)
    in_context = [s == 1 for s in enc.sequence_ids()]
    offsets = [tuple(o) if c else None for o, c in zip(enc["offset_mapping"], in_context)]
    kept = [i for i, o in enumerate(offsets) if o is not None]
    if not kept:
        raise DataError(f"{at}: the question leaves no room for the context in data.max_length="
                        f"{renderer.cfg.max_length}")
    # The first gold answer is the training target (SQuAD's train split has one; dev rows list several).
    first, last = starts[0], starts[0] + len(texts[0])
    if offsets[kept[-1]][1] < last:
        return None
    begin = next(i for i in kept if offsets[i][1] > first)
    end = max(i for i in kept if offsets[i][0] < last)
    # Encoders with segment embeddings (BERT) tell question from context by token_type_ids.
    return SpanSample(enc["input_ids"], line, AnswerSpan(begin, end, context, offsets, texts),
                      enc.get("token_type_ids"))


def _answers(at: str, row: dict) -> tuple[list[str], list[int]]:
    """SQuAD's nested `answers` or flat `answer` + `answer_start` columns -> (texts, character starts)."""
    if "answers" in row:
        nested = row["answers"]
        texts, starts = (nested.get("text"), nested.get("answer_start")) if isinstance(nested, dict) else (None, None)
    else:
        texts, starts = [row.get("answer")], [row.get("answer_start")]
    if not (isinstance(texts, list) and isinstance(starts, list) and len(texts) == len(starts)
            and all(isinstance(t, str) for t in texts) and all(isinstance(s, int) and s >= 0 for s in starts)):
        raise DataError(f"{at}: question_answering rows need 'answers: {{text: [...], answer_start: [...]}}' (lists "
                        f"of equal length) or string 'answer' + integer 'answer_start' columns")
    if not texts or not all(texts):
        raise DataError(f"{at}: no answer text (unanswerable, SQuAD 2.0-style rows are not supported)")
    return texts, starts
