"""The DeepSpeed layer: the only package that imports deepspeed. Never imports ray or distune.methods."""
