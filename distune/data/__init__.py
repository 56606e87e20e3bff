"""Data: read -> template -> tokenize + loss mask -> shard/batch. Imports neither ray nor deepspeed."""

from distune.data.dataset import Splits, load_splits
from distune.data.loader import ShardedBatches, collate, eval_shard, input_positions, model_inputs, pack, pack_groups
from distune.data.render import IGNORE, Renderer, Sample
from distune.data.sources import DataError, read_rows

__all__ = ["DataError", "IGNORE", "Renderer", "Sample", "ShardedBatches", "Splits", "collate", "eval_shard", "input_positions", "model_inputs", "pack", "pack_groups",
           "load_splits", "read_rows"]
