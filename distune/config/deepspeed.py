"""The `deepspeed:` section: ZeRO stage, offloading, raw DeepSpeed keys (turned into a DeepSpeed config by
distune.engine.ds_config).

Imports only distune.config.strict (and never the deepspeed package).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from distune.config.strict import Strict


class DeepSpeedSection(Strict):
    stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage: 0 data parallel; 1 partitions optimizer states; "
                                       "2 also gradients; 3 also parameters.")
    offload_optimizer: bool = Field(False, description="Optimizer states (and, at stage 3, the gradient partition) in "
                                    "host memory; on GPU workers pinned, stepped by DeepSpeedCPUAdam.")
    offload_param: bool = Field(False, description="ZeRO-3 only.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Raw DeepSpeed keys, merged last.")

    @model_validator(mode="after")
    def _offload_param_needs_stage3(self) -> DeepSpeedSection:
        if self.offload_param and self.stage != 3:
            raise ValueError("offload_param needs stage: 3")
        return self
