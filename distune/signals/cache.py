"""The offline teacher cache: top-k token ids + log-probs per KD position, sharded, in one of two layouts.

`distune cache-teacher CFG` runs the teacher once over the training split (as Ray tasks, one per shard,
see distune.cache_teacher; `write_shard` is the per-shard work and runs anywhere). Training with
`signal: cached` then reads the cache instead of running the teacher.

Layouts of `cache_dir` (meta.json's `format` and `layout`; both are read):
    format 2, mmap (default)   shard-00000-of-00004.{ids,logp,offsets,keys}: raw arrays, memory-mapped by every rank,
                               sample i of the split at row i // count of shard i % count (distune.signals.cache_mmap)
    format 1, npz              shard-00000-of-00004.npz: keys [S] (sample hash), offsets [S+1], ids [N, k], logp [N, k],
                               zip-compressed (`method.cache_compress`: smaller to move, but every rank decompresses
                               every shard into memory)
    meta.json                  written last: a cache is complete exactly when it exists
Only the KD positions are stored: the trained ones by default (with loss on responses, a few percent
of all tokens), every position with `method.kd_positions: all`. Ids are uint16
when the vocabulary fits (else int32), log-probs float16 at the distillation temperature. A sample is keyed by a
hash of its token ids and labels, checked on every read, so a cache built for other data, another template or
another tokenizer is detected sample by sample, never silently misread. A classifier student's class log-probs
(`write_class_shard`, [S, C] per shard, keyed by data line) are small and stay npz.
Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from distune.data import IGNORE, DataError, Sample, collate
from distune.paths import write_atomic
from distune.signals import cache_mmap
from distune.signals.base import TeacherSpec, kd_positions
from distune.signals.cache_mmap import CacheError

FORMAT = 2  # the memory-mapped layout; 1 is the compressed npz layout (method.cache_compress), still read
LAYOUTS = {1: "npz", 2: "mmap"}  # format -> layout


def sample_key(s: Sample) -> str:
    h = hashlib.sha256(np.asarray(s.input_ids, dtype=np.int64).tobytes())
    h.update(np.asarray(s.labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:20]


def by_length(samples: list[Sample]) -> list[Sample]:
    """Longest first: a micro-batch pads to similar lengths (rows are found by key, so the order is free)."""
    return sorted(samples, key=lambda s: -len(s.input_ids))


def shard_name(index: int, count: int) -> str:
    """An npz shard's file name."""
    return f"{cache_mmap.shard_stem(index, count)}.npz"


def shard_files(meta: dict) -> set[str]:
    """The shard files a complete cache consists of (anything else named shard-* in its folder is stale)."""
    if meta.get("layout", "npz") == "mmap":
        return {name for stem in meta["shards"] for name in cache_mmap.part_names(stem)}
    return set(meta["shards"])


def _kd_count(s: Sample, which: str) -> int:
    """The KD positions of one sample, as kd_positions counts them in a batch (known before the teacher runs)."""
    if which == "response":
        return sum(1 for x in s.labels[1:] if x != IGNORE)
    return max(0, len(s.input_ids) - 1)


def _teacher_rows(samples: Sequence, mine: list[int], order: list[int], counts: list[int], teacher, micro_batch: int,
                  pad_id: int, device: torch.device, which: str, id_dtype, progress):
    """(j, ids, log-probs) for each sample `mine[j]`, the teacher run `micro_batch` samples at a time in `order`."""
    for start in range(0, len(order), micro_batch):
        js = order[start:start + micro_batch]
        chunk = [samples[mine[j]] for j in js]
        batch = collate(chunk, pad_id).to(device)
        positions = kd_positions(batch, which)
        out = teacher(batch, positions)
        ids = out.topk_ids.cpu().numpy().astype(id_dtype)
        logp = out.topk_logp.cpu().float().numpy().astype(np.float16)
        at = 0
        for j, n in zip(js, positions.sum(1).tolist()):
            if n != counts[j]:
                raise CacheError(f"data line {chunk[js.index(j)].line}: {n} KD positions in its batch, "
                                 f"{counts[j]} counted from its labels")
            yield j, ids[at:at + n], logp[at:at + n]
            at += n
        if progress is not None:
            progress(len(chunk))


