"""The run directory's record of the config that trains into it.

Running a config again resumes from its run directory's latest checkpoint, which is only right when the same
recipe wrote that checkpoint: a changed model, method, data or schedule would silently continue someone else's
state (or fail deep inside DeepSpeed). `check_resumable` compares the directory's `config.yaml` with the new
config before any worker starts and before anything in the directory is replaced; `write_config` records the
new one. Imports neither ray nor deepspeed.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from distune.config import ConfigError, RunConfig, dump_config
from distune.reporting import checkpoint_dirs

# What may change between invocations of one run: where it lives, when it stops, evaluates, checkpoints and
# logs, and how Ray places and restarts it, on how many workers included (the ZeRO shards are re-sharded and
# gradient accumulation recomputed for the same global batch: distune.engine.checkpoint). Every other key
# shapes the saved state or what it means.
MAY_CHANGE = ("run.output_dir", "train.stop_after_steps", "train.log_every", "eval.", "checkpoint.", "wandb.",
              "cluster.max_failures", "cluster.env", "cluster.cpus_per_worker", "cluster.use_gpu",
              "cluster.num_workers", "cluster.placement", "train.loss_chunk")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of a Ray run (`run_dir/step_N`) or a plain one (`run_dir/checkpoints/step_N`)."""
    found = checkpoint_dirs(run_dir) + checkpoint_dirs(run_dir / "checkpoints")
    return max(found, key=lambda p: int(p.name[5:]), default=None)


def step_names(store) -> list[str]:
    """The checkpoint folders (`step_N`) directly in a run directory (a RunStore), oldest first."""
    steps = [n for n in store.names() if n.startswith("step_") and n[5:].isdigit()]
    return sorted(steps, key=lambda n: int(n[5:]))


def latest_complete(store) -> str | None:
    """The newest checkpoint folder of a Ray run in `store` that every rank finished writing (a save that failed
    half-way leaves its folder without some rank's marker)."""
    from distune.storage import checkpoint_complete

    return next((n for n in reversed(step_names(store)) if checkpoint_complete(store, n)), None)


def check_resumable(cfg: RunConfig) -> None:
    """ConfigError naming the differing keys when the run directory holds a checkpoint another config wrote."""
    store = cfg.store()
    if store.remote:
        latest = latest_complete(store)
        saved_text = store.read_text("config.yaml") if latest else None
    else:
        found = latest_checkpoint(cfg.run_dir)
        latest = found.name if found else None
        saved_file = cfg.run_dir / "config.yaml"
        saved_text = saved_file.read_text() if latest and saved_file.is_file() else None
    if latest is None or saved_text is None:
        return  # nothing to resume, or nothing recorded to compare with
    try:
        saved = yaml.safe_load(saved_text)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{store}/config.yaml: unreadable ({type(e).__name__}); it records the config of the "
                          f"checkpoint {latest}") from None
    old = saved if isinstance(saved, dict) else {}
    differ = differences(old, cfg)
    if not differ:
        return
    old, new = _flat(old), _flat(dump_config(cfg))
    shown = "; ".join(f"{k} is {_short(old[k])} there, {_short(new[k])} here" for k in differ[:3])
    more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
    raise ConfigError(f"run.name: {store} holds checkpoint {latest} written by another config: {shown}"
                      f"{more}; use a new run.name, or delete {store} to start over")


def differences(saved: dict, cfg: RunConfig) -> list[str]:
    """The keys that shape the trained state and differ between a recorded config (`saved`) and `cfg`."""
    old, new = _flat(saved), _flat(dump_config(cfg))
    # A key only one side has comes from another distune version's schema: not a difference of the recipe.
    # A dtype still `auto` is resolved where the job runs (a submit's head), which checks again with the value.
    return [k for k in sorted(old.keys() & new.keys()) if old[k] != new[k] and not k.startswith(MAY_CHANGE)
            and not (k.endswith("dtype") and new[k] == "auto")]


def write_config(cfg: RunConfig, extra: dict | None = None) -> None:
    """Record the resolved config in the run directory (atomically: the old record or the new one, never half);
    `extra`: top-level keys recorded beside it (a pipeline generate stage's options)."""
    cfg.store().write_text("config.yaml", yaml.safe_dump(dump_config(cfg) | (extra or {}), sort_keys=False))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
