"""Which PEFT task type a model is: PEFT wraps each head differently (and trains a new head in full), and
which modules are that head (they must not get adapters of their own)."""

from __future__ import annotations

from torch import nn

# Suffix of the transformers class name -> PEFT TaskType. A new head (SEQ_CLS, TOKEN_CLS, QUESTION_ANS) is
# listed by PEFT as modules_to_save: it trains in full and is saved with the adapter, as it must.
_HEADS = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
          "ForQuestionAnswering": "QUESTION_ANS"}
# The head module names PEFT saves for each task type (its PeftModelFor* classes use these).
_HEAD_MODULES = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                 "QUESTION_ANS": ("qa_outputs",)}


def peft_task_type(model: nn.Module) -> str:
    name = type(model).__name__
    for suffix, task in _HEADS.items():
        if name.endswith(suffix):
            return task
    return "CAUSAL_LM"


def peft_head_modules(model: nn.Module) -> list[str]:
    """The model's task-head modules (empty for a causal LM), for a PEFT config's `exclude_modules`. PEFT's
    `all-linear` leaves out a SEQ_CLS head by itself but not a TOKEN_CLS or QUESTION_ANS one: that head would
    get an adapter and then fail as modules_to_save ("cannot be applied to modules of type lora.Linear")."""
    return [name for name in _HEAD_MODULES.get(peft_task_type(model), ()) if hasattr(model, name)]
