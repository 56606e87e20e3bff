"""Adapter store and switching inference: list / export / merge PEFT adapter folders, and serve several adapters
on one base loaded once (`distune adapters ...`). Imports neither ray nor deepspeed."""
