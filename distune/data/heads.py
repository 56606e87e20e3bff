"""Rows for the token-level task heads: word tags aligned to sub-tokens (token classification) and
question + context pairs with the answer's token span (extractive question answering).

Rows use fixed column names after `data.columns` renames them: `tokens` + `tags` (lists of equal length),
or `question` + `context` + either SQuAD's `answers: {text: [...], answer_start: [...]}` or flat `answer` +
`answer_start` columns. Templates, chat templates and the sample design do not apply: a head reads the text
itself. Needs a fast tokenizer (word ids, offset mappings). Imports neither ray nor deepspeed.
"""

from __future__ import annotations

from dataclasses import dataclass

from distune.data.render import IGNORE, Renderer, Sample
from distune.data.sources import DataError

TOKEN_CLASSIFICATION = "token_classification"
QUESTION_ANSWERING = "question_answering"


@dataclass
class AnswerSpan:
    """A QA sample's gold span and what decoding a predicted span back to text needs."""

    start: int  # token positions of the gold answer's first and last token
    end: int
    context: str
    offsets: list[tuple[int, int] | None]  # per token: its character span in the context; None outside it
    answers: list[str]  # every gold answer text (exact match and F1 take the best)


def words_and_tags(renderer: Renderer, line: int, row: dict) -> tuple[list[str], list[str]]:
    row = renderer.normalise(line, row)
    at = renderer.source.at(line)
    words, tags = row.get("tokens"), row.get("tags")
    names = renderer.cfg.labels
    if isinstance(tags, list) and names and all(type(t) is int for t in tags):
        # Hugging Face datasets store tags as ClassLabel ids (conll2003's ner_tags): data.labels names them.
        if any(not 0 <= t < len(names) for t in tags):
            raise DataError(f"{at}: tag ids {tags} do not all index data.labels ({len(names)} names)")
        tags = [names[t] for t in tags]
    for name, value in (("tokens", words), ("tags", tags)):
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise DataError(f"{at}: token_classification rows need a list of strings in {name!r} (tags may be "
                            f"ids into data.labels; data.columns renames yours, e.g. {{tags: ner_tags}}); row has "
                            f"{', '.join(map(repr, row))}")
    if not words:
        raise DataError(f"{at}: 'tokens' is empty")
    if len(words) != len(tags):
        raise DataError(f"{at}: {len(words)} tokens but {len(tags)} tags")
    return words, tags


def render_tags(renderer: Renderer, line: int, row: dict, labels: list[str]) -> Sample:
    """Words -> sub-tokens; the first sub-token of each word carries the word's tag id, the other sub-tokens
    and special tokens -100 (the Hugging Face convention). Words cut by data.max_length are not labelled."""
    words, tags = words_and_tags(renderer, line, row)
    for tag in tags:
        if tag not in labels:
            raise DataError(f"{renderer.source.at(line)}: tag {tag!r} is not one of data.labels {labels}")
    enc = _encode(renderer, line, _as_in_text(renderer.tok, words), is_split_into_words=True)
    ids, previous = [], None
    for word in enc.word_ids():
        ids.append(IGNORE if word is None or word == previous else labels.index(tags[word]))
        previous = word
    if all(t == IGNORE for t in ids):
        raise DataError(f"{renderer.source.at(line)}: no word survives data.max_length={renderer.cfg.max_length}")
    return Sample(enc["input_ids"], [], line, tags=ids)


def _as_in_text(tok, words: list[str]) -> list[str]:
    """Byte-level BPE (GPT-2, SmolLM2, Llama 3) marks a word's leading space inside its first token ('ĠState'),
    but pre-split words reach it without one ('State', a token the model rarely saw mid-sentence). Give every
    word after the first its space, as in running text (what Hugging Face's add_prefix_space does for
    RoBERTa); word_ids() still counts the list's words. WordPiece and SentencePiece mark words themselves."""
    if "ByteLevel" not in repr(getattr(getattr(tok, "backend_tokenizer", None), "pre_tokenizer", None)):
        return words
    return words[:1] + [" " + w for w in words[1:]]