def write_shard(samples: Sequence[Sample], teacher, out_dir: Path, index: int, count: int, micro_batch: int,
                pad_id: int, device: torch.device, progress=None, which: str = "response",
                compress: bool = False) -> dict:
    """Run the teacher over the samples i with i % count == index and write shard `index` of `count`. Returns its
    stats. `samples`: the training split (a list, or any sequence such as the memory-mapped store); `which`: the KD
    positions stored (`response`: the trained ones; `all`: every position of the sample); `compress`: the npz
    layout (format 1) instead of the memory-mapped one."""
    t0 = time.perf_counter()
    mine = list(range(index, len(samples), count))
    keys, counts, lengths = [], [], []
    for i in mine:  # one pass for what the layout needs up front; samples are read again in batches
        s = samples[i]
        keys.append(sample_key(s))
        counts.append(_kd_count(s, which))
        lengths.append(len(s.input_ids))
    order = sorted(range(len(mine)), key=lambda j: -lengths[j])  # longest first: a micro-batch pads little
    id_dtype = np.uint16 if teacher.vocab_size <= 2**16 else np.int32
    rows = _teacher_rows(samples, mine, order, counts, teacher, micro_batch, pad_id, device, which, id_dtype, progress)
    stats = {"samples": len(mine), "positions": sum(counts), "ids_dtype": np.dtype(id_dtype).name}
    if not compress:
        stem = cache_mmap.shard_stem(index, count)
        size = cache_mmap.write(out_dir, stem, keys, counts, id_dtype, rows)
        return {"shard": stem, "layout": "mmap", **stats, "bytes": size, "seconds": time.perf_counter() - t0}
    got = list(rows)  # in the order computed: rows are found by key, so any order reads the same
    empty = np.zeros((0, 0))
    target = _save(out_dir, index, count, keys=np.asarray([keys[j] for j, _, _ in got]),
                   offsets=np.cumsum([0] + [len(ids) for _, ids, _ in got], dtype=np.int64),
                   ids=np.concatenate([ids for _, ids, _ in got]) if got else empty.astype(id_dtype),
                   logp=np.concatenate([logp for _, _, logp in got]) if got else empty.astype(np.float16))
    return {"shard": target.name, "layout": "npz", **stats, "bytes": target.stat().st_size,
            "seconds": time.perf_counter() - t0}


def write_class_shard(samples: list[Sample], model, tokenizer, data_cfg, labels: list[str], out_dir: Path,
                      index: int, count: int, micro_batch: int, device: torch.device, progress=None) -> dict:
    """Class log-probs [S, C] of a causal-LM teacher for shard `index`, keyed by data line.

    A class's score is the summed log-probability of its name's tokens after the prompt (the same
    verbalizer scoring as eval.choices), normalised over the classes."""
    from distune.data import Renderer
    from distune.tasks.choices import choice_scores

    mine = by_length(samples[index::count])
    renderer = Renderer(tokenizer, data_cfg, data_cfg.path)
    choice_ids = [renderer.pair("", name)[1] for name in labels]
    t0 = time.perf_counter()
    parts = []
    with torch.no_grad():
        for start in range(0, len(mine), micro_batch):
            chunk = mine[start:start + micro_batch]
            scores, _ = choice_scores(model, chunk, choice_ids, tokenizer.pad_token_id, device)
            parts.append(torch.log_softmax(scores.float(), dim=-1).cpu())
            if progress is not None:
                progress(len(chunk))
    logp = torch.cat(parts).numpy().astype(np.float32)
    keys = [line_key(s.line) for s in mine]
    target = _save(out_dir, index, count, keys=np.asarray(keys), class_logp=logp)
    return {"shard": target.name, "layout": "npz", "samples": len(keys), "positions": len(keys),
            "bytes": target.stat().st_size, "seconds": time.perf_counter() - t0}


