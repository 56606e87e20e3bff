"""`RunConfig`, the whole run config: one field per section, the checks that span sections, and where the run's
files go.

Imports the section modules and distune.errors; inside its methods, distune.methods (a method's own
Config), distune.storage and distune.paths.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, model_validator

from distune.config.cluster import ClusterSection
from distune.config.data import DataSection
from distune.config.deepspeed import DeepSpeedSection
from distune.errors import ConfigError
from distune.config.method import MethodSection
from distune.config.model import ModelSection
from distune.config.run import RunSection
from distune.config.strict import Strict
from distune.config.train import CheckpointSection, EvalSection, TrainSection
from distune.config.wandb import WandbSection


class RunConfig(Strict):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection
    method: MethodSection = Field(default_factory=MethodSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    wandb: WandbSection = Field(default_factory=WandbSection)

    def method_config(self) -> BaseModel:
        """The plugin's typed config (validated when the RunConfig was loaded)."""
        from distune.methods import get_method

        plugin = get_method(self.method.name)
        return plugin.Config(**(self.method.model_extra or {}))

    @property
    def run_location(self) -> str:
        """The run directory where its durable files go: a local path, or a URI under an object-store output_dir."""
        from distune.storage import join

        return join(self.run.output_dir, self.run.name)

    def store(self):
        """The run directory as a distune.storage.RunStore (local or object storage)."""
        from distune.storage import RunStore

        return RunStore(self.run_location)

    @property
    def run_dir(self) -> Path:
        """A local folder for the run: the run directory itself, or, when output_dir is an object store, this
        machine's working folder for the run (W&B's files, evaluation outputs)."""
        from distune.storage import is_uri

        if is_uri(self.run.output_dir):
            import hashlib

            from distune.paths import cache_root

            key = hashlib.sha256(self.run.output_dir.encode()).hexdigest()[:12]
            return cache_root() / "runs" / key / self.run.name
        return Path(self.run.output_dir) / self.run.name

    @model_validator(mode="after")
    def _partitioned_load(self) -> RunConfig:
        if self.model.load == "partitioned" and self.deepspeed.stage != 3:
            raise ValueError(f"model.load: partitioned needs deepspeed.stage: 3 (stage is {self.deepspeed.stage}); "
                             "below stage 3 every rank holds the whole model anyway")
        if self.model.load == "partitioned" and self.model.quantization:
            raise ValueError("model.load: partitioned does not apply to a quantized base (model.quantization)")
        return self

    def loads_partitioned(self) -> bool:
        """Whether the student is built partitioned across the ranks (model.load, resolved)."""
        if self.model.load == "auto":
            return self.deepspeed.stage == 3 and not self.model.quantization
        return self.model.load == "partitioned"

    def grad_accum_steps(self) -> int:
        per_step = self.train.micro_batch_size * self.cluster.num_workers
        if self.train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"train.micro_batch_size x cluster.num_workers = {self.train.micro_batch_size} x "
                f"{self.cluster.num_workers} = {per_step}")
        return self.train.global_batch_size // per_step
