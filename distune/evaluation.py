"""Held-out evaluation during training: token loss, and accuracy over `eval.choices`.

Accuracy scores each candidate response by the summed log-probability of its tokens after the prompt
and picks the highest: a classification metric that needs no generation and no output parsing.
Every rank runs the same number of forwards (ZeRO-3 gathers are collective); results are all-reduced.
Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from distune.data import IGNORE, Sample, collate, eval_shard


@torch.no_grad()
def evaluate(model, samples: list[Sample], micro_batch: int, pad_id: int, device: torch.device,
             rank: int, world: int, choices: list[str] | None = None,
             choice_ids: list[list[int]] | None = None) -> dict[str, float]:
    was_training = model.training
    model.eval()
    shard = eval_shard(samples, rank, world)
    # [loss_sum, tokens, correct, counted]
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for start in range(0, len(shard), micro_batch):
        chunk = shard[start:start + micro_batch]
        batch = {k: v.to(device) for k, v in collate([s for s, _ in chunk], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_token = _token_logprobs(logits, batch["labels"])
        weights = torch.tensor([w for _, w in chunk], device=device, dtype=torch.float64)
        trained = (batch["labels"][:, 1:] != IGNORE)
        totals[0] -= (per_token.sum(1).double() * weights).sum()
        totals[1] += (trained.sum(1).double() * weights).sum()
        if choice_ids:
            pred = _best_choice(model, [s for s, _ in chunk], choice_ids, pad_id, device)
            stripped = [c.strip() for c in choices]
            truth = torch.tensor([stripped.index(s.response.strip()) for s, _ in chunk], device=device)
            totals[2] += ((pred == truth).double() * weights).sum()
            totals[3] += weights.sum()
    dist.all_reduce(totals)
    model.train(was_training)
    out = {"eval/loss": (totals[0] / totals[1].clamp(min=1)).item()}
    if choice_ids:
        out["eval/accuracy"] = (totals[2] / totals[3].clamp(min=1)).item()
    return out


def _token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label_t | <t) at trained positions, 0 elsewhere; shape [batch, seq-1]."""
    labels = labels[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (labels != IGNORE)


def _best_choice(model, samples: list[Sample], choice_ids: list[list[int]], pad_id: int,
                 device: torch.device) -> torch.Tensor:
    rows = [Sample(s.prompt_ids + c, [IGNORE] * len(s.prompt_ids) + c, s.line)
            for s in samples for c in choice_ids]
    batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    scores = _token_logprobs(logits, batch["labels"]).sum(1)
    return scores.view(len(samples), len(choice_ids)).argmax(1)
