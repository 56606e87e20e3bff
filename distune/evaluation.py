"""Held-out evaluation during training: token loss, and accuracy over `eval.choices`; for a task head, its
own loss and scores (class accuracy; token accuracy and entity F1; answer exact match and F1).

Accuracy scores each candidate response by the summed log-probability of its tokens after the prompt
and picks the highest: a classification metric that needs no generation and no output parsing.
Every rank runs the same number of forwards (ZeRO-3 gathers are collective); results are all-reduced.
Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist

from distune.data import IGNORE, Sample, collate, eval_shard, model_inputs
from distune.eval import spans


@torch.no_grad()
def evaluate(model, samples: list[Sample], micro_batch: int, pad_id: int, device: torch.device,
             rank: int, world: int, choices: list[str] | None = None,
             choice_ids: list[list[int]] | None = None, labels: list[str] | None = None,
             max_answer_tokens: int = 30, per_row: dict | None = None) -> dict[str, float]:
    """`labels`: a token classifier's tag names (entities are read from them); `max_answer_tokens`: the
    longest answer span a QA head's prediction may be. `per_row`, with `choices`: filled on every rank with
    {sample line (TASK:line in a data.tasks mixture): 1 if its gold choice scored highest else 0} over all held-out
    samples (for paired tests)."""
    was_training = model.training
    model.eval()
    # Longest first: each micro-batch pads to similar lengths (every total below is a weighted sum, so the
    # order changes no score), and a batch that does not fit in memory fails at the start, not the end.
    shard = sorted(eval_shard(samples, rank, world), key=lambda sw: -len(sw[0].input_ids))
    head = None
    if samples and samples[0].label is not None:
        head = _classify(model, shard, micro_batch, pad_id, device)
    elif samples and samples[0].tags is not None:
        head = _tag(model, shard, micro_batch, pad_id, device, labels)
    elif samples and samples[0].span is not None:
        head = _answer(model, shard, micro_batch, pad_id, device, max_answer_tokens)
    if head is not None:
        model.train(was_training)
        return head
    # [loss_sum, tokens, correct, counted]
    totals = torch.zeros(4, dtype=torch.float64, device=device)
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
            totals[2] += (right.double() * weights).sum()
            totals[3] += weights.sum()
            hits += [(s.line if s.task is None else f"{s.task}:{s.line}", int(r))
                     for s, r, w in zip(rows, right.tolist(), weights.tolist()) if w > 0]  # not the padding repeats
        if gold is not None and all(_is_gold_row(s, choice_ids[g]) for s, g in zip(rows, gold.tolist())):
            # Each sample *is* its gold-choice row: its loss is already computed, skip a forward.
            picked = torch.arange(len(rows), device=device)
            totals[0] -= (scores[picked, gold].double() * weights).sum()
            totals[1] += (counts[picked, gold].double() * weights).sum()
        else:
            batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            per_token = _token_logprobs(logits, batch["labels"])
            trained = batch["labels"][:, 1:] != IGNORE
            totals[0] -= (per_token.sum(1).double() * weights).sum()
            totals[1] += (trained.sum(1).double() * weights).sum()
    dist.all_reduce(totals)
    if per_row is not None and choice_ids:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, hits)
        per_row.update((line, hit) for part in everyone for line, hit in part)
    model.train(was_training)
    out = {"eval/loss": (totals[0] / totals[1].clamp(min=1)).item()}
    if choice_ids:
        out["eval/accuracy"] = (totals[2] / totals[3].clamp(min=1)).item()
    return out


def _is_gold_row(s: Sample, gold_ids: list[int]) -> bool:
    n = len(s.prompt_ids)
    return s.input_ids == s.prompt_ids + gold_ids and s.labels == [IGNORE] * n + gold_ids


def _token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label_t | <t) at trained positions, 0 elsewhere; shape [batch, seq-1]."""
    labels = labels[:, 1:]
    trained = labels != IGNORE
    out = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    picked = torch.log_softmax(logits[:, :-1][trained].float(), dim=-1)  # only trained positions
    out[trained] = picked.gather(-1, labels[trained].unsqueeze(-1)).squeeze(-1)
    return out


