"""Data: read -> template -> tokenize + loss mask -> shard/batch. Imports neither ray nor deepspeed."""

from distune.data.dataset import Splits, load_splits
from distune.data.loader import ShardedBatches, eval_shard, pack, pack_groups
from distune.data.render import Renderer
from distune.data.sources import DataError, read_rows
from distune.tasks import collate, model_inputs
from distune.tasks.base import IGNORE
from distune.tasks.causal_lm import Sample

__all__ = ["DataError", "IGNORE", "Renderer", "Sample", "ShardedBatches", "Splits", "collate", "eval_shard", "model_inputs", "pack", "pack_groups",
           "load_splits", "read_rows"]
