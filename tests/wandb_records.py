"""Read what an offline W&B run logged, from its `run-<id>.wandb` file, with wandb's own protobufs.

The file is a LevelDB-style log: a 7-byte header ("W&B" magic), then 32 KiB blocks of records, each
with a 7-byte header (crc32, length, type); a protobuf `Record` may span several chunks.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:3] == b":W&", f"{path}: not a W&B run file"
    pos, out, pending = 7, [], b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


def logged(run_dir: Path) -> dict:
    """{'history': [ {key: value, '_step': n}, ...], 'config': {...}, 'run_ids': [...], 'groups': [...],
    'job_types': [...]} over all run files."""
    history, config, run_ids, groups, job_types = [], {}, [], [], []
    for f in sorted(run_dir.glob("wandb/*run-*/run-*.wandb")):
        for rec in records(f):
            which = rec.WhichOneof("record_type")
            if which == "history":
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in rec.history.item})
            elif which == "config":
                for item in rec.config.update:
                    config[item.key] = json.loads(item.value_json)
            elif which == "run":
                run_ids.append(rec.run.run_id)
                groups.append(rec.run.run_group)
                job_types.append(rec.run.job_type)
                for item in rec.run.config.update:
                    config[item.key] = json.loads(item.value_json)
    return {"history": history, "config": config, "run_ids": run_ids, "groups": groups, "job_types": job_types}


def finished(run_dir: Path, timeout: float = 60.0) -> dict:
    """`logged(run_dir)` once every run file holds its exit record: wandb's service may still be writing the
    last blocks for a moment after `run.finish()` returns (seen under load)."""
    import time

    deadline = time.time() + timeout
    while True:
        files = sorted(run_dir.glob("wandb/*run-*/run-*.wandb"))
        done = files and all(any(r.WhichOneof("record_type") == "exit" for r in records(f)) for f in files)
        if done or time.time() > deadline:
            return logged(run_dir)
        time.sleep(0.5)
