"""`distune eval`: prompting baselines (zero-shot, few-shot ICL, CoT, self-consistency) vs fine-tuned and
distilled checkpoints, scored by the config's own output parser. Imports neither ray nor deepspeed."""
