"""Save / load the full training state of a DeepSpeed engine into one directory.

Each rank writes its own shard files plus `rng_rank{r}.pt` and, last, `complete_rank{r}`. A directory
is loadable only when every rank's marker is there, so a save killed half-way is never mistaken for a
checkpoint. Publishing the directory atomically (temp dir + rename, or Ray's storage) is the caller's job.

Resuming on another worker count: the ZeRO shards of N ranks are converted into DeepSpeed's universal
checkpoint (one file per parameter and optimizer state, `ds_to_universal`), which M ranks load and
re-partition; the engine must be built with `checkpoint.load_universal` for that (see `reshard_source`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from deepspeed.accelerator import get_accelerator

TAG = "state"
UNIVERSAL = "universal"  # the folder a resharding resume converts the checkpoint into


class CheckpointError(RuntimeError):
    pass


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if get_accelerator().device_name() == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and get_accelerator().device_name() == "cuda":
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, directory: Path, client_state: dict) -> None:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory), tag=TAG, client_state=client_state)
    torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")
    if rank == 0:
        (directory / "meta.json").write_text(json.dumps({"world_size": world, **client_state}))
    (directory / f"complete_rank{rank}").write_text("ok")


def read_meta(directory: Path) -> dict:
    """Checkpoint metadata, after checking that every rank finished writing."""
    meta_file = directory / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{directory}: incomplete checkpoint (no meta.json)")
    meta = json.loads(meta_file.read_text())
    missing = [r for r in range(meta["world_size"]) if not (directory / f"complete_rank{r}").is_file()]
    if missing:
        raise CheckpointError(f"{directory}: incomplete checkpoint (ranks {missing} did not finish writing)")
    return meta


def reshard_source(directory: Path, work: Path) -> Path | None:
    """When `directory` was written by another number of ranks: its universal form under `work` (every rank
    converts its own copy: the checkpoint may live on node-local storage), else None."""
    meta = read_meta(directory)
    if meta["world_size"] == torch.distributed.get_world_size():
        return None
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = work / UNIVERSAL
    ds_to_universal(Namespace(input_folder=str(directory / TAG), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
    return out



def load(engine, directory: Path, universal: Path | None = None) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; return the client state (step, data position).
    With `universal` (from `reshard_source`, engine built with checkpoint.load_universal) the states come
    from there, re-partitioned over this run's ranks; ranks the old run did not have keep their own seeds."""
    meta = read_meta(directory)
    if universal is not None:
        _, client = engine.load_checkpoint(str(universal.parent), tag=universal.name, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
    else:
        _, client = engine.load_checkpoint(str(directory), tag=TAG, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
    if client is None:
        raise CheckpointError(f"{directory}: DeepSpeed found no state under tag {TAG!r}")
    rng = directory / f"rng_rank{torch.distributed.get_rank()}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return client | {"world_size": meta["world_size"]}
