"""The published shapes of the model families configs/recipes/ names, as config-only model folders.

The recipes name hub ids, which tests cannot download. Each entry below is the model's `config.json` as published
on the Hugging Face hub (https://huggingface.co/<hub id>/blob/main/config.json), the keys that decide its
architecture and size: `distune plan` builds the model from it on the meta device (no weights), so its parameter
count and memory estimate are the real model's. Bookkeeping keys (transformers_version, torch_dtype,
initializer_range, ...) are left out. PUBLISHED_PARAMS are the sizes the model cards state (safetensors' parameter
count on the hub page), which the meta model must reproduce.

`model_dir` writes such a folder with a small stand-in tokenizer (tests/tiny.py's BPE, ~400 tokens, a generic chat
template): enough for `distune plan` to validate a recipe whose model.path (and teacher path) point at it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

_LLAMA31_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}

SHAPES: dict[str, dict] = {
    # https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct/blob/main/config.json
    "meta-llama/Llama-3.1-8B-Instruct": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rope_scaling": _LLAMA31_ROPE, "rms_norm_eps": 1e-05, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": False, "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009]},
    # https://huggingface.co/meta-llama/Llama-3.1-70B-Instruct/blob/main/config.json
    "meta-llama/Llama-3.1-70B-Instruct": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
        "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rope_scaling": _LLAMA31_ROPE, "rms_norm_eps": 1e-05, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": False, "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009]},
    # https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct/blob/main/config.json
    "meta-llama/Llama-3.2-1B-Instruct": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rope_scaling": {**_LLAMA31_ROPE, "factor": 32.0}, "rms_norm_eps": 1e-05, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True, "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009]},
    # https://huggingface.co/Qwen/Qwen2.5-7B-Instruct/blob/main/config.json
    "Qwen/Qwen2.5-7B-Instruct": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "vocab_size": 152064, "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rope_scaling": None,
        "rms_norm_eps": 1e-06, "hidden_act": "silu", "use_sliding_window": False, "sliding_window": 131072,
        "max_window_layers": 28, "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645},
    # https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct/blob/main/config.json
    "Qwen/Qwen2.5-0.5B-Instruct": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rope_scaling": None,
        "rms_norm_eps": 1e-06, "hidden_act": "silu", "use_sliding_window": False, "sliding_window": 32768,
        "max_window_layers": 21, "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645},
    # https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.3/blob/main/config.json
    "mistralai/Mistral-7B-Instruct-v0.3": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 32768, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
        "sliding_window": None, "rms_norm_eps": 1e-05, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2},
    # https://huggingface.co/google/gemma-2-9b-it/blob/main/config.json
    "google/gemma-2-9b-it": {
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 3584,
        "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 256, "vocab_size": 256000, "max_position_embeddings": 8192, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-06, "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False, "query_pre_attn_scalar": 256, "sliding_window": 4096,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "cache_implementation": "hybrid",
        "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0},
}

# Parameter counts as the model cards / hub pages state them.
PUBLISHED_PARAMS: dict[str, float] = {
    "meta-llama/Llama-3.1-8B-Instruct": 8.03e9,
    "meta-llama/Llama-3.1-70B-Instruct": 70.6e9,
    "meta-llama/Llama-3.2-1B-Instruct": 1.24e9,
    "Qwen/Qwen2.5-7B-Instruct": 7.62e9,
    "Qwen/Qwen2.5-0.5B-Instruct": 0.49e9,
    "mistralai/Mistral-7B-Instruct-v0.3": 7.25e9,
    "google/gemma-2-9b-it": 9.24e9,
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def model_dir(hub_id: str, out: Path, tokenizer_dir: Path) -> Path:
    """A config-only folder for `hub_id`: its published config.json and the tokenizer files of `tokenizer_dir`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(SHAPES[hub_id], indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out