def line_key(line: int) -> str:
    return f"line-{line}"


def _save(out_dir: Path, index: int, count: int, **arrays) -> Path:
    return write_atomic(out_dir / shard_name(index, count), lambda f: np.savez_compressed(f, **arrays))


def write_meta(out_dir: Path, spec: TeacherSpec, vocab_size: int | None, shards: list[dict], data_path: str,
               labels: list[str] | None = None) -> dict:
    positions = sum(s["positions"] for s in shards)
    size = sum(s["bytes"] for s in shards)
    layouts = {s.get("layout", "npz") for s in shards}
    if len(layouts) != 1:
        raise CacheError(f"teacher cache {out_dir}: its shards were written in different layouts {sorted(layouts)}")
    layout = layouts.pop()
    meta = {"format": next(f for f, name in LAYOUTS.items() if name == layout), "layout": layout,
            "mode": "classes" if labels else "topk", "teacher": spec.path,
            "top_k": None if labels else spec.top_k, "temperature": None if labels else spec.temperature,
            "kd_positions": None if labels else spec.positions,
            "vocab_size": vocab_size, "labels": labels, "data": data_path,
            "teacher_prompt": [spec.prompt, spec.system] if labels else None,
            "samples": sum(s["samples"] for s in shards), "positions": positions, "bytes": size,
            "bytes_per_token": size / max(1, positions), "shards": [s["shard"] for s in shards]}
    if not labels:
        meta["dense_fp32_bytes_per_token"] = 4 * vocab_size
        meta["ids_dtype"] = shards[0].get("ids_dtype", "uint16" if vocab_size <= 2**16 else "int32")
    write_atomic(out_dir / "meta.json", json.dumps(meta, indent=2))
    return meta


def read_meta(cache_dir: str | Path) -> dict:
    meta_file = Path(cache_dir) / "meta.json"
    if not meta_file.is_file():
        raise CacheError(f"method.cache_dir: {cache_dir} holds no complete teacher cache (no meta.json); "
                         "build it with `distune cache-teacher CFG`")
    return json.loads(meta_file.read_text())


def check_meta(meta: dict, spec: TeacherSpec, vocab_size: int | None, cache_dir, classes: bool = False) -> None:
    """The cache must come from this teacher at this temperature and top-k (`classes`: a classifier student's
    class probabilities, tempered at training time): else the loss would differ. Either layout is read."""
    if classes:
        wanted = {"mode": "classes", "teacher": spec.path, "teacher_prompt": [spec.prompt, spec.system]}
    else:
        wanted = {"mode": "topk", "teacher": spec.path, "top_k": spec.top_k,
                  "temperature": spec.temperature, "vocab_size": vocab_size, "kd_positions": spec.positions}
    layout = LAYOUTS.get(meta.get("format"))
    if layout is None or meta.get("layout", "npz") != layout:
        raise CacheError(f"method.cache_dir: {cache_dir} was built with format={meta.get('format')!r} (layout "
                         f"{meta.get('layout', 'npz')!r}), this run reads 1 (npz) or 2 (mmap); rebuild it with "
                         "`distune cache-teacher CFG`")
    meta = {"kd_positions": "response", **meta}  # a cache whose meta names no kd_positions holds the responses
    for key, value in wanted.items():
        if meta.get(key) != value:
            raise CacheError(f"method.cache_dir: {cache_dir} was built with {key}={meta.get(key)!r}, this run "
                             f"needs {value!r}; rebuild it with `distune cache-teacher CFG`")


