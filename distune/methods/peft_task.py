"""Which PEFT task type a model is: PEFT wraps each head differently (and trains a new head in full)."""

from __future__ import annotations

from torch import nn

# Suffix of the transformers class name -> PEFT TaskType. A new head (SEQ_CLS, TOKEN_CLS, QUESTION_ANS) is
# listed by PEFT as modules_to_save: it trains in full and is saved with the adapter, as it must.
_HEADS = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
          "ForQuestionAnswering": "QUESTION_ANS"}


def peft_task_type(model: nn.Module) -> str:
    name = type(model).__name__
    for suffix, task in _HEADS.items():
        if name.endswith(suffix):
            return task
    return "CAUSAL_LM"
