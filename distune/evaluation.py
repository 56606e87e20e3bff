"""Held-out evaluation during training: each task scores its own samples (distune.tasks): token loss and accuracy
over `eval.choices` for a causal LM; a head's own loss and scores (class accuracy; token accuracy and entity F1;
answer exact match and F1).

Every rank runs the same number of forwards (ZeRO-3 gathers are collective); results are all-reduced.
Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import torch

from distune.data.loader import eval_shard
from distune.tasks import EvalOptions, task_of


@torch.no_grad()
def evaluate(model, samples: list, micro_batch: int, pad_id: int, device: torch.device,
             rank: int, world: int, choices: list[str] | None = None,
             choice_ids: list[list[int]] | None = None, labels: list[str] | None = None,
             max_answer_tokens: int = 30, per_row: dict | None = None) -> dict[str, float]:
    """`labels`: a token classifier's tag names (entities are read from them); `max_answer_tokens`: the
    longest answer span a QA head's prediction may be. `per_row`, with `choices`: filled on every rank with
    {sample line (TASK:line in a data.tasks mixture): 1 if its gold choice scored highest else 0} over all held-out
    samples (for paired tests)."""
    if not samples:
        raise ValueError("evaluate: no held-out samples (data.eval_size)")
    was_training = model.training
    model.eval()
    # Longest first: each micro-batch pads to similar lengths (every total below is a weighted sum, so the
    # order changes no score), and a batch that does not fit in memory fails at the start, not the end.
    shard = sorted(eval_shard(samples, rank, world), key=lambda sw: -len(sw[0].input_ids))
    options = EvalOptions(choices, choice_ids, labels, max_answer_tokens, per_row)
    try:
        return task_of(samples).evaluate(model, shard, micro_batch, pad_id, device, options)
    finally:
        model.train(was_training)
