"""What every PEFT method shares: wrap the model with the method's PEFT config, train what PEFT left
trainable, export the adapter folder that `PeftModel.from_pretrained` loads."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

from peft import PeftConfig, get_peft_model
from torch import nn

from distune.methods.base import Method


class PeftMethod(Method):
    @abstractmethod
    def peft_config(self, model: nn.Module) -> PeftConfig:
        """The PEFT config this method adds (also what adds it as one adapter of several)."""

    def adapt(self, model: nn.Module) -> nn.Module:
        return get_peft_model(model, self.peft_config(model))  # freezes the base; the adapter requires grad

    def export_keys(self, model: nn.Module) -> set[str]:
        return {n for n, p in model.named_parameters() if p.requires_grad}

    def export(self, model, state_dict, out_dir: Path) -> None:
        # state_dict holds the gathered adapter tensors: saving from it (not from the possibly ZeRO-3
        # partitioned module) is what makes the "empty adapter" bug impossible.
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
