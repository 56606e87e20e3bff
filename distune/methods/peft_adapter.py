"""What every PEFT method shares (the defaults of `Method` for a method with a `peft_config`): wrap the model with
the method's PEFT config, check its target modules, train what PEFT left trainable, export the adapter folder that
`PeftModel.from_pretrained` loads."""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path

from peft import PeftConfig, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn


def wrap(model: nn.Module, config: PeftConfig) -> nn.Module:
    return get_peft_model(model, config)  # freezes the base; the adapter requires grad


def trained_keys(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model, state_dict: dict, out_dir: Path) -> None:
    # state_dict holds the gathered adapter tensors: saving from it (not from the possibly ZeRO-3
    # partitioned module) is what makes the "empty adapter" bug impossible.
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)


def check_targets(config: PeftConfig, model: nn.Module, key: str) -> None:
    """Each entry of the config's target_modules matches a module of `model` by PEFT's own rule (a list entry: a
    module name or its last dotted parts; a string: a regex over the whole name); ValueError naming `key` otherwise.
    PEFT fails on the workers only when nothing matches, and drops an entry that matches nothing without a word:
    a typo would quietly train fewer modules."""
    targets = getattr(config, "target_modules", None)
    if targets is None or (isinstance(targets, str) and targets.lower() == "all-linear"):
        return  # PEFT's default for the architecture, or every linear layer: PEFT finds those itself
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise ValueError(f"{key}: {targets!r} is not a valid regular expression ({e})") from None
    names = [name for name, _ in model.named_modules() if name]
    entries = [targets] if isinstance(targets, str) else sorted(targets)
    missed = [e for e in entries if not _matches(config, e, names)]
    if not missed:
        return
    suffixes = linear_suffixes(model)
    if isinstance(targets, str):
        what = f"{targets!r} matches no module of the model (a string is a regex over a module's whole name"
        hint = f": write a list, [{targets}])" if targets in suffixes else ")"
    else:
        what = f"{', '.join(map(repr, missed))} match{'es' if len(missed) == 1 else ''} no module of the model"
        close = [c for m in missed for c in difflib.get_close_matches(m, suffixes, n=1)]
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    raise ValueError(f"{key}: {what}{hint}; its linear layers end in: {', '.join(suffixes)}; or use all-linear")


def _matches(config: PeftConfig, entry: str, names: list[str]) -> bool:
    one = copy.copy(config)  # the entry alone, with the config's exclusions (a task head is never a target)
    one.target_modules = entry if isinstance(config.target_modules, str) else {entry}
    return any(check_target_module_exists(one, name) for name in names)


def linear_suffixes(model: nn.Module, limit: int = 12) -> list[str]:
    """The last name parts of the model's linear layers (GPT-2's Conv1D included), output head left out: what a
    target_modules list usually names."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if m is not head and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")}
    return sorted(found)[:limit]
