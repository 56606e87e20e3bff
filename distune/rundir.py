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


def check_resumable(cfg: RunConfig) -> None:
    """ConfigError naming the differing keys when the run directory holds a checkpoint another config wrote."""
    saved_file = cfg.run_dir / "config.yaml"
    latest = latest_checkpoint(cfg.run_dir)
    if latest is None or not saved_file.is_file():
        return  # nothing to resume, or nothing recorded to compare with
    try:
        saved = yaml.safe_load(saved_file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{saved_file}: unreadable ({type(e).__name__}); it records the config of the "
                          f"checkpoint {latest}") from None
    old, new = _flat(saved if isinstance(saved, dict) else {}), _flat(dump_config(cfg))
    # A key only one side has comes from another distune version's schema: not a difference of the recipe.
    differ = [k for k in sorted(old.keys() & new.keys()) if old[k] != new[k] and not k.startswith(MAY_CHANGE)]
    if not differ:
        return
    shown = "; ".join(f"{k} is {_short(old[k])} there, {_short(new[k])} here" for k in differ[:3])
    more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
    raise ConfigError(f"run.name: {cfg.run_dir} holds checkpoint {latest.name} written by another config: {shown}"
                      f"{more}; use a new run.name, or delete {cfg.run_dir} to start over")


def write_config(cfg: RunConfig) -> None:
    """Record the resolved config in the run directory (atomically: the old record or the new one, never half)."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = cfg.run_dir / ".config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(dump_config(cfg), sort_keys=False))
    tmp.replace(cfg.run_dir / "config.yaml")


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
