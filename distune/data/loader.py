"""Batches for one rank: seeded per-epoch order, sharded by rank, resumable at any micro-batch.

The position is two integers (epoch, micro-batch index), saved in checkpoints: resuming replays the
exact order an uninterrupted run would have seen. Imports neither ray nor deepspeed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from distune.tasks.base import IGNORE
from distune.tasks.base import lengths as lengths_of
from distune.tasks.causal_lm import Sample
from distune.data.sources import DataError
from distune.tasks import collate


def pack_groups(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of samples per packed row: first-fit by decreasing length (deterministic), each row <= capacity.

    First fit puts each sample in the lowest-numbered row with room for it. A max-tree over the rows' free room
    finds that row in O(log N) (rows not opened yet have all of it), so packing N samples is O(N log N): 1M lengths
    take seconds (bench/packing.py), where scanning the rows took minutes at 80k."""
    n = len(lengths)
    if n == 0:
        return []
    lens = np.asarray(lengths, dtype=np.int64)
    order = np.lexsort((np.arange(n), -lens)).tolist()  # longest first, ties by index
    size = 1 << max(0, (n - 1).bit_length())
    tree = [capacity] * (2 * size)  # tree[k]: the most room in node k's rows; leaves size.. are the rows
    rows: list[list[int]] = []
    lens = lens.tolist()
    for i in order:
        need = lens[i]
        if tree[1] >= need:
            node = 1
            while node < size:  # down to the leftmost row with room
                node = 2 * node if tree[2 * node] >= need else 2 * node + 1
            r = node - size
        else:  # longer than a row (a sample is cut at the capacity first): a row of its own
            r = len(rows)
            node = r + size
        if r == len(rows):
            rows.append([i])
        else:
            rows[r].append(i)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
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


RELEASE_EVERY = 8  # micro-batches: fault-around maps ~64 KiB per read, so ~40 MiB stay mapped at most


class Packed(Sequence):
    """The packed rows of `samples`, each merged when read (`pack`), so extras attached to the samples later (a
    teacher cache) are in it and a rank merges only the rows it trains on."""

    def __init__(self, samples, groups: list[list[int]]):
        self.samples, self.groups = samples, groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(len(self)))]
        return pack(self.samples, [self.groups[j]])[0]

    def release(self) -> None:
        getattr(self.samples, "release", lambda: None)()

    @property
    def lengths(self) -> np.ndarray:
        lengths = lengths_of(self.samples)
        return np.asarray([int(lengths[g].sum()) for g in self.groups], dtype=np.int64)




class ShardedBatches:
    """Micro-batches of this rank. Every rank sees the same number, so collectives stay in lockstep. `samples` is
    any sequence (a list, a stored split, packed rows): only this rank's samples are read."""

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
        lengths = lengths_of(self.samples).tolist()
        out = []
        for start in range(0, len(perm), chunk):
            out += sorted(perm[start:start + chunk], key=lambda i: -lengths[i])
        full = len(out) // step
        batches = [out[i * step:(i + 1) * step] for i in range(full)]
        order = torch.randperm(full, generator=g).tolist()
        return [i for b in order for i in batches[b]] + out[full * step:]

    def iterate(self, epoch: int, start: int) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
        """Yield (epoch, index_in_epoch, batch) forever from position (epoch, start). Samples read from memory maps
        are let go of every RELEASE_EVERY micro-batches, so a rank keeps only the pages it reads now resident."""
        release = getattr(self.samples, "release", None)
        while True:
            idx = self.order(epoch)
            for b in range(start, self.per_epoch):
                chunk = idx[b * self.micro:(b + 1) * self.micro]
                yield epoch, b, collate([self.samples[i] for i in chunk], self.pad_id)
                if release is not None and b % RELEASE_EVERY == RELEASE_EVERY - 1:
                    release()
            epoch, start = epoch + 1, 0


def eval_shard(samples: list[Sample], rank: int, world: int) -> list[tuple[Sample, float]]:
    """This rank's eval samples with weights; padded with weight-0 repeats so every rank runs the same count."""
    mine = [(s, 1.0) for s in samples[rank::world]]
    target = -(-len(samples) // world)
    while len(mine) < target:
        mine.append((samples[0], 0.0))
    return mine
