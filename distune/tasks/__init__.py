"""Tasks: one registered class per kind of prediction (distune.tasks.base.Task). Importing this package registers
the built-in tasks; third-party tasks register through the entry-point group `distune.tasks` (a Task subclass, or
a module that registers one on import)."""

from distune.tasks import causal_lm, question_answering, sequence_classification, token_classification  # noqa: F401

from distune.tasks.base import (
    ENTRY_POINT_GROUP, TASKS, Batch, EvalOptions, LossOutput, Task, model_inputs, register_task,
)


def get_task(name: str) -> Task:
    return TASKS.get(name)()  # tasks hold no state: an instance per call


def known_tasks() -> list[str]:
    return TASKS.known()


def task_of(samples: list) -> Task:
    """The task that owns these samples (each sample type names its task)."""
    return get_task(type(samples[0]).kind)


def collate(samples: list, pad_id: int) -> Batch:
    """One micro-batch of samples of one task, as that task collates them."""
    return task_of(samples).collate(samples, pad_id)


__all__ = ["Batch", "ENTRY_POINT_GROUP", "EvalOptions", "LossOutput", "Task", "collate", "get_task", "known_tasks",
           "model_inputs", "register_task", "task_of"]
