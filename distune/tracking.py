"""Weights & Biases from rank 0; a null tracker with the same methods everywhere else.

The run id lives in the run directory's `wandb_run_id` (in object storage too, when run.output_dir is a URI; W&B's
own files then stay in this machine's working folder for the run), so every restart and every resumed invocation
continues the same W&B run. The API key is read by wandb from the environment; distune never reads, prints or
stores it. Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path


def run_id(run_dir: Path, store=None) -> str:
    """The W&B run id of this run directory, created once (atomically) and then reused. `store`: the run's
    distune.storage.RunStore when it is in object storage (the driver creates the id before any worker starts)."""
    if store is not None and store.remote:
        found = store.read_text("wandb_run_id")
        if found:
            return found.strip()
        store.write_text("wandb_run_id", uuid.uuid4().hex[:12])
        return store.read_text("wandb_run_id").strip()
    path = run_dir / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    run_dir.mkdir(parents=True, exist_ok=True)
    new = uuid.uuid4().hex[:12]
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".wandb_run_id.")
    with os.fdopen(fd, "w") as f:
        f.write(new)
    try:
        os.link(tmp, path)  # fails if another process won the race: then theirs is the id
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return path.read_text().strip()


class NullTracker:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def recent(self) -> list:
        return []

    def checkpointed(self) -> None:
        pass

    def replay(self, rows: list) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker:
    def __init__(self, wandb_cfg, run_dir: Path, name: str, config: dict, store=None):
        import wandb

        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)  # wandb needs its dir to exist
        self._run = wandb.init(
            project=wandb_cfg.project, entity=wandb_cfg.entity, mode=wandb_cfg.mode, dir=str(run_dir),
            id=run_id(run_dir, store), resume="allow", name=name, tags=wandb_cfg.tags, config=config,
            group=wandb_cfg.group, job_type=wandb_cfg.job_type,
            # The run file is flushed every second (wandb's default: 15 s), so a rank killed mid-run (node
            # loss, OOM) loses at most a second of metrics, not everything since the last flush.
            settings=wandb.Settings(console="off", silent=True, x_transaction_log_flush_interval=1.0))

        # The rows logged since the checkpoint before the last one. A lost host takes W&B's unflushed rows with
        # it, and steps up to the checkpoint a restart resumes from are never logged again: so they ride in the
        # checkpoint (recent / checkpointed) and are sent again on resume (replay). Two intervals, not one: a
        # row logged just before a save may still be unflushed after it.
        self._rows: tuple[list, list] = ([], [])

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)
        self._rows[1].append([step, dict(metrics)])

    def recent(self) -> list:
        return self._rows[0] + self._rows[1]

    def checkpointed(self) -> None:
        self._rows = (self._rows[1], [])

    def replay(self, rows: list) -> None:
        """Log a resumed checkpoint's rows again. A resumed online run starts at the server's next step, so rows
        the server has are skipped; an offline run file gets them again and `wandb sync` keeps one of each."""
        first = self._run.step
        for step, metrics in rows:
            if step >= first:
                self._run.log(metrics, step=step)
        self._rows = (list(rows), [])

    def finish(self) -> None:
        self._run.finish()


def make_tracker(cfg, rank: int, config: dict):
    if rank != 0 or cfg.wandb.mode == "disabled":
        return NullTracker()
    return WandbTracker(cfg.wandb, cfg.run_dir, cfg.run.name, config, cfg.store())


def read_offline_run(run_dir: Path) -> dict:
    """What the offline W&B run(s) under `run_dir` logged, read back from their `wandb/*run-*/run-*.wandb` files
    with wandb's own protobufs: {'history': [{key: value, '_step': n}, ...], 'config': {...}, 'run_ids': [...],
    'groups': [...], 'job_types': [...], 'finished': every file holds its exit record} (wandb's service may still
    be writing the last blocks for a moment after `run.finish()` returns).

    A run file is a LevelDB-style log: a 7-byte header (":W&B"), then 32 KiB blocks of chunks, each with a 7-byte
    header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last); one protobuf `Record` may span several."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    files = sorted(run_dir.glob("wandb/*run-*/run-*.wandb"))
    out = {"history": [], "config": {}, "run_ids": [], "groups": [], "job_types": [], "finished": bool(files)}
    for f in files:
        data, pos, pending, exited = f.read_bytes(), 7, b"", False
        if data[:3] != b":W&":
            raise ValueError(f"{f}: not a W&B run file")
        while pos + 7 <= len(data):
            if (32768 - pos % 32768) < 7:  # a block's trailer padding
                pos += 32768 - pos % 32768
                continue
            _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind == 0 and length == 0:
                continue
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind not in (1, 4):
                continue
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            which = rec.WhichOneof("record_type")
            if which == "history":
                out["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                       for item in rec.history.item})
            elif which == "config":
                out["config"].update({item.key: json.loads(item.value_json) for item in rec.config.update})
            elif which == "run":
                out["run_ids"].append(rec.run.run_id)
                out["groups"].append(rec.run.run_group)
                out["job_types"].append(rec.run.job_type)
                out["config"].update({item.key: json.loads(item.value_json) for item in rec.run.config.update})
            exited = exited or which == "exit"
        out["finished"] = out["finished"] and exited
    return out
