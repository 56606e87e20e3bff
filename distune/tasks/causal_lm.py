"""`causal_lm`: next-token prediction on the trained (response) tokens; scored by token loss and, with
eval.choices, by which choice the model finds most likely. Imports neither ray nor deepspeed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from distune.errors import DataError
from distune.logits import Selected, head_at
from distune.tasks.base import (IGNORE, Batch, EvalOptions, LossOutput, Task, model_inputs, ragged, register_task, totals,
                                truncated_count)
from distune.tasks.choices import choice_scores, token_logprobs


@dataclass
class Sample:
    """A causal LM's sample (task `causal_lm`); other tasks render into their own types (distune.tasks)."""

    kind: ClassVar[str] = "causal_lm"  # the task that owns this sample type
    input_ids: list[int]
    labels: list[int]
    line: int  # source line, for error messages
    prompt_ids: list[int] | None = None  # prompt_response only: for choice scoring
    response: str | None = None
    # Per-trained-position rows attached after rendering (e.g. a cached teacher's top-k): key -> [n_trained, ...]
    # in the order of the trained positions; `collate` scatters them onto those positions.
    extras: dict | None = None
    positions: list[int] | None = None  # packed rows: position ids restarting at 0 for every packed sample
    task: str | None = None  # data.tasks mixtures: the task the sample came from


def mark_trained(tokenizer, sample: Sample, left: str = "«", right: str = "»") -> str:
    """The sample's text with every run of trained tokens between `left` and `right` (what the loss sees)."""
    out, run, trained = [], [], None
    for tid, label in zip(sample.input_ids, sample.labels):
        if (label != IGNORE) != trained and run:
            text = tokenizer.decode(run)
            out.append(f"{left}{text}{right}" if trained else text)
            run = []
        trained = label != IGNORE
        run.append(tid)
    if run:
        text = tokenizer.decode(run)
        out.append(f"{left}{text}{right}" if trained else text)
    return "".join(out)


@register_task("causal_lm")
class CausalLM(Task):
    packs = scores_choices = True
    distills = "tokens"

    def render(self, renderer, line: int, row: dict, canonical: bool, labels) -> Sample:
        s = renderer.render(line, row, canonical)
        if s.labels.count(IGNORE) == len(s.labels):
            why = " after truncation to data.max_length" if len(s.input_ids) >= renderer.cfg.max_length else ""
            raise DataError(f"{renderer.source.at(line)}: no trained tokens{why} (empty loss mask); "
                            f"raise data.max_length or shorten the prompt")
        return s

    def summarise(self, train, eval_samples, data_cfg, labels, dropped, renderer) -> tuple[dict, list[str]]:
        truncated = truncated_count(train, eval_samples, data_cfg.max_length)
        values, offsets = ragged(train, "labels")
        untrained = np.concatenate([[0], np.cumsum(values == IGNORE)])
        everything = int((untrained[offsets[1:]] == untrained[offsets[:-1]]).sum())  # no label is IGNORE
        stats = totals(train, eval_samples, truncated) | {"trained_token_fraction": trained_fraction(train)}
        warnings = []
        if everything:
            why = "data.train_on_inputs: true" if data_cfg.train_on_inputs else "their prompts render to nothing"
            warnings.append(f"{everything} of {len(train)} training samples train on every token ({why}): the "
                            "model learns to write prompts too")
        if truncated:
            warnings.append(f"{truncated} samples are cut at data.max_length={data_cfg.max_length}")
        return stats, warnings

    def mixture_stats(self, parts, train, labels) -> dict:
        return {"trained_token_fraction": trained_fraction(train)}

    def stats_line(self, stats: dict, labels) -> str:
        return f"{100 * stats['trained_token_fraction']:.1f}% of tokens trained"

    def show(self, tokenizer, sample: Sample, labels, max_length: int) -> tuple[str, str]:
        trained = sum(t != IGNORE for t in sample.labels)
        cut = " TRUNCATED" if len(sample.input_ids) >= max_length else ""
        return f"{len(sample.input_ids)} tokens, {trained} trained «marked»{cut}", mark_trained(tokenizer, sample)

    def collate(self, samples: list[Sample], pad_id: int) -> Batch:
        return collate(samples, pad_id)

    def loss(self, model, batch: Batch, loss_chunk: int | None = None) -> LossOutput:
        """Token-level cross-entropy on the positions whose label is not -100; the head runs on the trained
        positions only (distune.logits), in chunks of `loss_chunk` rows."""
        labels = batch["labels"][:, 1:]
        trained = labels != IGNORE
        with head_at(model, trained, loss_chunk) as sel:
            out = model(**model_inputs(batch))
        loss, n_tokens = selected_ce(sel, out.logits, labels[trained])
        return LossOutput(loss, {"ce": loss.detach(), "trained_tokens": n_tokens})

    def evaluate(self, model, shard, micro_batch: int, pad_id: int, device, options: EvalOptions) -> dict[str, float]:
        """Token loss; with choices, accuracy: each candidate response scored by the summed log-probability of
        its tokens after the prompt, the highest picked."""
        choices, choice_ids = options.choices, options.choice_ids
        totals_ = torch.zeros(4, dtype=torch.float64, device=device)  # [loss_sum, tokens, correct, counted]
        hits: list[tuple[int | str, int]] = []  # (line, correct) of this rank's real (weight > 0) samples
        for start in range(0, len(shard), micro_batch):
            chunk = shard[start:start + micro_batch]
            rows = [s for s, _ in chunk]
            weights = torch.tensor([w for _, w in chunk], device=device, dtype=torch.float64)
            gold = None
            if choices:
                stripped = [c.strip() for c in choices]
                gold = torch.tensor([stripped.index(s.response.strip()) for s in rows], device=device)
                scores, counts = choice_scores(model, rows, choice_ids, pad_id, device)
                right = scores.argmax(1) == gold
                totals_[2] += (right.double() * weights).sum()
                totals_[3] += weights.sum()
                hits += [(s.line if s.task is None else f"{s.task}:{s.line}", int(r))
                         for s, r, w in zip(rows, right.tolist(), weights.tolist()) if w > 0]  # not the padding
            if gold is not None and all(_is_gold_row(s, choice_ids[g]) for s, g in zip(rows, gold.tolist())):
                # Each sample *is* its gold-choice row: its loss is already computed, skip a forward.
                picked = torch.arange(len(rows), device=device)
                totals_[0] -= (scores[picked, gold].double() * weights).sum()
                totals_[1] += (counts[picked, gold].double() * weights).sum()
            else:
                batch = collate(rows, pad_id).to(device)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                per_token = token_logprobs(logits, batch["labels"])
                trained = batch["labels"][:, 1:] != IGNORE
                totals_[0] -= (per_token.sum(1).double() * weights).sum()
                totals_[1] += (trained.sum(1).double() * weights).sum()
        dist.all_reduce(totals_)
        if options.per_row is not None and choice_ids:
            everyone: list = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, hits)
            options.per_row.update((line, hit) for part in everyone for line, hit in part)
        out = {"eval/loss": (totals_[0] / totals_[1].clamp(min=1)).item()}
        if choice_ids:
            out["eval/accuracy"] = (totals_[2] / totals_[3].clamp(min=1)).item()
        return out


