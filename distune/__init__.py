"""distune: Ray schedules DeepSpeed ZeRO jobs; full fine-tuning and PEFT distillation as method plugins."""

__version__ = "0.1.0"
