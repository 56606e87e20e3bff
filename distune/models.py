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
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from distune.errors import ConfigError
from distune.paths import cache_root, looks_local, resolve_path
from distune.weights import WeightReader, hub_snapshot

# PEFT warns on every generate() step of a prompt-learning adapter; it drops position ids by design there.
warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient tuning")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_model_source(path: str, key: str = "model.path") -> str:
    """A loadable `from_pretrained` argument: a hub id, or an absolute folder (GGUF converted first)."""
    if not looks_local(path):
        return path  # hub id: transformers resolves (and downloads, where a network exists)
    local = resolve_path(path)
    if not local.exists():
        raise FileNotFoundError(f"{key}: {path} does not exist")
    if local.suffix == ".gguf":
        return str(convert_gguf(local))
    return str(local)


def source_on_this_node(path: str, prepared: str | None, key: str = "model.path") -> str:
    """What this node loads for `path`: the source the driver prepared (`prepared`: a hub id, a folder, a GGUF
    converted into the driver's cache) when this node can read it; otherwise `path` prepared here (a GGUF converted
    into this node's cache; a hub id downloaded by this node). Shared-nothing nodes need only `path` itself."""
    if prepared and (not looks_local(prepared) or Path(prepared).exists()):
        return prepared
    import socket

    try:
        return resolve_model_source(path, key)
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} is not on node {socket.gethostname()}: every node must see it at that path "
                          f"(a shared filesystem, the container image, or a hub id each node downloads)") from None


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
    if is_adapter_folder(source):  # the architecture is the base model's
        import json

        source = json.loads((Path(source) / "adapter_config.json").read_text())["base_model_name_or_path"]
    return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)


def load_tokenizer(source: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id works; eos is the convention.
        tok.pad_token = tok.eos_token
    return tok


def is_adapter_folder(source: str) -> bool:
    return (Path(source) / "adapter_config.json").is_file()


def load_model(source: str, dtype: str = "fp32", trust_remote_code: bool = False,
               layers: int | list[int] | None = None, labels: list[str] | None = None,
               pad_token_id: int | None = None, task: str | None = None, quantization: str | None = None,
               attn_implementation: str | None = None, device_map: str | None = None) -> torch.nn.Module:
    """A causal LM, or a model with a fresh task head (`task`; `labels` alone means sequence classification):
    a classifier over `labels` (sequence or token classification), or an extractive QA head. A PEFT adapter
    folder loads its base and merges the adapter in (e.g. a fine-tuned teacher exported by a `lora` run).
    `layers` keeps a subset of the decoder blocks (see `keep_layers`); `attn_implementation` picks the attention
    kernel (None: the model's default). `device_map` ("auto"): spread over every visible GPU, a layer range each
    (a frozen teacher too big for one device)."""
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if device_map is not None:
        attn["device_map"] = device_map
    head = _task(task, labels)
    if head.head is not None:
        model = _load_head(head.head_class(), source, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                           **head.head_options(labels), **attn)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = pad_token_id  # decoders read the last non-pad token's state
    elif is_adapter_folder(source):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype],
                                                         trust_remote_code=trust_remote_code, **attn)
        # A prompt-learning adapter (prompt / p-tuning / prefix) has nothing to merge: it stays a PeftModel.
        model = align_virtual_tokens(model) if model.active_peft_config.is_prompt_learning else model.merge_and_unload()
    elif quantization:
        model = _load_quantized(source, dtype, trust_remote_code, quantization)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                     **attn)
    if layers is not None:
        keep_layers(model, layers)
    model.config.use_cache = False  # no KV cache while training
    return model


# model.task -> the transformers auto class of its head.
def head_class(task: str):
    """The transformers Auto class a task's model loads with."""
    from distune.tasks import get_task

    return get_task(task).head_class()


def _task(task: str | None, labels: list[str] | None):
    """The task a model is built for: `task`, else a classifier when `labels` are given, else a causal LM."""
    from distune.tasks import get_task

    return get_task(task or ("sequence_classification" if labels is not None else "causal_lm"))


