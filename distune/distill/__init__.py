"""Distillation pieces that are plain torch: divergences (and, later, teacher signals).
Imports neither ray nor deepspeed."""
