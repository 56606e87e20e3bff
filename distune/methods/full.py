"""`full`: every weight trains; export is a plain `save_pretrained` folder."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from torch import nn

from distune.methods.base import Method, MethodConfig, register_method


class FullConfig(MethodConfig):
    freeze_embeddings: bool = Field(False, description="Keep the input and output embeddings fixed (saves their "
                                    "optimizer memory).")


@register_method("full")
class Full(Method):
    Config = FullConfig
    quantizable = False  # every weight trains, and 4/8-bit weights cannot

    def adapt(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        if self.config.freeze_embeddings:
            for module in (model.get_input_embeddings(), model.get_output_embeddings()):
                if module is not None:
                    for p in module.parameters():
                        p.requires_grad_(False)
        return model

    def export(self, model, state_dict, out_dir: Path) -> None:
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
