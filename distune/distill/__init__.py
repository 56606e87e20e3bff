"""Distillation pieces that are plain torch: the divergences, and the teacher / student vocabulary alignment (the
teacher signals are distune.signals).
Imports neither ray nor deepspeed."""
