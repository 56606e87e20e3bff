"""PEFT adapter folders on disk: list them, copy one out of a run, merge one into its base.

An adapter folder is what `PeftModel.from_pretrained(base, folder)` loads (adapter_config.json + weights). A run of
method `adapters` exports one per adapter under run_dir/export/<name>/ (the tokenizer once, in export/); a `lora`
run exports run_dir/export/ itself. Every folder written here is complete or absent (temp folder, then rename).
Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from distune.errors import ConfigError

CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model")


class AdapterError(ConfigError):
    """A problem with an adapter folder or argument, phrased for the user (the CLI prints it on one line)."""


def read_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG
    if not Path(folder).is_dir():
        raise AdapterError(f"{folder}: no such folder")
    if not path.is_file():
        raise AdapterError(f"{folder}: not a PEFT adapter folder (no {CONFIG})")
    return json.loads(path.read_text())


def list_adapters(root: Path) -> list[dict]:
    """Every adapter folder at or under `root`: name (path relative to root), PEFT type, base model, bytes on disk,
    parameters (read from the safetensors headers, no tensor loaded)."""
    from safetensors import safe_open

    root = Path(root)
    if not root.is_dir():
        raise AdapterError(f"{root}: no such folder")
    out = []
    for config_file in sorted(root.rglob(CONFIG)):
        folder = config_file.parent
        if any(part.startswith(".") for part in folder.relative_to(root).parts):
            continue  # temp folders of a write in progress
        config = read_config(folder)
        params = 0
        for weights in folder.glob("*.safetensors"):
            with safe_open(str(weights), framework="pt") as f:
                for key in f.keys():
                    numel = 1
                    for dim in f.get_slice(key).get_shape():
                        numel *= dim
                    params += numel
        out.append({"name": str(folder.relative_to(root)) if folder != root else folder.name,
                    "path": str(folder), "peft_type": config.get("peft_type"),
                    "base_model": config.get("base_model_name_or_path"),
                    "bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()), "params": params})
    return out


def publish(target: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a temp folder next to `target`, which is then renamed into place (refused if it exists)."""
    target = Path(target).absolute()
    if target.exists():
        raise AdapterError(f"{target} exists; remove it or choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        write(tmp)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def find_in_run(run_dir: Path, name: str) -> Path:
    """The adapter `name` of a run: run_dir/export/<name>/ (method adapters), or run_dir/export/ when it is the
    run's only adapter (method lora) and `name` is the run's folder name."""
    export = Path(run_dir) / "export"
    for candidate in (export / name, export) if name == Path(run_dir).name else (export / name,):
        if (candidate / CONFIG).is_file():
            return candidate
    found = [a["name"] for a in list_adapters(export)] if export.is_dir() else []
    raise AdapterError(f"{run_dir}: no adapter {name!r} in export/; found: {', '.join(found) or 'none'}")


def export_adapter(run_dir: Path, name: str, out: Path) -> Path:
    """Copy one adapter out of a run into `out` (with the run's tokenizer when the folder has none)."""
    source = find_in_run(run_dir, name)

    def write(tmp: Path) -> None:
        shutil.copytree(source, tmp, dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if (Path(d) / n).is_dir()])
        for file in TOKENIZER_FILES:
            shipped = source.parent / file
            if not (tmp / file).exists() and shipped.is_file():
                shutil.copy2(shipped, tmp / file)

    return publish(out, write)


def tokenizer_source(adapter: Path, base: str) -> str:
    """Where the adapter's tokenizer lives: its own folder, the run export above it, else the base model."""
    for folder in (Path(adapter), Path(adapter).parent):
        if (folder / "tokenizer_config.json").is_file():
            return str(folder)
    return base


def base_of(adapter: Path, base: str | None) -> str:
    from distune.models import resolve_model_source

    base = base or read_config(adapter).get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{adapter}: the adapter names no base model; give --base PATH")
    return resolve_model_source(base, key="--base")


def merge_adapter(adapter: Path, out: Path, base: str | None = None) -> Path:
    """Fold a LoRA-family adapter into its base: a plain `save_pretrained` model + tokenizer in `out`."""
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    read_config(adapter)  # one line naming the folder, not PEFT's ValueError, when it holds no adapter
    config = PeftConfig.from_pretrained(str(adapter))
    if config.is_prompt_learning:
        raise AdapterError(f"{adapter}: a {config.peft_type.value} adapter adds virtual tokens to the input and "
                           f"changes no weight: there is nothing to merge; serve it with `distune adapters generate`")
    if (config.task_type or "CAUSAL_LM") != "CAUSAL_LM":
        raise AdapterError(f"{adapter}: merging supports causal LM adapters, this one is {config.task_type}")
    source = base_of(adapter, base)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(adapter, source))

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return publish(out, write)
