"""`Strict`, the base of every config section: an unknown key is an error, and so is assigning an invalid value.

Imports nothing from distune.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