def choice_scores(model, samples: list[Sample], choice_ids: list[list[int]], pad_id: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each choice's tokens after each prompt, and their counts: [samples, choices].

    The prompt runs once: its keys/values are cached and repeated for every choice, so the choices' forward sees
    only their own few tokens (a 3-label eval of 74-token prompts runs ~2.7x fewer token-forwards than a row per
    (sample, choice)); one-token choices need no second forward at all. Prompt-learning PEFT models (virtual tokens,
    or a prefix that is itself a cache) take a row per (sample, choice)."""
    if not _caches_prompts(model):
        return _choice_rows_scores(model, samples, choice_ids, pad_id, device)
    n, c = len(samples), len(choice_ids)
    # Prompts left-padded, so every prompt ends in the last column and the choices continue from there.
    width = max(len(s.prompt_ids) for s in samples)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, width - len(s.prompt_ids):] = torch.tensor(s.prompt_ids)
        mask[i, width - len(s.prompt_ids):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    # Only the last position's logits are read: `logits_to_keep` runs the output head on it alone (a 49k-word
    # head over 74-token prompts is a fifth of a 135M model's prompt forward).
    keep = {"logits_to_keep": 1} if _takes(model, "logits_to_keep") else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # the token after each prompt
    lengths = torch.tensor([len(ch) for ch in choice_ids], device=device)
    scores = first[:, torch.tensor([ch[0] for ch in choice_ids], device=device)]
    longest = int(lengths.max())
    if longest > 1:
        cache = out.past_key_values
        cache.batch_repeat_interleave(c)  # row i*c + j: sample i's prompt, then choice j
        rest = torch.full((c, longest), pad_id, dtype=torch.long)
        for j, ch in enumerate(choice_ids):
            rest[j, :len(ch)] = torch.tensor(ch)
        rest = rest.to(device).repeat(n, 1)
        rest_mask = (torch.arange(longest, device=device) < lengths[:, None]).long().repeat(n, 1)
        start = positions[:, -1:].repeat_interleave(c, 0) + 1
        out = model(input_ids=rest, attention_mask=torch.cat([mask.repeat_interleave(c, 0), rest_mask], 1),
                    position_ids=start + torch.arange(longest, device=device), past_key_values=cache, use_cache=False)
        # Position k of a choice predicts its token k + 1.
        logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1).gather(-1, rest[:, 1:, None]).squeeze(-1)
        scores = scores + (logp * rest_mask[:, 1:]).sum(1).view(n, c)
    return scores, lengths.repeat(n, 1)


def _caches_prompts(model) -> bool:
    """Whether a prompt's cache can be reused: not a prompt-learning PeftModel, and a forward that takes
    position_ids (left-padded prompts need them; ALiBi models such as BLOOM take none)."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the (Peft)model
    config = getattr(inner, "active_peft_config", None)
    if config is not None and config.is_prompt_learning:
        return False
    return _takes(model, "position_ids")


def _takes(model, argument: str) -> bool:
    """Whether the underlying transformers model's forward has `argument` (wrappers pass keywords through)."""
    inner = getattr(model, "module", model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return argument in inspect.signature(base.forward).parameters


def _choice_rows_scores(model, samples: list[Sample], choice_ids: list[list[int]], pad_id: int,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """choice_scores for choices of any length: one row per (sample, choice)."""
    rows = [Sample(s.prompt_ids + c, [IGNORE] * len(s.prompt_ids) + c, s.line)
            for s in samples for c in choice_ids]
    batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    scores = _token_logprobs(logits, batch["labels"]).sum(1)
    counts = (batch["labels"][:, 1:] != IGNORE).sum(1)
    return scores.view(len(samples), len(choice_ids)), counts.view(len(samples), len(choice_ids))


def _classify(model, shard: list[tuple[Sample, float]], micro_batch: int, pad_id: int, device) -> dict[str, float]:
    """Sequence classification: mean class cross-entropy and accuracy of the head's argmax, over all ranks."""
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # [loss_sum, correct, counted]
    for start in range(0, len(shard), micro_batch):
        out, batch, weights = _forward(model, shard[start:start + micro_batch], pad_id, device)
        logits = out.logits.float()
        loss = torch.nn.functional.cross_entropy(logits, batch["class_labels"], reduction="none")
        totals[0] += (loss.double() * weights).sum()
        totals[1] += ((logits.argmax(-1) == batch["class_labels"]).double() * weights).sum()
        totals[2] += weights.sum()
    dist.all_reduce(totals)
    return {"eval/loss": (totals[0] / totals[2]).item(), "eval/accuracy": (totals[1] / totals[2]).item()}


def _forward(model, chunk: list[tuple[Sample, float]], pad_id: int, device):
    weights = torch.tensor([w for _, w in chunk], device=device, dtype=torch.float64)
    batch = {k: v.to(device) for k, v in collate([s for s, _ in chunk], pad_id).items()}
    return model(**model_inputs(batch)), batch, weights


def _tag(model, shard: list[tuple[Sample, float]], micro_batch: int, pad_id: int, device,
         labels: list[str]) -> dict[str, float]:
    """Token classification: mean tag CE and accuracy over tagged tokens (the first sub-token of each word),
    entity precision / recall / F1 with exact span match over the words' tags."""
    totals = torch.zeros(6, dtype=torch.float64, device=device)  # [loss, correct, tagged, hit, predicted, gold]
    for start in range(0, len(shard), micro_batch):
        chunk = shard[start:start + micro_batch]
        out, batch, weights = _forward(model, chunk, pad_id, device)
        gold = batch["tag_labels"]
        tagged = gold != IGNORE
        logits = out.logits.float()
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), gold, reduction="none", ignore_index=IGNORE)
        pred = logits.argmax(-1)
        totals[0] += (per_token.sum(1).double() * weights).sum()
        totals[1] += (((pred == gold) & tagged).sum(1).double() * weights).sum()
        totals[2] += (tagged.sum(1).double() * weights).sum()
        for i, w in enumerate(weights.tolist()):
            words_gold = [labels[t] for t in gold[i][tagged[i]].tolist()]
            words_pred = [labels[t] for t in pred[i][tagged[i]].tolist()]
            totals[3:] += torch.tensor(spans.entity_counts(words_gold, words_pred), device=device) * w
    dist.all_reduce(totals)
    scores = spans.f1(*totals[3:].tolist())
    return {"eval/loss": (totals[0] / totals[2].clamp(min=1)).item(),
            "eval/token_accuracy": (totals[1] / totals[2].clamp(min=1)).item(),
            "eval/entity_precision": scores["precision"], "eval/entity_recall": scores["recall"],
            "eval/entity_f1": scores["f1"]}


def _answer(model, shard: list[tuple[Sample, float]], micro_batch: int, pad_id: int, device,
            max_tokens: int) -> dict[str, float]:
    """Extractive QA: mean of start / end CE; the best valid span (in the context, start <= end, at most
    `max_tokens` long) decoded to text and scored with SQuAD's exact match and token F1."""
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # [loss, exact, f1, counted]
    for start in range(0, len(shard), micro_batch):
        chunk = shard[start:start + micro_batch]
        out, batch, weights = _forward(model, chunk, pad_id, device)
        ce = torch.nn.functional.cross_entropy
        starts, ends = out.start_logits.float(), out.end_logits.float()
        loss = (ce(starts, batch["start_positions"], reduction="none")
                + ce(ends, batch["end_positions"], reduction="none")) / 2
        totals[0] += (loss.double() * weights).sum()
        totals[3] += weights.sum()
        for i, ((s, _), w) in enumerate(zip(chunk, weights.tolist())):
            n = len(s.input_ids)
            allowed = torch.tensor([o is not None for o in s.span.offsets])
            first, last = spans.best_span(starts[i, :n], ends[i, :n], allowed, max_tokens)
            text = s.span.context[s.span.offsets[first][0]:s.span.offsets[last][1]].strip()
            totals[1] += spans.exact_match(text, s.span.answers) * w
            totals[2] += spans.token_f1(text, s.span.answers) * w
    dist.all_reduce(totals)
    return {"eval/loss": (totals[0] / totals[3]).item(), "eval/exact_match": (totals[1] / totals[3]).item(),
            "eval/f1": (totals[2] / totals[3]).item()}
