"""Train a run config on Ray: the cluster layer (distune.cluster.trainer) given the per-rank program
(distune.worker.run) and the teachers the run's method asks for, so that neither the Ray layer nor the worker
reaches into the other or into the plugins. Imports ray only through distune.cluster.
"""

from __future__ import annotations

from distune.cluster.trainer import RunFailed, cpus_wanted as _cpus_for, train_on_ray
from distune.methods import frozen_models
from distune.worker import run

__all__ = ["RunFailed", "cpus_wanted", "fit"]


def fit(cfg, model_source: str, address: str | None = None, show_progress: bool = True, verbose: bool = False):
    """Train `cfg` on Ray; returns Ray's Result. Resumes from the run's latest checkpoint if it has one."""
    return train_on_ray(cfg, model_source, run, frozen_models(cfg), address, show_progress, verbose)


def cpus_wanted(cfg) -> int:
    """CPUs a run's workers and its teachers' actor groups take (an embedded cluster gets at least this many)."""
    return _cpus_for(cfg, frozen_models(cfg))
