"""Batches for one rank: seeded per-epoch order, sharded by rank, resumable at any micro-batch.

The position is two integers (epoch, micro-batch index), saved in checkpoints: resuming replays the
exact order an uninterrupted run would have seen. Imports neither ray nor deepspeed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from distune.data.render import IGNORE, Sample
from distune.data.sources import DataError


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    if samples[0].label is not None:
        return _collate_classes(samples, pad_id)
    if samples[0].tags is not None or samples[0].span is not None:
        return _collate_heads(samples, pad_id)
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
    return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a model's forward gets: ids + attention mask, or ids + position ids for packed rows."""
    if "position_ids" in batch:
        # use_cache=False: with a KV cache object present transformers does not look for packed positions.
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "token_type_ids" in batch:  # question/context pairs for encoders with segment embeddings
        inputs["token_type_ids"] = batch["token_type_ids"]
    return inputs


def pack_groups(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of samples per packed row: first-fit by decreasing length (deterministic), each row <= capacity."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def pack(samples: list[Sample], groups: list[list[int]]) -> list[Sample]:
    """One Sample per group: ids and labels concatenated, each part's first token untrained (it would be
    predicted from the previous sample), positions restarting per part, extras concatenated in order."""
    out = []
    for group in groups:
        parts = [samples[i] for i in group]
        ids, labels, positions = [], [], []
        for s in parts:
            ids += s.input_ids
            labels += [IGNORE] + s.labels[1:]
            positions += list(range(len(s.input_ids)))
        extras = None
        if parts[0].extras:
            extras = {k: np.concatenate([np.asarray(s.extras[k]) for s in parts]) for k in parts[0].extras}
        out.append(Sample(ids, labels, parts[0].line, extras=extras, positions=positions))
    return out


def _padded(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids and their attention mask (the inputs of every head's batch)."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, :len(s.input_ids)] = torch.tensor(s.input_ids)
        mask[i, :len(s.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _collate_classes(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Sequence classification: padded inputs, one class index per sample, per-sample extras stacked."""
    batch = _padded(samples, pad_id) | {"class_labels": torch.tensor([s.label for s in samples])}
    for key in samples[0].extras or {}:
        batch[key] = torch.stack([torch.as_tensor(s.extras[key]).float() for s in samples])
    return batch


def _collate_heads(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Token classification: `tag_labels` [B, W] (-100 on padding); extractive QA: `start_positions` and
    `end_positions` [B], plus `token_type_ids` where the tokenizer gave segment ids."""
    batch = _padded(samples, pad_id)
    width = batch["input_ids"].shape[1]
    if samples[0].tags is not None:
        tags = torch.full((len(samples), width), IGNORE, dtype=torch.long)
        for i, s in enumerate(samples):
            tags[i, :len(s.tags)] = torch.tensor(s.tags)
        batch["tag_labels"] = tags
    else:
        batch["start_positions"] = torch.tensor([s.span.start for s in samples])
        batch["end_positions"] = torch.tensor([s.span.end for s in samples])
    if samples[0].token_type_ids is not None:
        types = torch.zeros((len(samples), width), dtype=torch.long)
        for i, s in enumerate(samples):
            types[i, :len(s.token_type_ids)] = torch.tensor(s.token_type_ids)
        batch["token_type_ids"] = types
    return batch


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


class ShardedBatches:
    """Micro-batches of this rank. Every rank sees the same number, so collectives stay in lockstep."""

    def __init__(self, samples: list[Sample], micro_batch: int, rank: int, world: int, seed: int, pad_id: int,
                 group_by_length: bool = False):
        self.samples, self.micro, self.rank, self.world = samples, micro_batch, rank, world
        self.seed, self.pad_id, self.group_by_length = seed, pad_id, group_by_length
        self.per_epoch = (len(samples) // world) // micro_batch
        if self.per_epoch == 0:
            raise DataError(f"{len(samples)} training samples are fewer than one micro-batch per worker "
                            f"({micro_batch} x {world} workers)")

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.samples), generator=g).tolist()
        if self.group_by_length:
            perm = self._grouped(perm, g)
        mine = perm[self.rank:: self.world]
        return mine[: self.per_epoch * self.micro]

    def _grouped(self, perm: list[int], g: torch.Generator) -> list[int]:
        """Like HF's LengthGroupedSampler: sort chunks of 50 global micro-batches by length, so one global
        micro-batch (micro x world consecutive indices) holds similar lengths, then shuffle those batches."""
        step = self.micro * self.world
        chunk = step * 50
        out = []
        for start in range(0, len(perm), chunk):
            out += sorted(perm[start:start + chunk], key=lambda i: -len(self.samples[i].input_ids))
        full = len(out) // step
        batches = [out[i * step:(i + 1) * step] for i in range(full)]
        order = torch.randperm(full, generator=g).tolist()
        return [i for b in order for i in batches[b]] + out[full * step:]

    def iterate(self, epoch: int, start: int) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
        """Yield (epoch, index_in_epoch, batch) forever from position (epoch, start)."""
        while True:
            idx = self.order(epoch)
            for b in range(start, self.per_epoch):
                chunk = idx[b * self.micro:(b + 1) * self.micro]
                yield epoch, b, collate([self.samples[i] for i in chunk], self.pad_id)
            epoch, start = epoch + 1, 0


def eval_shard(samples: list[Sample], rank: int, world: int) -> list[tuple[Sample, float]]:
    """This rank's eval samples with weights; padded with weight-0 repeats so every rank runs the same count."""
    mine = [(s, 1.0) for s in samples[rank::world]]
    target = -(-len(samples) // world)
    while len(mine) < target:
        mine.append((samples[0], 0.0))
    return mine