def _load_head(auto, source: str, **kwargs) -> torch.nn.Module:
    """`auto.from_pretrained`, with the base weights found under a causal LM checkpoint's name for them:
    transformers' LlamaForQuestionAnswering names its base `transformer` where LlamaForCausalLM (and so every
    Llama checkpoint) says `model`, so a plain load would leave the whole base randomly initialised."""
    rng = torch.get_rng_state()
    model, info = auto.from_pretrained(source, output_loading_info=True, **kwargs)
    prefix = model.base_model_prefix
    if any(k.startswith(f"{prefix}.") for k in info["missing_keys"]) and any(
            k.startswith("model.") for k in info["unexpected_keys"]):
        torch.set_rng_state(rng)  # the new head initialised as by one load (a partitioned load gives the same)
        model = auto.from_pretrained(source, key_mapping={r"^model\.": f"{prefix}."}, **kwargs)
        # transformers reverses a load's key mapping when saving; forget it, so that an export keeps the head
        # class's own names, which a plain AutoModelFor*.from_pretrained loads back.
        model._weight_conversions = []
    return model


def _load_quantized(source: str, dtype: str, trust_remote_code: bool, bits: str) -> torch.nn.Module:
    """QLoRA's base: bitsandbytes 4-bit NF4 (double-quantised, computing in `dtype`) or 8-bit, on this rank's
    GPU, prepared for training adapters on top (norms in fp32, input grads for checkpointing)."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise RuntimeError(f"model.quantization: {bits} needs a CUDA GPU (bitsandbytes)")
    compute = DTYPES[dtype] if dtype != "fp32" else torch.bfloat16
    quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute) if bits == "4bit"
             else BitsAndBytesConfig(load_in_8bit=True))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=compute, quantization_config=quant,
                                                 device_map={"": torch.cuda.current_device()},
                                                 trust_remote_code=trust_remote_code)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def align_virtual_tokens(model: torch.nn.Module) -> torch.nn.Module:
    """Make a prompt-learning PeftModel's outputs line up with its inputs again.

    Prompt tuning and P-tuning prepend `num_virtual_tokens` positions, so logits, hidden states and QA span
    logits come back that much longer than input_ids. Everything downstream (losses, teachers, eval) indexes
    positions of the *input*: a forward hook cuts the virtual positions off once, here. Prefix tuning adds
    keys/values only (outputs already line up) and generation does not go through this forward. Idempotent."""
    if getattr(model, "_distune_aligned", False):
        return model

    def cut(module, args, kwargs, output):
        config = module.active_peft_config  # read per call: several adapters on one base may differ
        n = config.num_virtual_tokens if config.is_prompt_learning else 0
        ids = kwargs.get("input_ids", args[0] if args else None)
        length = (ids if ids is not None else kwargs["inputs_embeds"]).shape[1]
        if config.peft_type.value not in ("PROMPT_TUNING", "P_TUNING") or not hasattr(output, "keys"):
            return output
        for key in ("logits", "start_logits", "end_logits"):
            value = output.get(key)
            # Sequence-classification logits are [batch, classes]: only position-indexed outputs are cut.
            if value is not None and (key != "logits" or value.dim() == 3) and value.shape[1] == length + n:
                output[key] = value[:, n:]
        if output.get("hidden_states") is not None:
            output["hidden_states"] = tuple(h[:, n:] for h in output["hidden_states"])
        return output

    model._distune_aligned = model.register_forward_hook(cut, with_kwargs=True)  # the handle: .remove() undoes it
    return model


def layer_indices(layers: int | list[int], total: int) -> list[int]:
    """`k` -> every k-th block starting at 0 (0, k, 2k, ...); a list is taken as given (checked)."""
    picked = list(range(0, total, layers)) if isinstance(layers, int) else list(layers)
    if not picked or any(not 0 <= i < total for i in picked) or sorted(set(picked)) != picked:
        raise ValueError(f"model.layers: {layers!r} must pick increasing block indices within 0..{total - 1}")
    return picked


def keep_layers(model: torch.nn.Module, layers: int | list[int]) -> None:
    """Keep only the chosen decoder blocks, weights included: a student initialised from a subset of
    the teacher's layers (DistilBERT's recipe; every 5th of SmolLM2's 30 blocks gives a 49.5M model)."""
    blocks = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise ValueError(f"model.layers: {type(model).__name__} has no model.layers block list to subset")
    picked = layer_indices(layers, len(blocks))
    model.model.layers = torch.nn.ModuleList(blocks[i] for i in picked)
    for new_index, block in enumerate(model.model.layers):
        attn = getattr(block, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index  # KV-cache slot during generation
    cfg = model.config
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in picked]
    cfg.num_hidden_layers = len(picked)


