"""`lora`: PEFT LoRA adapters (rsLoRA / DoRA switches); export is a PEFT adapter folder."""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, get_peft_model
from pydantic import Field
from torch import nn

from distune.methods.base import Method, MethodConfig, register_method
from distune.methods.peft_task import peft_head_modules, peft_task_type


class LoraOptions(MethodConfig):
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"  # PEFT's shorthand: every linear layer but the output head
    use_rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
    use_dora: bool = False  # weight-decomposed LoRA
    bias: str = "none"


@register_method("lora")
class Lora(Method):
    Config = LoraOptions

    def peft_config(self, model: nn.Module) -> LoraConfig:
        """The PEFT config this method adds (also used to add it as one adapter of several)."""
        c = self.config
        return LoraConfig(
            r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=c.target_modules,
            use_rslora=c.use_rslora, use_dora=c.use_dora, bias=c.bias, task_type=peft_task_type(model),
            exclude_modules=peft_head_modules(model) or None)

    def adapt(self, model: nn.Module) -> nn.Module:
        return get_peft_model(model, self.peft_config(model))  # freezes the base, adapters require grad

    def export_keys(self, model: nn.Module) -> set[str]:
        return {n for n, p in model.named_parameters() if p.requires_grad}

    def export(self, model, state_dict, out_dir: Path) -> None:
        # state_dict holds the gathered adapter tensors: saving from it (not from the possibly ZeRO-3
        # partitioned module) is what makes the "empty adapter" bug impossible.
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)

