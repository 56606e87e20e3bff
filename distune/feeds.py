"""What the training loop reads: one feed of micro-batches over the whole training set, or, for a method with
streams (`Method.streams`: one adapter per task), one feed per stream from its task's own splits, exactly the
samples and order a run on that task alone would see. Owns each feed's step count and held-out samples.
Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distune.errors import ConfigError
from distune.data import Sample, ShardedBatches, Splits, pack_groups
from distune.data.loader import Packed, lengths_of


@dataclass
class Feed:
    name: str  # "" for the single feed; else the stream's (adapter's) name
    batches: ShardedBatches
    steps: int  # optimizer steps it trains
    eval: list[Sample]  # its held-out samples

    @property
    def prefix(self) -> str:
        """Its metrics' prefix: "" or "<name>/"."""
        return f"{self.name}/" if self.name else ""


def build_feeds(cfg, splits: Splits, streams: list | None, grad_accum: int, rank: int, world: int,
                pad_id: int) -> tuple[list[Feed], int]:
    """The feeds, and the default step count: train.max_steps, else train.epochs over the largest feed. A stream
    without its own max_steps trains the default; the run lasts as long as its longest feed."""
    if streams is None:
        parts = [("", splits, None)]
    else:
        parts = []
        for s in streams:
            if s.task not in splits.tasks:
                known = ", ".join(splits.tasks) or "none (data.tasks is not set)"
                raise ConfigError(f"{s.key}.task: unknown task {s.task!r}; data.tasks has: {known}")
            parts.append((s.name, splits.tasks[s.task], s.max_steps))
    feeds = []
    for name, part, steps in parts:
        groups = None
        if cfg.data.packing:  # the prepare step packed a stored split already
            groups = getattr(part.train, "packed_groups", lambda: None)() or pack_groups(
                lengths_of(part.train).tolist(), cfg.data.max_length)
        batches = ShardedBatches(part.train if groups is None else Packed(part.train, groups), cfg.train.micro_batch_size,
                                 rank, world, cfg.run.seed, pad_id, cfg.data.group_by_length and groups is None)
        feeds.append(Feed(name, batches, steps or 0, part.eval))
    steps_per_epoch = max(1, max(f.batches.per_epoch for f in feeds) // grad_accum)
    total = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    for f in feeds:
        f.steps = f.steps or total
    return feeds, total
