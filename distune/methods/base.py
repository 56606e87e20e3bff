"""The method plugin interface and its registry.

A method decides *what trains* and *what loss* is minimised. It sees `nn.Module`s and batches only:
it must not import ray, deepspeed, or anything in distune.cluster / distune.engine.
Third-party methods register through the entry-point group `distune.methods`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from distune.registry import Registry
from distune.tasks import LossOutput, get_task

ENTRY_POINT_GROUP = "distune.methods"


class MethodConfig(BaseModel):
    """Base for a plugin's own YAML keys (the `method:` section minus `name`)."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Stream:
    """One stream of training micro-batches of a multi-stream method (see `Method.streams`)."""

    name: str  # what `activate` receives, and the prefix of this stream's metrics
    task: str  # the data.tasks entry it reads (train and eval split)
    max_steps: int | None = None  # optimizer steps it trains (None: the run's default)
    key: str = ""  # its config path, for error messages (e.g. method.adapters.0)


@dataclass
class RunSettings:
    """What a method takes from the run besides its own keys, fixed at construction."""

    seed: int = 0  # run.seed (for methods that draw random numbers)
    loss_chunk: int | None = None  # train.loss_chunk (distune.logits)
    task: str = "causal_lm"  # model.task: the task whose batches the default objective scores

    @classmethod
    def of(cls, cfg) -> RunSettings:
        return cls(cfg.run.seed, cfg.train.loss_chunk, cfg.model.task)


