"""`ia3`: PEFT (IA)^3, learned per-channel scales on keys, values and the feed-forward (the fewest trained
parameters of the adapter methods); export is a PEFT adapter folder, mergeable into the base."""

from __future__ import annotations

from peft import IA3Config
from pydantic import Field
from torch import nn

from distune.methods.base import Method, MethodConfig, register_method
from distune.methods.peft_task import peft_task_type


class Ia3Options(MethodConfig):
    target_modules: list[str] | None = Field(
        None, description="Modules that get a learned scale (default: PEFT's choice for the architecture, e.g. "
        "k_proj, v_proj, down_proj for Llama).")
    feedforward_modules: list[str] | None = Field(
        None, description="Which of target_modules are feed-forward (scaled on their input, not output); "
        "default: PEFT's choice for the architecture.")


@register_method("ia3")
class Ia3(Method):
    Config = Ia3Options

    def peft_config(self, model: nn.Module) -> IA3Config:
        c = self.config
        return IA3Config(target_modules=c.target_modules, feedforward_modules=c.feedforward_modules,
                         task_type=peft_task_type(model))
