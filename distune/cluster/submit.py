"""`distune submit CFG`: the config validated here, then run on a remote cluster (distune.cluster.jobs)."""

from __future__ import annotations

from distune.cluster.jobs import add_submit_arguments as add_arguments
from distune.cluster.jobs import submit as command

__all__ = ["add_arguments", "command"]
