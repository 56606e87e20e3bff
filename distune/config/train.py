"""The `train:`, `eval:` and `checkpoint:` sections: the optimizer and its schedule, evaluation and checkpoint
cadence.

Imports only distune.config.strict.
"""

from __future__ import annotations

from pydantic import Field

from distune.config.strict import Strict


class TrainSection(Strict):
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; default: epochs over the data.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training split; used when max_steps is not set.")
    global_batch_size: int = Field(8, gt=0, description="Samples per optimizer step, all workers together.")
    micro_batch_size: int = Field(1, gt=0, description="Samples per forward pass per worker.")
    lr: float = Field(2e-5, gt=0, description="AdamW peak learning rate (after warmup_steps).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (never on biases and norms).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps, then cosine decay to lr x min_lr_ratio.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine decays to lr * min_lr_ratio.")
    grad_clip: float | None = Field(1.0, gt=0, description="Global gradient-norm clipping; null disables it "
                                    "(DeepSpeed is told gradient_clipping: 0, since its own default clips at 1.0).")
    log_every: int = Field(1, gt=0, description="Steps between logged metrics (one cross-rank sync per interval).")
    loss_chunk: int | None = Field(
        None, gt=0, description="Causal LMs: run the output head and the loss (CE and KD) over at most this many "
        "trained positions at a time, recomputing each chunk in backward, so [positions x vocab] logits never "
        "exist for more than one chunk (costs one more head matmul). None: all trained positions at once. The head "
        "only ever runs on the positions a loss reads, with or without it.")
    stop_after_steps: int | None = Field(
        None, gt=0, description="End this invocation after N total steps with a checkpoint (schedule still "
        "spans max_steps); run again to continue. For time-boxed allocations.")


class EvalSection(Strict):
    every: int | None = Field(None, gt=0, description="Evaluate every N steps (and always at the end).")
    before_training: bool = Field(True, description="Also evaluate once before the first step.")
    choices: list[str] | None = Field(
        None, description="Candidate responses; enables accuracy = the choice the model scores highest.")
    micro_batch_size: int = Field(8, gt=0, description="Samples per evaluation forward pass per worker.")
    max_answer_tokens: int = Field(30, gt=0, description="model.task question_answering: the longest answer span "
                                   "(in tokens) a prediction may be.")


class CheckpointSection(Strict):
    every: int | None = Field(None, gt=0, description="Checkpoint every N steps (and at the end).")
    keep: int = Field(2, gt=0, description="How many recent checkpoints to keep.")