def tag_set(renderer: Renderer, line: int, row: dict) -> set[str]:
    return set(words_and_tags(renderer, line, row)[1])


def render_answer(renderer: Renderer, line: int, row: dict) -> Sample | None:
    """Question first, then the context (truncated, never the question), with the gold answer's first and
    last context token. None when truncation cut the answer off: the caller drops and counts the row."""
    row = renderer.normalise(line, row)
    at = renderer.source.at(line)
    question, context = row.get("question"), row.get("context")
    if not isinstance(question, str) or not isinstance(context, str):
        raise DataError(f"{at}: question_answering rows need string 'question' and 'context' columns "
                        f"(data.columns renames yours); row has {', '.join(map(repr, row))}")
    texts, starts = _answers(at, row)
    for text, start in zip(texts, starts):
        if context[start:start + len(text)] != text:
            raise DataError(f"{at}: answer {text!r} is not at answer_start {start} of the context (found "
                            f"{context[start:start + len(text)]!r})")
    enc = _encode(renderer, line, question, context, truncation="only_second", return_offsets_mapping=True)
    in_context = [s == 1 for s in enc.sequence_ids()]
    offsets = [tuple(o) if c else None for o, c in zip(enc["offset_mapping"], in_context)]
    kept = [i for i, o in enumerate(offsets) if o is not None]
    if not kept:
        raise DataError(f"{at}: the question leaves no room for the context in data.max_length="
                        f"{renderer.cfg.max_length}")
    # The first gold answer is the training target (SQuAD's train split has one; dev rows list several).
    first, last = starts[0], starts[0] + len(texts[0])
    if offsets[kept[-1]][1] < last:
        return None
    begin = next(i for i in kept if offsets[i][1] > first)
    end = max(i for i in kept if offsets[i][0] < last)
    span = AnswerSpan(begin, end, context, offsets, texts)
    sample = Sample(enc["input_ids"], [], line, span=span)
    if "token_type_ids" in enc:  # encoders with segment embeddings (BERT) tell question from context by them
        sample.token_type_ids = enc["token_type_ids"]
    return sample


def _answers(at: str, row: dict) -> tuple[list[str], list[int]]:
    """SQuAD's nested `answers` or flat `answer` + `answer_start` columns -> (texts, character starts)."""
    if "answers" in row:
        nested = row["answers"]
        texts, starts = (nested.get("text"), nested.get("answer_start")) if isinstance(nested, dict) else (None, None)
    else:
        texts, starts = [row.get("answer")], [row.get("answer_start")]
    if not (isinstance(texts, list) and isinstance(starts, list) and len(texts) == len(starts)
            and all(isinstance(t, str) for t in texts) and all(isinstance(s, int) and s >= 0 for s in starts)):
        raise DataError(f"{at}: question_answering rows need 'answers: {{text: [...], answer_start: [...]}}' (lists "
                        f"of equal length) or string 'answer' + integer 'answer_start' columns")
    if not texts or not all(texts):
        raise DataError(f"{at}: no answer text (unanswerable, SQuAD 2.0-style rows are not supported)")
    return texts, starts


def _encode(renderer: Renderer, line: int, *texts, **kwargs):
    tok = renderer.tok
    if not tok.is_fast:
        raise DataError(f"model.path: {type(tok).__name__} is not a fast tokenizer; token classification and "
                        "question answering need word ids and offset mappings")
    try:
        return tok(*texts, truncation=kwargs.pop("truncation", True), max_length=renderer.cfg.max_length, **kwargs)
    except Exception as e:  # e.g. a question alone longer than max_length: the tokenizer refuses to truncate
        raise DataError(f"{renderer.source.at(line)}: cannot tokenize ({str(e).splitlines()[0]})") from None
