"""The offline teacher cache: top-k token ids + log-probs per trained position, compressed, sharded.

`distune cache-teacher CFG` runs the teacher once over the training split (as Ray tasks, one per shard,
see distune.cache_teacher; `write_shard` is the per-shard work and runs anywhere). Training with
`signal: cached` then reads the cache instead of running the teacher.

Layout of `cache_dir`:
    shard-00000-of-00004.npz   keys [S] (sample hash), offsets [S+1], ids [N, k], logp [N, k] (float16)
    meta.json                  written last: a cache is complete exactly when it exists
Only the KD positions are stored: the trained ones by default (with loss on responses, a few percent
of all tokens), every position with `method.kd_positions: all`. Ids are uint16
when the vocabulary fits (else int32), log-probs float16 at the distillation temperature; numpy's zip
deflate on top. A sample is keyed by a hash of its token ids and labels, so a cache built for other data,
another template or another tokenizer is detected sample by sample, never silently misread.
Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from distune.data import DataError, Sample, collate
from distune.signals.base import TeacherSpec, kd_positions
from distune.paths import write_atomic

FORMAT = 1


class CacheError(ValueError):
    pass


def sample_key(s: Sample) -> str:
    h = hashlib.sha256(np.asarray(s.input_ids, dtype=np.int64).tobytes())
    h.update(np.asarray(s.labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:20]


def by_length(samples: list[Sample]) -> list[Sample]:
    """Longest first: a micro-batch pads to similar lengths (rows are found by key, so the order is free)."""
    return sorted(samples, key=lambda s: -len(s.input_ids))


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.npz"


def write_shard(samples: list[Sample], teacher, out_dir: Path, index: int, count: int,
                micro_batch: int, pad_id: int, device: torch.device, progress=None, which: str = "response") -> dict:
    """Run the teacher over `samples[index::count]` and write one shard atomically. Returns its stats.
    `which`: the KD positions stored (`response`: the trained ones; `all`: every position of the sample)."""
    mine = by_length(samples[index::count])
    keys, offsets, ids_parts, logp_parts = [], [0], [], []
    t0 = time.perf_counter()
    for start in range(0, len(mine), micro_batch):
        chunk = mine[start:start + micro_batch]
        batch = collate(chunk, pad_id).to(device)
        positions = kd_positions(batch, which)
        out = teacher(batch, positions)
        per_sample = positions.sum(1).tolist()
        ids, logp = out.topk_ids.cpu(), out.topk_logp.cpu()
        at = 0
        for s, n in zip(chunk, per_sample):
            keys.append(sample_key(s))
            ids_parts.append(ids[at:at + n])
            logp_parts.append(logp[at:at + n])
            offsets.append(offsets[-1] + n)
            at += n
        if progress is not None:
            progress(len(chunk))
    id_dtype = np.uint16 if teacher.vocab_size <= 2**16 else np.int32
    ids_all = torch.cat(ids_parts).numpy().astype(id_dtype)
    logp_all = torch.cat(logp_parts).numpy().astype(np.float16)
    target = _save(out_dir, index, count, keys=np.asarray(keys), offsets=np.asarray(offsets, dtype=np.int64),
                   ids=ids_all, logp=logp_all)
    return {"shard": target.name, "samples": len(keys), "positions": int(offsets[-1]),
            "bytes": target.stat().st_size, "seconds": time.perf_counter() - t0}


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
    return {"shard": target.name, "samples": len(keys), "positions": len(keys), "bytes": target.stat().st_size,
            "seconds": time.perf_counter() - t0}


def line_key(line: int) -> str:
    return f"line-{line}"


def _save(out_dir: Path, index: int, count: int, **arrays) -> Path:
    return write_atomic(out_dir / shard_name(index, count), lambda f: np.savez_compressed(f, **arrays))


def write_meta(out_dir: Path, spec: TeacherSpec, vocab_size: int | None, shards: list[dict], data_path: str,
               labels: list[str] | None = None) -> dict:
    positions = sum(s["positions"] for s in shards)
    size = sum(s["bytes"] for s in shards)
    meta = {"format": FORMAT, "mode": "classes" if labels else "topk", "teacher": spec.path,
            "top_k": None if labels else spec.top_k, "temperature": None if labels else spec.temperature,
            "kd_positions": None if labels else spec.positions,
            "vocab_size": vocab_size, "labels": labels, "data": data_path,
            "teacher_prompt": [spec.prompt, spec.system] if labels else None,
            "samples": sum(s["samples"] for s in shards), "positions": positions, "bytes": size,
            "bytes_per_token": size / max(1, positions), "shards": [s["shard"] for s in shards]}
    if not labels:
        meta["dense_fp32_bytes_per_token"] = 4 * vocab_size
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
    class probabilities, tempered at training time): else the loss would differ."""
    if classes:
        wanted = {"format": FORMAT, "mode": "classes", "teacher": spec.path,
                  "teacher_prompt": [spec.prompt, spec.system]}
    else:
        wanted = {"format": FORMAT, "mode": "topk", "teacher": spec.path, "top_k": spec.top_k,
                  "temperature": spec.temperature, "vocab_size": vocab_size, "kd_positions": spec.positions}
    meta = {"kd_positions": "response", **meta}  # a cache whose meta names no kd_positions holds the responses
    for key, value in wanted.items():
        if meta.get(key) != value:
            raise CacheError(f"method.cache_dir: {cache_dir} was built with {key}={meta.get(key)!r}, this run "
                             f"needs {value!r}; rebuild it with `distune cache-teacher CFG`")


def attach(samples: list[Sample], cache_dir: str | Path, classes: bool = False) -> None:
    """Give every sample its cached rows (`extras`); a sample absent from the cache is an error naming it.
    `classes`: the student is a classifier, which reads class probabilities."""
    meta = read_meta(cache_dir)
    if meta.get("mode") == "classes" or classes:
        return _attach_classes(samples, cache_dir, meta, classes)
    index: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in meta["shards"]:
        with np.load(Path(cache_dir) / name) as z:
            keys, offsets, ids, logp = z["keys"], z["offsets"], z["ids"], z["logp"]
        for i, key in enumerate(keys.tolist()):
            index[key] = (ids[offsets[i]:offsets[i + 1]], logp[offsets[i]:offsets[i + 1]])
    for s in samples:
        rows = index.get(sample_key(s))
        if rows is None:
            raise DataError(f"data line {s.line}: this sample is not in the teacher cache {cache_dir} (built for "
                            "other data, template, limit or tokenizer); rebuild it with `distune cache-teacher CFG`")
        s.extras = {"teacher_topk_ids": rows[0].astype(np.int64), "teacher_topk_logp": rows[1].astype(np.float32)}


def _attach_classes(samples: list, cache_dir, meta: dict, classes: bool) -> None:
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
    for s in samples:
        row = index.get(line_key(s.line))
        if row is None:
            raise DataError(f"data line {s.line}: this sample is not in the teacher cache {cache_dir} (built for "
                            "other data or limit); rebuild it with `distune cache-teacher CFG`")
        if len(row) != len(meta["labels"]):
            raise DataError(f"method.cache_dir: {cache_dir} holds class probabilities over {meta['labels']}; "
                            "the student must be a sequence classifier over the same classes")
        s.extras = {"teacher_class_logp": row.astype(np.float32)}