def trained_fraction(train: list[Sample]) -> float:
    values, _ = ragged(train, "labels")  # as long as the input ids
    return float((values != IGNORE).sum()) / max(1, len(values))


def _is_gold_row(s: Sample, gold_ids: list[int]) -> bool:
    n = len(s.prompt_ids)
    return s.input_ids == s.prompt_ids + gold_ids and s.labels == [IGNORE] * n + gold_ids


def collate(samples: list[Sample], pad_id: int) -> Batch:
    """Right-padded ids, labels (-100 on padding) and attention mask; position ids for packed rows; per-position
    extras (a cached teacher's top-k) scattered onto the positions they belong to."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        mask[i, :n] = 1
    # Labels shift by one inside the loss, so a trained token needs one at position >= 1.
    if not (labels[:, 1:] != IGNORE).any():
        lines = ", ".join(str(s.line) for s in samples)
        raise DataError(f"a batch has no trained tokens (source lines {lines}); check the loss mask settings")
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if samples[0].positions is not None:
        # Packed rows: positions restart per packed sample (the padding too), and no attention mask goes to the
        # model, so transformers builds a block-diagonal causal mask from the positions (no cross-sample attention).
        pos = torch.arange(width).repeat(len(samples), 1)
        for i, s in enumerate(samples):
            pos[i, :len(s.positions)] = torch.tensor(s.positions)
            pos[i, len(s.positions):] -= len(s.positions)
        batch["position_ids"] = pos
    if samples[0].extras:
        batch.update(_scatter_extras(samples, labels))
    return Batch(CAUSAL, batch)


CAUSAL = CausalLM()


def _scatter_extras(samples: list[Sample], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """[B, W, ...] tensors: row p of a sample holds its extra for the position predicting token p+1.

    A sample carries one row per trained position, or one per position of the sample (a teacher cache
    built with `kd_positions: all`, n-1 rows for n tokens). The count tells which; when both counts are
    equal every position is trained, so the two sets are the same."""
    out = {}
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE
    for key, first in samples[0].extras.items():
        first = torch.as_tensor(first)
        dtype = torch.long if not first.is_floating_point() else torch.float32
        full = torch.zeros((len(samples), labels.shape[1], *first.shape[1:]), dtype=dtype)
        for i, s in enumerate(samples):
            rows = torch.as_tensor(s.extras[key]).to(dtype)
            where = predicts[i].nonzero().squeeze(1)
            if len(rows) == len(s.input_ids) - 1:
                where = torch.arange(len(rows))
            elif len(where) != len(rows):
                raise DataError(f"source line {s.line}: {key} has {len(rows)} rows for {len(where)} trained "
                                f"positions (or {len(s.input_ids) - 1} with kd_positions: all)")
            full[i, where] = rows
        out[key] = full
    return out


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token CE over trained positions of whole logits; returns (loss, number of trained tokens)."""
    shift_labels = labels[:, 1:]
    trained = shift_labels != IGNORE
    # Select trained positions before the fp32 upcast and softmax: with loss on responses only they are
    # often a few percent of all positions, and [positions x vocab] is the largest tensor of the step.
    picked = logits[:, :-1][trained].float()
    n_tokens = trained.sum()
    loss = nn.functional.cross_entropy(picked, shift_labels[trained], reduction="sum")
    # A batch with no trained tokens is refused by the data layer; clamp keeps a stray one finite anyway.
    return loss / n_tokens.clamp(min=1), n_tokens.detach()


def selected_ce(sel: Selected, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CE of the logits at `sel`'s positions (`logits`: the model's output) against `targets` ([N] token ids),
    in fp32; chunked when `sel` is. Returns (loss, number of trained tokens)."""
    n = torch.tensor(targets.numel(), device=targets.device)
    if sel.chunked:
        total = sel.reduce(lambda logits, rows: nn.functional.cross_entropy(logits.float(), targets[rows],
                                                                            reduction="sum"))
    else:
        total = nn.functional.cross_entropy(sel.pick(logits).float(), targets, reduction="sum")
    return total / n.clamp(min=1), n
