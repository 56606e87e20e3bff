"""Steer, don't change: `prompt_tuning`, `p_tuning`, `prefix_tuning` (PEFT prompt learning).

The base model stays frozen; a few virtual tokens (prompt tuning: trained embeddings; P-tuning: embeddings
from a small MLP/LSTM prompt encoder; prefix tuning: trained keys/values in every layer) steer it. Outputs are
re-aligned with the input positions (models.align_virtual_tokens) so every loss, teacher signal and eval
works unchanged, which is also what lets these methods be distillation students.

Export: PEFT saves the *final* virtual-token embeddings (the prompt encoder's output). Under ZeRO-3 the live
encoder is partitioned, so the export runs a CPU copy of it built from the gathered weights.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
from peft import PeftConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from pydantic import Field, model_validator
from torch import nn

from distune.methods import peft_adapter
from distune.methods.base import Method, MethodConfig, register_method
from distune.methods.peft_task import peft_task_type
from distune.models import align_virtual_tokens


class PromptLearningOptions(MethodConfig):
    num_virtual_tokens: int = Field(20, gt=0, description="Virtual tokens prepended (or prefixed in every layer).")


# The three methods' hooks (each method is its own class directly under Method, sharing these functions).

def adapt_prompts(self, model: nn.Module) -> nn.Module:
    return align_virtual_tokens(peft_adapter.wrap(model, self.peft_config(model)))


def check_prompts(self, model: nn.Module) -> None:
    # PEFT hands prompt / P-tuning's virtual tokens to the model as embeddings, and a decoder's sequence
    # classifier (its head is `score`; encoders' is `classifier`, read at position 0) then cannot find the
    # last non-pad token: it reads the last column, a pad for every shorter row of a right-padded batch.
    prepends = self.name in ("prompt_tuning", "p_tuning")
    if prepends and type(model).__name__.endswith("ForSequenceClassification") and hasattr(model, "score"):
        raise ValueError(f"method.name: {self.name} on a decoder's sequence classifier would read padding as "
                         f"the last token; use prefix_tuning, lora or ia3 for this head")


def export_prompts(self, model, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
    name = model.active_adapter
    live = model.prompt_encoder[name]
    prefix = f"prompt_encoder.{name}."
    weights = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    config = copy.copy(model.peft_config[name])
    if config.peft_type.value == "PROMPT_TUNING":
        config.prompt_tuning_init = "RANDOM"  # not from the (possibly partitioned) word embeddings
        fresh = type(live)(config, None)
    else:
        fresh = type(live)(config)
    fresh.load_state_dict(weights)
    # PEFT computes the saved embeddings by running model.prompt_encoder[name]: give it the full CPU copy.
    model.prompt_encoder[name] = fresh
    try:
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    finally:
        model.prompt_encoder[name] = live


class PromptTuningOptions(PromptLearningOptions):
    init: Literal["random", "text"] = Field(
        "random", description="text: start the virtual tokens from the embeddings of init_text (repeated or cut "
        "to num_virtual_tokens); random: from scratch.")
    init_text: str | None = Field(None, description="The text for init: text, e.g. the task instruction.")

    @model_validator(mode="after")
    def _text_for_text_init(self) -> PromptTuningOptions:
        if self.init == "text" and not (self.init_text and self.init_text.strip()):
            raise ValueError("method.init_text: required (non-empty) with method.init: text")
        return self


@register_method("prompt_tuning")
class PromptTuning(Method):
    """Lester et al. 2021: only the virtual-token embeddings train."""

    Config = PromptTuningOptions
    supports_packing = False  # virtual tokens and PEFT's dropped position ids would join packed samples
    adapt, check_model, export = adapt_prompts, check_prompts, export_prompts

    def peft_config(self, model: nn.Module) -> PeftConfig:
        c = self.config
        text = c.init == "text"
        return PromptTuningConfig(
            task_type=peft_task_type(model), num_virtual_tokens=c.num_virtual_tokens,
            prompt_tuning_init="TEXT" if text else "RANDOM", prompt_tuning_init_text=c.init_text if text else None,
            # The run's model folder holds its tokenizer (GGUF models are converted into one first).
            tokenizer_name_or_path=model.name_or_path if text else None)


class PTuningOptions(PromptLearningOptions):
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="The prompt encoder's reparameterisation.")
    encoder_hidden_size: int | None = Field(None, gt=0, description="Its hidden width (default: the model's).")
    encoder_num_layers: int = Field(2, gt=0, description="Layers of an lstm encoder (PEFT's mlp encoder always has "
                                    "2 and ignores this, with a warning).")
    encoder_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout in the prompt encoder.")


@register_method("p_tuning")
class PTuning(Method):
    """Liu et al. 2021 (GPT Understands, Too): virtual tokens produced by a trained prompt encoder."""

    Config = PTuningOptions
    supports_packing = False  # virtual tokens and PEFT's dropped position ids would join packed samples
    adapt, check_model, export = adapt_prompts, check_prompts, export_prompts

    def peft_config(self, model: nn.Module) -> PeftConfig:
        c = self.config
        return PromptEncoderConfig(
            task_type=peft_task_type(model), num_virtual_tokens=c.num_virtual_tokens,
            encoder_reparameterization_type=c.encoder.upper(),
            encoder_hidden_size=c.encoder_hidden_size or model.config.hidden_size,
            encoder_num_layers=c.encoder_num_layers, encoder_dropout=c.encoder_dropout)


class PrefixTuningOptions(PromptLearningOptions):
    projection: bool = Field(False, description="Reparameterise the prefix through a 2-layer MLP (the paper's "
                                                "stabiliser; more parameters while training).")
    encoder_hidden_size: int | None = Field(None, gt=0, description="The projection's hidden width "
                                                                    "(default: the model's).")


@register_method("prefix_tuning")
class PrefixTuning(Method):
    """Li & Liang 2021: trained keys and values prefixed in every attention layer."""

    Config = PrefixTuningOptions
    supports_packing = False  # virtual tokens and PEFT's dropped position ids would join packed samples
    adapt, check_model, export = adapt_prompts, check_prompts, export_prompts

    def peft_config(self, model: nn.Module) -> PeftConfig:
        c = self.config
        return PrefixTuningConfig(
            task_type=peft_task_type(model), num_virtual_tokens=c.num_virtual_tokens, prefix_projection=c.projection,
            encoder_hidden_size=c.encoder_hidden_size or model.config.hidden_size)