def _missing(s, cache_dir, what: str = "other data, template, limit or tokenizer") -> DataError:
    return DataError(f"data line {s.line}: this sample is not in the teacher cache {cache_dir} (built for {what}); "
                     "rebuild it with `distune cache-teacher CFG`")


def _extras(ids: np.ndarray, logp: np.ndarray) -> dict:
    """A sample's rows as collate expects them (copies: nothing keeps the cache's pages or arrays alive)."""
    return {"teacher_topk_ids": ids.astype(np.int64), "teacher_topk_logp": logp.astype(np.float32)}


def _give(samples, fn: Callable) -> None:
    """`fn(i, sample) -> extras` for every sample: at read time on a store (`samples.attach`: a rank reads only the
    rows of the samples it reads; the first and last are read now, so a cache of other data fails at start), else
    now, into each sample."""
    if hasattr(samples, "attach"):
        samples.attach(fn)
        for i in sorted({0, len(samples) - 1}) if len(samples) else ():
            _ = samples[i]  # read for its check
        return
    for i, s in enumerate(samples):
        s.extras = fn(i, s)


def attach(samples: Sequence[Sample], cache_dir: str | Path, classes: bool = False) -> None:
    """Give every sample of the training split `samples` its cached rows (`extras`); a sample absent from the cache
    is an error naming it. `classes`: the student is a classifier, which reads class probabilities.

    The memory-mapped layout loads nothing: each read maps in that sample's rows and checks its key. The npz layout
    is decompressed into memory first (every shard, on every rank), then served by key."""
    meta = read_meta(cache_dir)
    if meta.get("mode") == "classes" or classes:
        return _attach_classes(samples, cache_dir, meta, classes)
    if meta.get("layout", "npz") == "mmap":
        shards = cache_mmap.MmapShards(cache_dir, meta["shards"], meta["top_k"], meta["ids_dtype"])

        def mapped(i: int, s: Sample) -> dict:
            got = shards.rows(i)
            if got is None or got[0] != bytes.fromhex(sample_key(s)):
                raise _missing(s, cache_dir)
            return _extras(got[1], got[2])

        mapped.release = shards.release  # the loader lets go of the rows it read (StoredSamples.release)
        return _give(samples, mapped)
    index: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in meta["shards"]:
        with np.load(Path(cache_dir) / name) as z:
            keys, offsets, ids, logp = z["keys"], z["offsets"], z["ids"], z["logp"]
        for i, key in enumerate(keys.tolist()):
            index[key] = (ids[offsets[i]:offsets[i + 1]], logp[offsets[i]:offsets[i + 1]])

    def loaded(i: int, s: Sample) -> dict:
        rows = index.get(sample_key(s))
        if rows is None:
            raise _missing(s, cache_dir)
        return _extras(*rows)

    _give(samples, loaded)


def _attach_classes(samples: Sequence, cache_dir, meta: dict, classes: bool) -> None:
    if meta.get("mode") != "classes":
        raise DataError(f"method.cache_dir: {cache_dir} holds top-k next-token distributions; a classifier student "
                        "needs class probabilities: rebuild it with `distune cache-teacher CFG`")
    if not classes:
        raise DataError(f"method.cache_dir: {cache_dir} holds class probabilities over {meta['labels']}; "
                        "the student must be a sequence classifier over the same classes")
    index: dict[str, np.ndarray] = {}
    for name in meta["shards"]:
        with np.load(Path(cache_dir) / name) as z:
            index.update(zip(z["keys"].tolist(), z["class_logp"]))

    def row_of(i: int, s) -> dict:
        row = index.get(line_key(s.line))
        if row is None:
            raise _missing(s, cache_dir, "other data or limit")
        if len(row) != len(meta["labels"]):
            raise DataError(f"method.cache_dir: {cache_dir} holds class probabilities over {meta['labels']}; "
                            "the student must be a sequence classifier over the same classes")
        return {"teacher_class_logp": row.astype(np.float32)}

    _give(samples, row_of)
