"""`lora`: PEFT LoRA adapters with the rsLoRA, DoRA and LoRA+ variants; export is a PEFT adapter folder."""

from __future__ import annotations


from peft import LoraConfig
from pydantic import Field
from torch import nn

from distune.methods.base import MethodConfig, register_method
from distune.methods.peft_adapter import PeftMethod
from distune.methods.peft_task import peft_head_modules, peft_task_type


class LoraOptions(MethodConfig):
    r: int = Field(8, gt=0, description="Rank of each low-rank update.")
    alpha: float = Field(16, gt=0, description="The update is scaled by alpha / r (alpha / sqrt(r) with use_rslora).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the input of the LoRA path.")
    target_modules: list[str] | str = Field(
        "all-linear", description="Modules that get an adapter: a list of names (e.g. [q_proj, v_proj]), a regex, or "
        "all-linear (PEFT's shorthand: every linear layer but the output head).")
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha / sqrt(r) instead of alpha / r.")
    use_dora: bool = Field(False, description="DoRA: weight-decomposed LoRA.")
    bias: str = Field("none", description="Biases that train too (PEFT's bias): none, all, or lora_only (those of the "
                      "adapted modules).")
    lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: the B matrices train at lr x lr_ratio (the paper suggests 16), A at lr.")


@register_method("lora")
class Lora(PeftMethod):
    Config = LoraOptions

    def peft_config(self, model: nn.Module) -> LoraConfig:
        c = self.config
        return LoraConfig(
            r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=c.target_modules,
            use_rslora=c.use_rslora, use_dora=c.use_dora, bias=c.bias, task_type=peft_task_type(model),
            exclude_modules=peft_head_modules(model) or None)

    def optimizer_groups(self, model: nn.Module) -> list[dict] | None:
        if self.config.lr_ratio is None:
            return None
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # LoRA+ (Hayou et al. 2024): B is the output side of the update; a higher rate there speeds learning.
        b = [p for n, p in trained if "lora_B" in n or "lora_embedding_B" in n]
        rest = [p for n, p in trained if not ("lora_B" in n or "lora_embedding_B" in n)]
        return [{"name": "lora_A", "params": rest}, {"name": "lora_B", "params": b, "lr_scale": self.config.lr_ratio}]
