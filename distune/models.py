"""Load a model and its tokenizer from a hub id, a local folder, or a GGUF file.

GGUF files are dequantised once into a safetensors folder cache (transformers reads GGUF slowly,
≈20 s for 135M params; the folder reloads in <1 s), keyed by the file's path, size and mtime.
Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from distune.paths import looks_local, resolve_path

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cache_root() -> Path:
    return Path(os.environ.get("DISTUNE_CACHE", Path.home() / ".cache" / "distune"))


def resolve_model_source(path: str) -> str:
    """A loadable `from_pretrained` argument: a hub id, or an absolute folder (GGUF converted first)."""
    if not looks_local(path):
        return path  # hub id: transformers resolves (and downloads, where a network exists)
    local = resolve_path(path)
    if not local.exists():
        raise FileNotFoundError(f"model.path: {path} does not exist")
    if local.suffix == ".gguf":
        return str(convert_gguf(local))
    return str(local)


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file into a cached safetensors folder (atomic: a folder is complete or absent)."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantised fp32 now: drop the GGUF quantizer so the folder is a plain model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model_config(source: str, trust_remote_code: bool = False) -> PretrainedConfig:
    return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)


def load_tokenizer(source: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id works; eos is the convention.
        tok.pad_token = tok.eos_token
    return tok


def load_model(source: str, dtype: str = "fp32", trust_remote_code: bool = False) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    model.config.use_cache = False  # no KV cache while training
    return model
