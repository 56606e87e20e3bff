"""The `wandb:` section: where and how the run is logged to Weights & Biases.

Imports only distune.config.strict.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from distune.config.strict import Strict


class WandbSection(Strict):
    mode: Literal["online", "offline", "disabled"] = Field(
        "offline", description="online needs W&B credentials (WANDB_API_KEY in the environment, or `wandb login`); "
        "offline writes run_dir/wandb for `wandb sync`; disabled logs nothing.")
    project: str = Field("distune", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user); your default one when null.")
    tags: list[str] = Field(default_factory=list, description="W&B run tags.")
    group: str | None = Field(None, description="W&B group the run joins (a pipeline's stages share one: by "
                              "default the pipeline file's name).")
    job_type: str | None = Field(None, description="W&B job_type (a pipeline stage's name by default).")
