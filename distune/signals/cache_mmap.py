"""The teacher cache's memory-mapped layout (format 2, the default): per shard, raw little-endian files that
numpy.memmap reads in place, so a training rank pages in only the rows of the samples it reads.

    shard-00000-of-00004.keys     uint8 [S, 10]            each sample's key (sample_key: 20 hex digits, as bytes)
    shard-00000-of-00004.offsets  int64 [S+1]              sample j's rows are rows offsets[j] .. offsets[j+1]
    shard-00000-of-00004.ids      uint16 | int32 [N, k]    top-k token ids (int32 above 65,536 ids)
    shard-00000-of-00004.logp     float16 [N, k]           their log-probs at the distillation temperature

Shard `index` of `count` holds the training split's samples i with i % count == index, in increasing i, so sample i
is row i // count of shard i % count: no index is built in memory. The teacher may compute them in any order
(longest first pads least): each sample's place is known before it runs, as the number of its KD positions follows
from its labels. The stored key is compared on every read, so a cache of other data is never silently misread.
Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from distune.mapped import Maps
from distune.paths import write_atomic

PARTS = ("ids", "logp", "offsets", "keys")
KEY_BYTES = 10  # sample_key's 20 hex digits
_STEM = re.compile(r"shard-(\d+)-of-(\d+)$")


class CacheError(ValueError):
    """A teacher cache that cannot serve this run (incomplete, another teacher or settings, damaged files)."""


def shard_stem(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def part_names(stem: str) -> list[str]:
    return [f"{stem}.{part}" for part in PARTS]


def _together(paths: list[Path], fill: Callable) -> None:
    """write_atomic for several files at once: `fill(files)` writes them all, and each is renamed into place only
    once it returned (a failure leaves none of them behind)."""
    def nest(i: int, files: list) -> None:
        if i == len(paths):
            fill(files)
        else:
            write_atomic(paths[i], lambda f: nest(i + 1, files + [f]))
    nest(0, [])


def write(out_dir: Path, stem: str, keys: list[str], counts: list[int], id_dtype,
          rows: Iterable[tuple[int, np.ndarray, np.ndarray]]) -> int:
    """Write one shard: `keys` and `counts` (rows per sample) in sample order; `rows` yields (j, ids [n_j, k],
    log-probs [n_j, k]) for every sample j once, in any order, and each lands at its offset. Returns the bytes."""
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    id_dtype, logp_dtype = np.dtype(id_dtype).newbyteorder("<"), np.dtype("<f2")
    paths = [out_dir / name for name in part_names(stem)]

    def fill(files) -> None:
        f_ids, f_logp = files
        written, k = 0, None
        for j, ids, logp in rows:
            if len(ids) != counts[j] or len(logp) != counts[j]:
                raise CacheError(f"cache shard {stem}: sample {j} got {len(ids)} teacher rows for {counts[j]} "
                                 "KD positions")
            if len(ids):
                k = k or ids.shape[1]
                if ids.shape[1] != k:
                    raise CacheError(f"cache shard {stem}: the teacher gave {ids.shape[1]} ids per row, earlier {k}")
                for f, part, dtype in ((f_ids, ids, id_dtype), (f_logp, logp, logp_dtype)):
                    f.seek(int(offsets[j]) * k * dtype.itemsize)
                    f.write(np.ascontiguousarray(part, dtype).tobytes())
            written += 1
        if written != len(counts):
            raise CacheError(f"cache shard {stem}: {written} of {len(counts)} samples were written")
        for f, dtype in ((f_ids, id_dtype), (f_logp, logp_dtype)):
            f.truncate(int(offsets[-1]) * (k or 0) * dtype.itemsize)

    _together(paths[:2], fill)
    write_atomic(paths[2], offsets.astype("<i8").tobytes())
    write_atomic(paths[3], b"".join(bytes.fromhex(key) for key in keys))
    return sum(p.stat().st_size for p in paths)


class MmapShards:
    """A format-2 cache's shards, each memory-mapped on its first read (opening reads nothing). Pickles without
    its maps (a copy re-opens them), never with the cache's contents."""

    def __init__(self, cache_dir: str | Path, stems: list[str], k: int, id_dtype: str):
        self.dir, self.k, self.id_dtype = Path(cache_dir), k, np.dtype(id_dtype).newbyteorder("<")
        found = {}
        for stem in stems:
            m = _STEM.match(stem)
            if m is None:
                raise CacheError(f"method.cache_dir: {cache_dir}: meta.json lists {stem!r}, not a shard")
            found[int(m[1])] = (stem, int(m[2]))
        self.count = len(stems)
        if sorted(found) != list(range(self.count)) or any(c != self.count for _, c in found.values()):
            raise CacheError(f"method.cache_dir: {cache_dir}: meta.json lists shards {stems}, not 0..N-1 of N; "
                             "rebuild it with `distune cache-teacher CFG`")
        self.stems = [found[i][0] for i in range(self.count)]
        self._open: dict[int, tuple] = {}
        self._files = Maps()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}, "_files": Maps()}

    def _map(self, name: str, dtype, width: int | None = None) -> np.ndarray:
        path = self.dir / name
        size = path.stat().st_size
        if size % (np.dtype(dtype).itemsize * (width or 1)):
            raise CacheError(f"teacher cache file {path}: {size} bytes is not a whole number of rows; rebuild it "
                             "with `distune cache-teacher CFG`")
        flat = self._files.open(path, dtype)
        return flat.reshape(-1, width) if width else flat

    def release(self) -> None:
        """Let go of the rows read so far (distune.mapped): a rank keeps only what it reads now resident."""
        self._files.release()

    def _shard(self, index: int) -> tuple:
        got = self._open.get(index)
        if got is None:
            stem = self.stems[index]
            keys = self._map(f"{stem}.keys", np.uint8, KEY_BYTES)
            offsets = self._map(f"{stem}.offsets", "<i8")
            ids = self._map(f"{stem}.ids", self.id_dtype, self.k)
            logp = self._map(f"{stem}.logp", "<f2", self.k)
            if len(offsets) != len(keys) + 1 or offsets[-1] != len(ids) or len(ids) != len(logp):
                raise CacheError(f"teacher cache shard {self.dir / stem}: its files disagree ({len(keys)} keys, "
                                 f"{len(offsets)} offsets, {len(ids)} id rows, {len(logp)} log-prob rows); rebuild "
                                 "it with `distune cache-teacher CFG`")
            got = self._open[index] = (keys, offsets, ids, logp)
        return got

    def rows(self, i: int) -> tuple[bytes, np.ndarray, np.ndarray] | None:
        """Sample i's (stored key, ids, log-probs), views into the maps; None when the cache ends before it."""
        keys, offsets, ids, logp = self._shard(i % self.count)
        j = i // self.count
        if j >= len(keys):
            return None
        a, b = int(offsets[j]), int(offsets[j + 1])
        return keys[j].tobytes(), ids[a:b], logp[a:b]
