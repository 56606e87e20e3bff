"""The `run:` section: the run's name, where its directory lives, the seed.

Imports only distune.config.strict.
"""

from __future__ import annotations


from pydantic import Field, field_validator

from distune.config.strict import Strict
from distune.paths import anchor


class RunSection(Strict):
    name: str = Field("run", description="Run name; the run directory is output_dir/name.")
    output_dir: str = Field("runs", description="Parent of run directories (checkpoints, export, results, the "
                            "recorded config): a folder every node can reach, or an object-store URI (s3://bucket/"
                            "runs, gs://bucket/runs, any URI pyarrow opens; credentials from the nodes' environment).")
    seed: int = Field(0, description="Seeds model init, data order, dropout; restored exactly on resume.")

    @field_validator("output_dir")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if "://" in v:  # object storage: opened (and checked) by distune.storage
            base, sep, query = v.partition("?")
            return base.rstrip("/") + sep + query
        return anchor(v)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("must be a plain folder name (no '/', not starting with '.')")
        return v
