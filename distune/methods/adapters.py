"""`adapters`: N PEFT adapters on one base model in one job, one per data task, each with its own optimizer
state, learning rate and schedule; each exported as its own PEFT adapter folder.

The base is loaded once per rank. Every adapter is built by its own method plugin (`lora`, or any method with
a `peft_config(model)` hook), so the adapters of one run share a PEFT type (PEFT keeps one type per
PeftModel). The runner trains one stream per adapter (`streams`): each step, every adapter whose `max_steps`
is not reached gets one round of gradient-accumulation micro-batches from its own task with itself active.
Adapters own disjoint parameters and optimizer groups, so with `train.grad_clip: null` (and dropout 0) the
job equals N separate runs; global-norm clipping couples them (one norm over all adapters' gradients).
Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import re
from pathlib import Path

from peft import get_peft_model
import torch
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
from pydantic import Field, field_validator
from torch import nn

from distune.methods.base import (Method, MethodConfig, RunSettings, Stream, build_method, nested_method,
                                  register_method)
from distune.tasks import LossOutput


class AdapterOptions(MethodConfig):
    name: str = Field(..., description="Adapter name (a plain word, unique): its export folder export/<name>/ and "
                                       "the prefix of its metrics (<name>/train/loss, <name>/eval/loss).")
    task: str = Field(..., description="The data.tasks entry this adapter trains and is evaluated on.")
    method: dict = Field(default_factory=lambda: {"name": "lora"},
                         description="The adapter's own method and keys, e.g. {name: lora, r: 8}; any method with "
                                     "a peft_config(model) hook. All adapters of a run share one PEFT type.")
    lr: float | None = Field(None, gt=0, description="This adapter's learning rate (default train.lr).")
    warmup_steps: int | None = Field(None, ge=0, description="Its linear warmup (default train.warmup_steps).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps it trains; after them its weights stop "
                                  "changing (default train.max_steps, else train.epochs over the largest task).")
    min_lr_ratio: float | None = Field(None, ge=0, le=1, description="Its cosine floor (default train.min_lr_ratio).")

    @field_validator("name")
    @classmethod
    def _plain_word(cls, v: str) -> str:
        # PEFT names module keys after adapters and saves "default" at the folder's top level: keep names apart.
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", v) or v == "default":
            raise ValueError("must be a plain word starting with a letter (letters, digits, '_' or '-'), "
                             "not 'default'")
        return v


class AdaptersOptions(MethodConfig):
    adapters: list[dict] = Field(..., description="The adapters: [{name, task, method, lr, warmup_steps, max_steps, "
                                                  "min_lr_ratio}, ...]; see docs/adapters.md.")

    @field_validator("adapters")
    @classmethod
    def _entries(cls, v: list[dict]) -> list[dict]:
        # Validated entry by entry so that every message names method.adapters.<i>.<key>.
        from pydantic import ValidationError

        from distune.errors import describe_error

        if not v:
            raise ValueError("method.adapters: give at least one adapter")
        out, seen = [], {}
        for i, raw in enumerate(v):
            at = ("method", "adapters", str(i))
            if not isinstance(raw, dict):
                raise ValueError(f"method.adapters.{i}: must be a mapping with name, task and method")
            try:
                entry = AdapterOptions.model_validate(raw)
            except ValidationError as e:
                raise ValueError(describe_error(e, AdapterOptions, prefix=at)) from None
            if entry.name in seen:
                raise ValueError(f"method.adapters.{i}.name: {entry.name!r} is already "
                                 f"method.adapters.{seen[entry.name]}'s name")
            seen[entry.name] = i
            plugin, options = nested_method(entry.method, (*at, "method"), "lora")
            if plugin.peft_config is Method.peft_config:
                raise ValueError(f"method.adapters.{i}.method.name: {plugin.name!r} is not an adapter method (it has "
                                 f"no peft_config(model) hook); use lora or another PEFT method")
            out.append({**entry.model_dump(exclude_unset=True), "method": {"name": plugin.name, **options.model_dump()}})
        return out


@register_method("adapters")
class Adapters(Method):
    Config = AdaptersOptions

    def __init__(self, config: AdaptersOptions, settings: RunSettings | None = None, key: str = "method"):
        super().__init__(config, settings, key)
        self.entries = [AdapterOptions.model_validate(a) for a in config.adapters]
        self.methods = {a.name: build_method(a.method["name"], {k: x for k, x in a.method.items() if k != "name"},
                                             self.settings, f"{key}.adapters.{i}.method")
                        for i, a in enumerate(self.entries)}
        self.supports_packing = all(m.supports_packing for m in self.methods.values())
        self.params: dict[str, list[str]] = {}  # adapter -> its parameter names (set by adapt)
        self.active: str = self.entries[0].name

    def streams(self) -> list[Stream]:
        return [Stream(a.name, a.task, a.max_steps, f"method.adapters.{i}") for i, a in enumerate(self.entries)]

    def peft_configs(self, model: nn.Module) -> list:
        configs = [self.methods[a.name].peft_config(model) for a in self.entries]
        first = configs[0].peft_type
        for i, c in enumerate(configs):
            if c.peft_type != first:
                raise ValueError(f"method.adapters.{i}.method: a {c.peft_type.value} adapter next to "
                                 f"method.adapters.0's {first.value}: one run trains one PEFT type (PEFT keeps one "
                                 f"type per model); run the other type as its own job")
        if configs[0].is_prompt_learning:
            # Their export must run the prompt encoder from gathered weights (prompt_learning.export_prompts), which
            # this method's per-adapter save does not do: refused rather than a wrong export under ZeRO-3.
            raise ValueError(f"method.adapters.0.method: {first.value} adapters train one per job; use "
                             f"method.name: {self.entries[0].method['name']} per task, or lora / ia3 adapters here")
        prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(first, "")
        for i, a in enumerate(self.entries):
            if prefix and a.name in prefix:
                # PEFT finds an adapter's keys by this prefix: a name inside it would be confused with it on load.
                raise ValueError(f"method.adapters.{i}.name: {a.name!r} is part of PEFT's key prefix {prefix!r}; "
                                 f"choose another name")
        return configs

    def check_model(self, model: nn.Module) -> None:
        self.peft_configs(model)
        for method in self.methods.values():
            method.check_model(model)

    def adapt(self, model: nn.Module) -> nn.Module:
        configs = self.peft_configs(model)
        names = [a.name for a in self.entries]
        # Every adapter draws its initial weights from the RNG state a lone run of it would see here, so N
        # adapters in one job start exactly where N separate runs start.
        rng = torch.get_rng_state()
        model = get_peft_model(model, configs[0], adapter_name=names[0])  # freezes the base
        owned = {names[0]: [n for n, p in model.named_parameters() if p.requires_grad]}
        for name, cfg in zip(names[1:], configs[1:]):
            seen = {n for n, _ in model.named_parameters()}
            torch.set_rng_state(rng)
            model.add_adapter(name, cfg)
            owned[name] = [n for n, _ in model.named_parameters() if n not in seen]
        empty = [n for n, ps in owned.items() if not ps]
        if empty:
            raise ValueError(f"method.adapters: adapter {empty[0]!r} added no parameters")
        self.params = owned
        self.activate(model, names[0])
        return model

    def activate(self, model: nn.Module, stream: str) -> None:
        # PEFT's set_adapter freezes the other adapters; DeepSpeed built its optimizer (and ZeRO its gradient
        # hooks) over all of them, so every adapter keeps requires_grad=True. An inactive adapter is simply not
        # in the forward, so it gets no gradient.
        model.set_adapter(stream)
        trainable = {p for ps in self.params.values() for p in ps}
        for pname, p in model.named_parameters():
            if pname in trainable:
                p.requires_grad_(True)
        self.active = stream

    def optimizer_groups(self, model: nn.Module) -> list[dict]:
        named = dict(model.named_parameters())
        groups = []
        for a in self.entries:
            group = {"name": a.name, "params": [named[p] for p in self.params[a.name]]}
            group |= {k: getattr(a, k) for k in ("lr", "warmup_steps", "min_lr_ratio") if getattr(a, k) is not None}
            if a.max_steps is not None:
                group["total_steps"] = a.max_steps
            groups.append(group)
        return groups

    def loss(self, model, batch, frozen) -> LossOutput:
        return self.methods[self.active].loss(model, batch, frozen)

    def export_keys(self, model: nn.Module) -> set[str]:
        return {p for ps in self.params.values() for p in ps}

    def export(self, model, state_dict, out_dir: Path) -> None:
        # PEFT writes an adapter not named "default" into out_dir/<name>/, keys stripped of the name: a folder
        # PeftModel.from_pretrained(base, out_dir/<name>) loads.
        for a in self.entries:
            model.save_pretrained(out_dir, selected_adapters=[a.name], state_dict=state_dict, safe_serialization=True)
