"""`lora`: PEFT LoRA adapters with the rsLoRA, DoRA and LoRA+ variants; export is a PEFT adapter folder."""

from __future__ import annotations


from peft import LoraConfig
from pydantic import Field
from torch import nn

from distune.methods.base import Method, MethodConfig, register_method
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
class Lora(Method):
    Config = LoraOptions

    def peft_config(self, model: nn.Module) -> LoraConfig:
        c = self.config
        return LoraConfig(
            r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=c.target_modules,
            use_rslora=c.use_rslora, use_dora=c.use_dora, bias=c.bias, task_type=peft_task_type(model),
            exclude_modules=peft_head_modules(model) or None)

    def meta_counts(self, model: nn.Module) -> tuple[int, int]:
        trainable, everything = lora_formula(model, self)
        return trainable, everything  # LoRA freezes every base weight

    def optimizer_groups(self, model: nn.Module) -> list[dict] | None:
        if self.config.lr_ratio is None:
            return None
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # LoRA+ (Hayou et al. 2024): B is the output side of the update; a higher rate there speeds learning.
        b = [p for n, p in trained if "lora_B" in n or "lora_embedding_B" in n]
        rest = [p for n, p in trained if not ("lora_B" in n or "lora_embedding_B" in n)]
        return [{"name": "lora_A", "params": rest}, {"name": "lora_B", "params": b, "lr_scale": self.config.lr_ratio}]


def lora_formula(model: nn.Module, method: Lora) -> tuple[int, int]:
    """(trainable, all the model's) parameters for LoRA without building adapters: r·(in+out) per targeted linear
    (+out: DoRA)."""
    c = method.config
    head = model.get_output_embeddings()
    trainable = 0
    for name, m in model.named_modules():
        hit = c.target_modules == "all-linear" or name.split(".")[-1] in c.target_modules
        if isinstance(m, nn.Linear) and m is not head and hit:
            trainable += c.r * (m.in_features + m.out_features) + (m.out_features if c.use_dora else 0)
    return trainable, sum(p.numel() for p in model.parameters())