class Method:
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    name: ClassVar[str] = ""
    # False where the method cannot keep packed samples apart (prompt learning prepends virtual tokens, and
    # PEFT drops the position ids that packing relies on): validation refuses data.packing then.
    supports_packing: ClassVar[bool] = True
    # False where the method trains the base weights themselves, which a quantised (QLoRA) base cannot.
    quantizable: ClassVar[bool] = True

    def __init__(self, config: MethodConfig, settings: RunSettings | None = None, key: str = "method"):
        self.config = config
        self.settings = settings or RunSettings()
        self.task = get_task(self.settings.task)
        self.key = key  # its config path, for error messages (a nested method's is e.g. method.student)

    def check(self, cfg) -> None:
        """Raise ValueError naming the key for a run configuration this method cannot train (called by validation
        before any worker starts). By default: data.packing needs `supports_packing`."""
        if cfg.data.packing and not self.supports_packing:
            raise ValueError(f"data.packing: method {self.name!r} prepends virtual tokens and cannot keep packed "
                             f"samples apart; set it false")

    @classmethod
    def resolve_dtypes(cls, options: dict, resolved) -> dict:
        """`options` (its YAML keys) with every dtype of its own that says `auto` set to `resolved()` (the dtype the
        workers' hardware computes natively), once when the config loads. None of its own by default."""
        return options

    def peft_config(self, model: nn.Module):
        """A PEFT method's adapter: the PEFT config it adds to `model` (also what adds it as one adapter of several).
        A method that has one gets `adapt`, `check_model`, `export_keys` and `export` for it by default
        (distune.methods.peft_adapter). None: not a PEFT method."""
        return None

    def is_peft(self) -> bool:
        return type(self).peft_config is not Method.peft_config

    def adapt(self, model: nn.Module) -> nn.Module:
        """Add adapters/heads and set requires_grad: the one source of truth for what trains. By default a PEFT
        method's adapter on the frozen base."""
        from distune.methods import peft_adapter

        if not self.is_peft():
            raise NotImplementedError(f"method {self.name!r} defines neither adapt nor peft_config")
        return peft_adapter.wrap(model, self.peft_config(model))

    def frozen_models(self) -> dict[str, object]:
        """Extra frozen models the runner must build and shard (e.g. {"teacher": TeacherSpec}). None by default."""
        return {}

    def see_frozen_configs(self, configs: dict[str, object]) -> None:
        """Called before `adapt` with the frozen models' HF configs (e.g. a teacher's width). No-op by default."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], frozen: dict[str, nn.Module]) -> LossOutput:
        """The default objective: the loss of the batch's task (distune.tasks), e.g. token-level cross-entropy on
        the trained positions of a causal LM, or a head's own loss."""
        task = getattr(batch, "task", self.task)  # a collated Batch names its task; a plain dict is the run's
        return task.loss(model, batch, self.settings.loss_chunk)

    def optimizer_groups(self, model: nn.Module) -> list[dict] | None:
        """Parameter groups for the optimizer (None: every trainable parameter in one group at train.lr).
        Each is a dict with `params` and optional `name`, `lr` (absolute), `lr_scale` (x the group's lr),
        `warmup_steps`, `total_steps`, `min_lr_ratio` (a schedule of the group's own: lr is 0 after it ends).
        Only parameters with requires_grad are used."""
        return None

    def streams(self) -> list[Stream] | None:
        """None (the default): one stream of micro-batches over the whole training set. A list: each optimizer step
        runs one round of gradient-accumulation micro-batches per stream whose `max_steps` is not reached, each from
        its own task, after `activate(model, stream.name)` (e.g. one adapter per task on a shared base)."""
        return None

    def activate(self, model: nn.Module, stream: str) -> None:
        """Called before a stream's micro-batches and its evaluation. No-op by default."""

    def check_model(self, model: nn.Module) -> None:
        """Called by validation with the model built on the meta device (shapes, no weights): raise ValueError
        naming the key for a config that cannot work with it. By default a PEFT method's target modules must
        exist (PEFT's own matching rule)."""
        if self.is_peft():
            from distune.methods.peft_adapter import check_targets

            check_targets(self.peft_config(model), model, f"{self.key}.target_modules")

    def meta_counts(self, model: nn.Module) -> tuple[int, int] | None:
        """(trainable, frozen) parameter counts of this method on `model` without adapting it, for `distune plan`
        where `adapt` cannot run on the meta device. None (the default): no formula."""
        return None

    def export_keys(self, model: nn.Module) -> set[str] | None:
        """Names of the parameters the export needs (None: all of them). Under ZeRO-3 only these are gathered. By
        default a PEFT method's trained parameters."""
        if self.is_peft():
            from distune.methods.peft_adapter import trained_keys

            return trained_keys(model)
        return None

    def export(self, model: nn.Module, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        """Write a Hugging Face native artifact from a full (gathered, CPU) state dict. Rank 0 only. By default a
        PEFT method's adapter folder."""
        from distune.methods.peft_adapter import save_adapter

        if not self.is_peft():
            raise NotImplementedError(f"method {self.name!r} defines neither export nor peft_config")
        save_adapter(model, state_dict, out_dir)


# ------------------------------------------------------------------------------------------ registry

METHODS = Registry("method", ENTRY_POINT_GROUP, Method)
register_method = METHODS.register  # class decorator: `@register_method("lora")`
get_method = METHODS.get
known_methods = METHODS.known


def nested_method(spec: dict, at: tuple[str, ...], default: str) -> tuple[type[Method], MethodConfig]:
    """A method named inside another method's keys (a distillation student, one adapter of several): its plugin and
    typed options; a ValueError names the key path, e.g. `method.student.r` or `method.adapters.1.method.r`."""
    from pydantic import ValidationError

    from distune.errors import describe_error

    name = spec.get("name", default)
    try:
        plugin = get_method(name)
    except KeyError:
        raise ValueError(f"{'.'.join(at)}.name: unknown method {name!r}; known: {', '.join(known_methods())}") from None
    try:
        options = plugin.Config(**{k: x for k, x in spec.items() if k != "name"})
    except ValidationError as e:
        raise ValueError(describe_error(e, plugin.Config, prefix=at)) from None
    return plugin, options


def build_method(name: str, options: dict, settings: RunSettings | None = None, key: str = "method") -> Method:
    cls = get_method(name)
    return cls(cls.Config(**options), settings, key)


def frozen_models(cfg) -> dict[str, object]:
    """The frozen models (teachers: distune.signals.TeacherSpec) the method of run config `cfg` asks for."""
    return build_method(cfg.method.name, cfg.method.model_extra or {}, RunSettings.of(cfg)).frozen_models()
