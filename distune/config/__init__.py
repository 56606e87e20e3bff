"""The run config: YAML -> typed pydantic models, strict.

Owns: the schema of every YAML key, `a.b.c=value` overrides, and error messages that name the key path
(and, for unknown keys, the closest valid one). Checks that need the filesystem or the model live in
`validate.py`. Imports neither ray nor deepspeed.

    strict.py      Strict, the base of every section
    run.py         run:                    model.py     model:
    data.py        data: (design, tasks)   train.py     train:, eval:, checkpoint:
    deepspeed.py   deepspeed:              cluster.py   cluster:
    wandb.py       wandb:                  method.py    method: (the plugin validates the rest)
    run_config.py  RunConfig: the sections together, cross-section checks, run locations
    loading.py     load_config: YAML, base: includes, overrides, hardware `auto`s; dump_config

Import from `distune.config` (this file re-exports every public name). Its errors (ConfigError, describe_error,
closest_key) live in `distune.errors`, which imports nothing of distune: the plugins phrase their errors there
without importing the config.
"""

from distune.errors import ConfigError, closest_key, describe_error
from distune.config.strict import Strict
from distune.config.run import RunSection
from distune.config.model import ModelSection
from distune.config.data import GLOBAL_DATA_KEYS, DataSection, DesignSection, TaskSection
from distune.config.train import CheckpointSection, EvalSection, TrainSection
from distune.config.deepspeed import DeepSpeedSection
from distune.config.cluster import ClusterSection, looks_secret
from distune.config.wandb import WandbSection
from distune.config.method import MethodSection
from distune.config.run_config import RunConfig
from distune.config.loading import (CPU_WORKERS, UniqueKeyLoader, apply_overrides, dump_config, fit_workers,
                                    load_config, merge, read_yaml, resolve_for_hardware, with_bases)

__all__ = [
    "CPU_WORKERS", "GLOBAL_DATA_KEYS", "CheckpointSection", "ClusterSection", "ConfigError", "DataSection",
    "DeepSpeedSection", "DesignSection", "EvalSection", "MethodSection", "ModelSection", "RunConfig", "RunSection",
    "Strict", "TaskSection", "TrainSection", "UniqueKeyLoader", "WandbSection", "apply_overrides", "closest_key",
    "describe_error", "dump_config", "fit_workers", "load_config", "looks_secret", "merge", "read_yaml",
    "resolve_for_hardware", "with_bases",
]