def meta_model(config: PretrainedConfig, trust_remote_code: bool = False, task: str = "causal_lm",
               layers: int | list[int] | None = None) -> torch.nn.Module:
    """The architecture on the meta device: shapes only, no weights read (a 70B model costs nothing)."""
    auto = head_class(task)
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    if layers is not None:
        keep_layers(model, layers)
    return model


@dataclass
class Blueprint:
    """What loading a model partitioned needs, without reading a weight: how to build the architecture (called by
    distune.engine inside ZeRO-3's partitioning context), where each parameter's weights lie, and how to
    initialise the parameters the checkpoint lacks (a new task head) the way a whole load does."""

    build: Callable[[], torch.nn.Module]
    reader: WeightReader
    key: str  # the config key the model came from, for errors

    def locate(self, model: torch.nn.Module) -> tuple[dict[str, str], list[str]]:
        """(model parameter -> checkpoint name, parameters the checkpoint lacks). Every base parameter must be
        found with its shape (a head of the model's own may be missing: it is initialised)."""
        prefix = getattr(model, "base_model_prefix", "")
        found, missing = {}, []
        for name, param in model.named_parameters():
            key = self.reader.locate(name, prefix)
            if key is None:
                if prefix and name.startswith(f"{prefix}."):
                    raise ConfigError(f"{self.key}: the checkpoint has no weight for {name} (this architecture's "
                                      "weights are renamed or converted on load); load it whole (model.load: whole)")
                missing.append(name)
                continue
            shape = tuple(getattr(param, "ds_shape", param.shape))
            if self.reader.shape(key) != shape:
                raise ConfigError(f"{self.key}: {key} is {self.reader.shape(key)} in the checkpoint but {shape} "
                                  "in the model")
            found[name] = key
        return found, missing

    def check(self) -> None:
        """Raise ConfigError if this checkpoint cannot be loaded partitioned (built on the meta device: no weights)."""
        with torch.device("meta"):
            model = self.build()
        self.locate(model)


def blueprint(source: str, dtype: str = "fp32", trust_remote_code: bool = False,
              layers: int | list[int] | None = None, labels: list[str] | None = None,
              pad_token_id: int | None = None, task: str | None = None, attn_implementation: str | None = None,
              key: str = "model.path") -> Blueprint:
    """The partitioned counterpart of `load_model` (same arguments; no quantization): the same model, built
    empty, its weights read slice by slice by whoever owns them. A LoRA adapter folder is merged on read."""
    import json

    head = _task(task, labels)
    adapter = None
    base = source
    if is_adapter_folder(source):
        if head.head is not None:
            raise ConfigError(f"{key}: a {head.name} model cannot load from an adapter folder")
        adapter = Path(source)
        base = resolve_model_source(json.loads((adapter / "adapter_config.json").read_text())[
            "base_model_name_or_path"], key=key)
    folder = Path(base) if Path(base).is_dir() else hub_snapshot(base)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    picked = None
    if layers is not None:
        picked = layer_indices(layers, config.num_hidden_layers)
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [config.layer_types[i] for i in picked]
        config.num_hidden_layers = len(picked)
    for name, value in head.head_options(labels).items():
        setattr(config, name, value)
    reader = WeightReader(folder, key, picked, adapter)
    auto = head.head_class()
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}

    def build() -> torch.nn.Module:
        model = auto.from_config(config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **attn)
        model.tie_weights()  # weight init, which ties, was switched off
        if head.head is not None and model.config.pad_token_id is None:
            model.config.pad_token_id = pad_token_id
        model.config.use_cache = False
        return model

    return Blueprint(build, reader, key)


def partitioned_blueprint(source: str, strict: bool, **kwargs) -> tuple[Blueprint | None, str | None]:
    """(blueprint, None) when `source` can be loaded partitioned; else (None, why) — or ConfigError when `strict`
    (partitioned was asked for by name). Checked on the meta device: no weight is read."""
    try:
        plan = blueprint(source, **kwargs)
        plan.check()
        return plan, None
    except ConfigError as e:
        if strict:
            raise
        return None, str(e)


def init_missing(model: torch.nn.Module, names: list[str]) -> None:
    """Initialise the parameters `names` (whole, e.g. gathered) as transformers does those a checkpoint lacks:
    `_init_weights` on each module that owns one, in module order, from the caller's random state."""
    owners = {name.rpartition(".")[0] for name in names}
    for module_name, module in model.named_modules():
        if module_name in owners:
            model._init_weights(module)
