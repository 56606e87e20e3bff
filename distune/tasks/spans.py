"""Span scores for the task heads: entities from BIO tags with exact-match entity F1 (conlleval / seqeval
default), SQuAD answer normalisation with exact match and token F1, and the best valid answer span from a QA
head's start / end logits. Pure functions; imports neither ray nor deepspeed.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import torch


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, first, last) word spans. `B-X` opens an entity; `I-X` continues one of type X and, like
    conlleval, opens one when the previous tag is not of type X; `O` is outside. A tag without a `B-`/`I-`
    prefix (IO tagging: `PER PER O`) is its own type, consecutive equal tags forming one entity."""
    out, kind, first = set(), None, 0
    for i, tag in enumerate(list(tags) + ["O"]):  # the sentinel closes an entity at the end
        prefix, _, name = tag.partition("-") if tag[:2] in ("B-", "I-") else ("I", "", tag)
        if tag == "O":
            prefix, name = "O", None
        if kind is not None and (prefix != "I" or name != kind):
            out.add((kind, first, i - 1))
            kind = None
        if prefix in ("B", "I") and kind is None:
            kind, first = name, i
    return out


def entity_counts(gold: list[str], pred: list[str]) -> tuple[int, int, int]:
    """(correct, predicted, gold) entities of one sentence: a predicted entity counts only if its type and
    both boundaries equal a gold one's (a partial overlap is one false positive and one false negative)."""
    g, p = entities(gold), entities(pred)
    return len(g & p), len(p), len(g)


def f1(correct: float, predicted: float, gold: float) -> dict[str, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    score = 2 * correct / (predicted + gold) if predicted + gold else 1.0  # nothing to find, nothing found
    return {"precision": precision, "recall": recall, "f1": score}


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation (the official v1.1 script): lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: list[str]) -> float:
    """SQuAD token F1 against the best-matching gold answer."""
    best = 0.0
    pred = normalize_answer(prediction).split()
    for answer in answers:
        gold = normalize_answer(answer).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if not pred or not gold:
            best = max(best, float(pred == gold))
        elif common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def best_span(start_logits: torch.Tensor, end_logits: torch.Tensor, allowed: torch.Tensor,
              max_tokens: int) -> tuple[int, int]:
    """The (start, end) token pair with the highest start + end logit such that both lie where `allowed` is
    true (the context's tokens), start <= end, and the span is at most `max_tokens` long."""
    n = start_logits.shape[0]
    scores = start_logits.float()[:, None] + end_logits.float()[None, :]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    valid = (j >= i) & (j - i < max_tokens) & allowed[:, None].cpu() & allowed[None, :].cpu()
    scores = scores.cpu().masked_fill(~valid, float("-inf"))
    flat = int(scores.argmax())
    return flat // n, flat % n
