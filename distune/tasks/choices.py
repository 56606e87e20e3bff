"""Verbalizer scoring: the summed log-probability a causal LM gives each candidate response after a prompt.

A classification metric that needs no generation and no output parsing (eval.choices), and the class
probabilities a causal-LM teacher gives a classifier student (distune.signals.cache). Imports neither ray nor
deepspeed.
"""

from __future__ import annotations

import inspect

import torch

from distune.tasks.base import IGNORE


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label_t | <t) at trained positions, 0 elsewhere; shape [batch, seq-1]."""
    labels = labels[:, 1:]
    trained = labels != IGNORE
    out = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    picked = torch.log_softmax(logits[:, :-1][trained].float(), dim=-1)  # only trained positions
    out[trained] = picked.gather(-1, labels[trained].unsqueeze(-1)).squeeze(-1)
    return out


def choice_scores(model, samples: list, choice_ids: list[list[int]], pad_id: int,
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
    ids, mask = left_padded([s.prompt_ids for s in samples], pad_id)
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


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded to one width (so every prompt ends in the last column, where generation or the
    choices continue), and their attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


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


def _choice_rows_scores(model, samples: list, choice_ids: list[list[int]], pad_id: int,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """choice_scores for choices of any length: one row per (sample, choice)."""
    rows = [(s.prompt_ids + c, [IGNORE] * len(s.prompt_ids) + c) for s in samples for c in choice_ids]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, :len(row_ids)], labels[i, :len(row_ids)], mask[i, :len(row_ids)] = (
            torch.tensor(row_ids), torch.tensor(row_labels), 1)
    ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    scores = token_logprobs(logits, labels).sum(1)
    counts = (labels[:, 1:] != IGNORE).sum(1)
    return scores.view(len(samples), len(choice_ids)), counts.view(len(samples), len(choice_ids))
