"""Read a checkpoint's weights a slice at a time: the reader behind loading a model partitioned across ranks.

A rank that owns elements [start, stop) of a parameter's flattened tensor reads the rows that hold them from
the safetensors file (`safe_open(...).get_slice`, memory-mapped: nothing else of the file becomes private memory)
and converts only that slice to the training dtype. The reader also answers for the ways a model's parameter
names differ from the checkpoint's: a subset of decoder blocks (`model.layers`), a task head class that names
its base otherwise (`transformer.` where the checkpoint says `model.`), and a plain LoRA adapter folder, whose
update `scale * B @ A` is added to the rows being read (a merge that never needs the whole weight).
Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open

from distune.errors import ConfigError

_BLOCK = re.compile(r"(^|\.)layers\.(\d+)\.")


def checkpoint_files(folder: Path, key: str) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it (one file, or a sharded checkpoint's index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise ConfigError(f"{key}: {folder} has no safetensors weights (model.safetensors or its index); loading "
                      "partitioned reads safetensors slices. Convert the checkpoint, or set model.load: whole "
                      "(method.teacher.placement: replicated for a teacher)")


def hub_snapshot(repo_id: str) -> Path:
    """A hub model's folder with its configs and safetensors (downloaded where a network exists)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))


class LoraDelta:
    """A plain LoRA adapter folder's updates, kept as its small A and B matrices, added to weight rows on read."""

    def __init__(self, folder: Path, key: str):
        config = json.loads((folder / "adapter_config.json").read_text())
        refused = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "fan_in_fan_out")
                   if config.get(k)]
        if config.get("peft_type") != "LORA" or refused:
            what = f"peft_type {config.get('peft_type')}" if config.get("peft_type") != "LORA" else ", ".join(refused)
            raise ConfigError(f"{key}: {folder} is an adapter with {what}; a partitioned load merges plain LoRA "
                              "adapters only. Merge it first (`distune adapters merge`), or load it whole "
                              "(model.load: whole / method.teacher.placement: replicated)")
        r = config["r"]
        self.scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise ConfigError(f"{key}: {folder} has no adapter_model.safetensors")
        self.pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with safe_open(weights, framework="pt") as f:
            names = set(f.keys())
            for name in names:
                if name.endswith(".lora_A.weight"):
                    module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                    b = name.replace(".lora_A.", ".lora_B.")
                    if b not in names:
                        raise ConfigError(f"{key}: {weights} has {name} without its lora_B")
                    self.pairs[f"{module}.weight"] = (f.get_tensor(name).float(), f.get_tensor(b).float())
                elif ".lora_embedding_" in name or ".lora_magnitude_vector" in name:
                    raise ConfigError(f"{key}: {weights} holds {name}; a partitioned load merges LoRA on linear "
                                      "layers only. Load it whole (model.load: whole / method.teacher.placement: "
                                      "replicated)")

    def rows(self, weight: str, r0: int, r1: int) -> torch.Tensor | None:
        """scale * (B @ A) for output rows r0..r1 of `weight` (a checkpoint name), or None if not adapted."""
        pair = self.pairs.get(weight)
        if pair is None:
            return None
        a, b = pair
        return (b[r0:r1] @ a) * self.scale


class WeightReader:
    """Slices of a safetensors checkpoint, addressed by the *model's* parameter names.

    `layer_map`: model block index -> checkpoint block index (a student made of some of the blocks).
    `adapter`: a LoRA adapter folder whose update is merged into the weights it adapts."""

    def __init__(self, folder: Path, key: str, layer_map: list[int] | None = None, adapter: Path | None = None):
        self.folder, self.key, self.layer_map = folder, key, layer_map
        self.files = checkpoint_files(folder, key)
        self.lora = LoraDelta(adapter, key) if adapter is not None else None
        self._open: dict[Path, object] = {}

    def _file(self, path: Path):
        if path not in self._open:
            self._open[path] = safe_open(path, framework="pt")
        return self._open[path]

    def close(self) -> None:
        self._open.clear()

    def locate(self, name: str, base_prefix: str) -> str | None:
        """The checkpoint's name for model parameter `name`, or None if the checkpoint lacks it (a new head)."""
        if self.layer_map is not None:
            name = _BLOCK.sub(lambda m: f"{m.group(1)}layers.{self.layer_map[int(m.group(2))]}.", name, count=1)
        candidates = [name]
        if base_prefix and name.startswith(f"{base_prefix}."):
            rest = name[len(base_prefix) + 1:]
            candidates += [f"model.{rest}", rest]  # a causal LM checkpoint's base / a bare base checkpoint
        return next((c for c in candidates if c in self.files), None)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file(self.files[key]).get_slice(key).get_shape())

    def read_flat(self, key: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor `key`, in `dtype`: only the rows holding them are read."""
        piece = self._file(self.files[key]).get_slice(key)
        shape = piece.get_shape()
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        r0, r1 = start // row, -(-stop // row)
        rows = piece[r0:r1] if shape else piece[:]
        rows = rows.to(dtype)
        delta = self.lora.rows(key, r0, r1) if self.lora is not None else None
        if delta is not None:
            rows.add_(delta)  # as PEFT's merge: the fp32 update added to the weight in its own dtype
        return rows.reshape(-1)[start - r0 * row: stop - r0 * row]
