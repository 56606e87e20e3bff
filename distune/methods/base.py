"""The method plugin interface and its registry.

A method decides *what trains* and *what loss* is minimised. It sees `nn.Module`s and batches only:
it must not import ray, deepspeed, or anything in distune.cluster / distune.engine.
Third-party methods register through the entry-point group `distune.methods`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from distune.data.loader import model_inputs
from distune.logits import Selected, head_at

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
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached; stay tensors until logged


class Method(ABC):
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    name: ClassVar[str] = ""
    # False where the method cannot keep packed samples apart (prompt learning prepends virtual tokens, and
    # PEFT drops the position ids that packing relies on): validation refuses data.packing then.
    supports_packing: ClassVar[bool] = True

    def __init__(self, config: MethodConfig):
        self.config = config
        self.seed = 0  # the run's seed; the runner sets it (for methods that draw random numbers)
        self.loss_chunk: int | None = None  # train.loss_chunk; the runner sets it (distune.logits)
        self.key = "method"  # its config path, for error messages; a method that nests another sets that one's

    @abstractmethod
    def adapt(self, model: nn.Module) -> nn.Module:
        """Add adapters/heads and set requires_grad: the one source of truth for what trains."""

    def frozen_models(self) -> dict[str, object]:
        """Extra frozen models the runner must build and shard (e.g. {"teacher": TeacherSpec}). None by default."""
        return {}

    def see_frozen_configs(self, configs: dict[str, object]) -> None:
        """Called before `adapt` with the frozen models' HF configs (e.g. a teacher's width). No-op by default."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], frozen: dict[str, nn.Module]) -> LossOutput:
        """Token-level cross-entropy on the positions whose label is not -100 (the default objective); for a
        task head's batch, the head's loss: class CE (`class_labels`), per-token tag CE (`tag_labels`), or the
        mean of the answer start and end CEs (`start_positions`, `end_positions`)."""
        if "labels" in batch:  # causal LM: the head runs on the trained positions only (distune.logits)
            labels = batch["labels"][:, 1:]
            trained = labels != -100
            with head_at(model, trained, self.loss_chunk) as sel:
                out = model(**model_inputs(batch))
            loss, n_tokens = selected_ce(sel, out.logits, labels[trained])
            return LossOutput(loss, {"ce": loss.detach(), "trained_tokens": n_tokens})
        out = model(**model_inputs(batch))
        if "class_labels" in batch:
            loss = nn.functional.cross_entropy(out.logits.float(), batch["class_labels"])
            return LossOutput(loss, {"ce": loss.detach()})
        if "tag_labels" in batch:
            loss, n_tokens = tag_loss(out.logits, batch["tag_labels"])
            return LossOutput(loss, {"ce": loss.detach(), "trained_tokens": n_tokens})
        if "start_positions" in batch:
            loss = span_loss(out.start_logits, out.end_logits, batch["start_positions"], batch["end_positions"])
            return LossOutput(loss, {"ce": loss.detach()})
        raise ValueError(f"batch has no labels the default objective knows: {sorted(batch)}")

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
        naming the key for a config that cannot work with it. No-op by default."""

    def export_keys(self, model: nn.Module) -> set[str] | None:
        """Names of the parameters the export needs (None: all of them). Under ZeRO-3 only these are gathered."""
        return None

    @abstractmethod
    def export(self, model: nn.Module, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        """Write a Hugging Face native artifact from a full (gathered, CPU) state dict. Rank 0 only."""


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token CE over trained positions; returns (loss, number of trained tokens)."""
    shift_labels = labels[:, 1:]
    trained = shift_labels != -100
    # Select trained positions before the fp32 upcast and softmax: with loss on responses only they are
    # often a few percent of all positions, and [positions x vocab] is the largest tensor of the step.
    picked = logits[:, :-1][trained].float()
    n_tokens = trained.sum()
    loss = nn.functional.cross_entropy(picked, shift_labels[trained], reduction="sum")
    # A batch with no trained tokens is refused by the data layer; clamp keeps a stray one finite anyway.
    return loss / n_tokens.clamp(min=1), n_tokens.detach()


def selected_ce(sel: Selected, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CE of the logits at `sel`'s positions (`logits`: the model's output) against `targets` ([N] token ids),
    in fp32; chunked when `sel` is. Returns (loss, number of trained tokens)."""
    n = torch.tensor(targets.numel(), device=targets.device)
    if sel.chunked:
        total = sel.reduce(lambda logits, rows: nn.functional.cross_entropy(logits.float(), targets[rows],
                                                                            reduction="sum"))
    else:
        total = nn.functional.cross_entropy(sel.pick(logits).float(), targets, reduction="sum")
    return total / n.clamp(min=1), n


def tag_loss(logits: torch.Tensor, tags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CE over the tagged tokens (first sub-token of each word; no shift: a token's own tag)."""
    tagged = tags != -100
    loss = nn.functional.cross_entropy(logits[tagged].float(), tags[tagged], reduction="sum")
    return loss / tagged.sum().clamp(min=1), tagged.sum().detach()


def span_loss(start_logits: torch.Tensor, end_logits: torch.Tensor, starts: torch.Tensor,
              ends: torch.Tensor) -> torch.Tensor:
    """Extractive QA: the mean of the start-position and end-position cross-entropies (BERT's SQuAD loss)."""
    ce = nn.functional.cross_entropy
    return (ce(start_logits.float(), starts) + ce(end_logits.float(), ends)) / 2


# ------------------------------------------------------------------------------------------ registry

_REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator: `@register_method("lora")`."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__module__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _entry_points() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def get_method(name: str) -> type[Method]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    ep = _entry_points().get(name)
    if ep is None:
        raise KeyError(name)
    obj = ep.load()  # a Method subclass, or a module that registers one on import
    if isinstance(obj, type) and issubclass(obj, Method):
        _REGISTRY.setdefault(name, obj)
        obj.name = obj.name or name
    if name not in _REGISTRY:
        raise KeyError(f"entry point {ep.value} did not provide a Method named {name!r}")
    return _REGISTRY[name]


def known_methods() -> list[str]:
    return sorted(set(_REGISTRY) | set(_entry_points()))


def nested_method(spec: dict, at: tuple[str, ...], default: str) -> tuple[type[Method], MethodConfig]:
    """A method named inside another method's keys (a distillation student, one adapter of several): its plugin and
    typed options; a ValueError names the key path, e.g. `method.student.r` or `method.adapters.1.method.r`."""
    from pydantic import ValidationError

    from distune.config import describe_error

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


def build_method(name: str, options: dict) -> Method:
    cls = get_method(name)
    return cls(cls.Config(**options))
