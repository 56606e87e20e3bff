"""`token_classification`: a tag per word (NER, POS), predicted on the first sub-token of each word; scored by
tag accuracy and entity precision / recall / F1 (exact span match).

Rows have `tokens` + `tags` columns (lists of equal length) after `data.columns` renames them; templates, chat
templates and the sample design do not apply. Needs a fast tokenizer (word ids). Imports neither ray nor deepspeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn

from distune.errors import DataError
import distune.tasks.spans as spans
from distune.tasks.base import (IGNORE, Batch, EvalOptions, LossOutput, Task, encode_fast, forward, model_inputs, padded,
                                register_task)


@dataclass
class TagSample:
    kind: ClassVar[str] = "token_classification"
    input_ids: list[int]
    line: int
    tags: list[int]  # a tag id per token, -100 where none is trained (special tokens, later sub-tokens)
    extras: dict | None = None
    task: str | None = None


@register_task("token_classification")
class TokenClassification(Task):
    head = "AutoModelForTokenClassification"
    labelled = "tags"

    def check(self, cfg, method) -> None:
        check_own_columns(self.name, cfg)
        super().check(cfg, method)

    def label_names(self, renderer, line: int, row: dict) -> set[str]:
        return set(words_and_tags(renderer, line, row)[1])

    def render(self, renderer, line: int, row: dict, canonical: bool, labels: list[str]) -> TagSample:
        return render_tags(renderer, line, row, labels)

    def summarise(self, train, eval_samples, data_cfg, labels, dropped, renderer) -> tuple[dict, list[str]]:
        stats, _ = super().summarise(train, eval_samples, data_cfg, labels, dropped, renderer)
        warnings = [f"{stats['truncated']} samples are cut at data.max_length={data_cfg.max_length}; their cut words "
                    "are neither trained nor scored"] if stats["truncated"] else []
        return stats, warnings

    def show(self, tokenizer, sample: TagSample, labels, max_length: int) -> tuple[str, str]:
        tags = " ".join(f"{tokenizer.convert_ids_to_tokens(t)}/{labels[g]}"
                        for t, g in zip(sample.input_ids, sample.tags) if g != IGNORE)
        return f"{len(sample.input_ids)} tokens", tags

    def collate(self, samples: list[TagSample], pad_id: int) -> Batch:
        """`tag_labels` [B, W] (-100 on padding)."""
        batch = padded(samples, pad_id)
        tags = torch.full(batch["input_ids"].shape, IGNORE, dtype=torch.long)
        for i, s in enumerate(samples):
            tags[i, :len(s.tags)] = torch.tensor(s.tags)
        batch["tag_labels"] = tags
        return Batch(self, batch)

    def loss(self, model, batch: Batch, loss_chunk: int | None = None) -> LossOutput:
        """Mean CE over the tagged tokens (first sub-token of each word; no shift: a token's own tag)."""
        logits, tags = model(**model_inputs(batch)).logits, batch["tag_labels"]
        tagged = tags != IGNORE
        loss = nn.functional.cross_entropy(logits[tagged].float(), tags[tagged], reduction="sum")
        loss = loss / tagged.sum().clamp(min=1)
        return LossOutput(loss, {"ce": loss.detach(), "trained_tokens": tagged.sum().detach()})

    def evaluate(self, model, shard, micro_batch: int, pad_id: int, device, options: EvalOptions) -> dict[str, float]:
        """Mean tag CE and accuracy over tagged tokens, entity precision / recall / F1 with exact span match over
        the words' tags."""
        labels = options.labels
        totals = torch.zeros(6, dtype=torch.float64, device=device)  # [loss, correct, tagged, hit, predicted, gold]
        for start in range(0, len(shard), micro_batch):
            out, batch, weights = forward(model, shard[start:start + micro_batch], self, pad_id, device)
            gold = batch["tag_labels"]
            tagged = gold != IGNORE
            logits = out.logits.float()
            per_token = nn.functional.cross_entropy(logits.transpose(1, 2), gold, reduction="none",
                                                    ignore_index=IGNORE)
            pred = logits.argmax(-1)
            totals[0] += (per_token.sum(1).double() * weights).sum()
            totals[1] += (((pred == gold) & tagged).sum(1).double() * weights).sum()
            totals[2] += (tagged.sum(1).double() * weights).sum()
            for i, w in enumerate(weights.tolist()):
                words_gold = [labels[t] for t in gold[i][tagged[i]].tolist()]
                words_pred = [labels[t] for t in pred[i][tagged[i]].tolist()]
                totals[3:] += torch.tensor(spans.entity_counts(words_gold, words_pred), device=device) * w
        dist.all_reduce(totals)
        scores = spans.f1(*totals[3:].tolist())
        return {"eval/loss": (totals[0] / totals[2].clamp(min=1)).item(),
                "eval/token_accuracy": (totals[1] / totals[2].clamp(min=1)).item(),
                "eval/entity_precision": scores["precision"], "eval/entity_recall": scores["recall"],
                "eval/entity_f1": scores["f1"]}


def check_own_columns(task: str, cfg) -> None:
    """Token-level heads read fixed columns (after data.columns), not a row format's."""
    if cfg.data.format != "prompt_response":
        raise ValueError(f"data.format: a {task} head reads its own columns, not {cfg.data.format} rows; remove "
                         f"data.format and rename columns with data.columns")


def words_and_tags(renderer, line: int, row: dict) -> tuple[list[str], list[str]]:
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


def render_tags(renderer, line: int, row: dict, labels: list[str]) -> TagSample:
    """Words -> sub-tokens; the first sub-token of each word carries the word's tag id, the other sub-tokens
    and special tokens -100 (the Hugging Face convention). Words cut by data.max_length are not labelled."""
    words, tags = words_and_tags(renderer, line, row)
    for tag in tags:
        if tag not in labels:
            raise DataError(f"{renderer.source.at(line)}: tag {tag!r} is not one of data.labels {labels}")
    enc = encode_fast(renderer, line, _as_in_text(renderer.tok, words), is_split_into_words=True)
    ids, previous = [], None
    for word in enc.word_ids():
        ids.append(IGNORE if word is None or word == previous else labels.index(tags[word]))
        previous = word
    if all(t == IGNORE for t in ids):
        raise DataError(f"{renderer.source.at(line)}: no word survives data.max_length={renderer.cfg.max_length}")
    return TagSample(enc["input_ids"], line, ids)


def _as_in_text(tok, words: list[str]) -> list[str]:
    """Byte-level BPE (GPT-2, SmolLM2, Llama 3) marks a word's leading space inside its first token ('ĠState'),
    but pre-split words reach it without one ('State', a token the model rarely saw mid-sentence). Give every
    word after the first its space, as in running text (what Hugging Face's add_prefix_space does for
    RoBERTa); word_ids() still counts the list's words. WordPiece and SentencePiece mark words themselves."""
    if "ByteLevel" not in repr(getattr(getattr(tok, "backend_tokenizer", None), "pre_tokenizer", None)):
        return words
    return words[:1] + [" " + w for w in words[1:]]
