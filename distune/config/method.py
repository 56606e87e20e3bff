"""The `method:` section: `name` picks the plugin; its other keys are left to that plugin's own Config
(checked by distune.config.loading when the config is loaded).

Imports nothing from distune.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class MethodSection(BaseModel):
    """`name` picks the plugin; the other keys are validated by that plugin's own Config."""

    model_config = ConfigDict(extra="allow")
    name: str = Field("full", description="A registered method (full, lora, ia3, prompt_tuning, p_tuning, "
                      "prefix_tuning, distill, the adapter family, or a plugin's name); the other method keys are "
                      "its own (see Methods below).")
