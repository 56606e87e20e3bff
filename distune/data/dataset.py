"""Build the train / eval sample lists from a data file: read, render, check, split.

Every rank builds the same lists (seeded), so no data moves between processes. Imports neither ray nor
deepspeed.
"""

from __future__ import annotations

import random
from pathlib import Path
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from distune.data.render import IGNORE, Renderer, Sample
from distune.data.sources import DataError, read_rows
from distune.paths import resolve_path


@dataclass
class Splits:
    train: list[Sample]
    eval: list[Sample]
    truncated: int = 0
    stats: dict = field(default_factory=dict)
    labels: list[str] | None = None  # sequence classification: class names, index = class id


def sampled_rows(data_cfg, seed: int) -> tuple[Path, list[tuple[int, dict]]]:
    """The data file's rows (line, row) in the seeded order training uses, cut to data.limit."""
    path = resolve_path(data_cfg.path)
    if not path.is_file():
        raise DataError(f"data.path: {data_cfg.path} does not exist")
    rows = list(read_rows(path, data_cfg.encoding, data_cfg.encoding_errors))
    if not rows:
        raise DataError(f"{path}: no rows")
    random.Random(seed).shuffle(rows)
    if data_cfg.limit:
        rows = rows[: data_cfg.limit]
    return path, rows


def load_splits(data_cfg, tokenizer: PreTrainedTokenizerBase, seed: int, choices: list[str] | None = None,
                task: str = "causal_lm") -> Splits:
    path, rows = sampled_rows(data_cfg, seed)
    n_eval = data_cfg.eval_size if isinstance(data_cfg.eval_size, int) else round(len(rows) * data_cfg.eval_size)
    if n_eval >= len(rows):
        raise DataError(f"data.eval_size={data_cfg.eval_size} leaves no training rows out of {len(rows)}")

    renderer = Renderer(tokenizer, data_cfg, str(path))
    if task == "sequence_classification":
        return _class_splits(renderer, rows, data_cfg, n_eval, data_cfg.labels or class_names(renderer, path, data_cfg))
    samples, truncated = [], 0
    for line, row in rows:
        s = renderer.render(line, row)
        full_len = len(s.input_ids)
        if s.labels.count(IGNORE) == len(s.labels):
            why = " after truncation to data.max_length" if full_len >= data_cfg.max_length else ""
            raise DataError(f"{path} line {line}: no trained tokens{why} (empty loss mask); "
                            f"raise data.max_length or shorten the prompt")
        truncated += full_len >= data_cfg.max_length
        samples.append(s)
    if choices:
        for s in samples[:n_eval]:
            if s.response is None or s.response.strip() not in [c.strip() for c in choices]:
                raise DataError(f"{path} line {s.line}: response {s.response!r} is not one of eval.choices "
                                f"{choices}")
    eval_s, train_s = samples[:n_eval], samples[n_eval:]
    lengths = [len(s.input_ids) for s in train_s]
    stats = {"train_rows": len(train_s), "eval_rows": len(eval_s), "truncated": truncated,
             "mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths),
             "trained_token_fraction": sum(sum(t != IGNORE for t in s.labels) for s in train_s) / sum(lengths)}
    return Splits(train_s, eval_s, truncated, stats)


def class_names(renderer: Renderer, path, data_cfg) -> list[str]:
    """The label map from the data: every distinct class in the whole file (not only the sampled rows), sorted."""
    names = sorted({renderer.class_name(line, row) for line, row in read_rows(path, data_cfg.encoding,
                                                                             data_cfg.encoding_errors)})
    if len(names) < 2:
        raise DataError(f"{path}: sequence classification needs at least 2 classes, the data has {names}")
    return names


def _class_splits(renderer: Renderer, rows: list, data_cfg, n_eval: int, labels: list[str]) -> Splits:
    samples = [renderer.render_class(line, row, labels) for line, row in rows]
    truncated = sum(len(s.input_ids) >= data_cfg.max_length for s in samples)
    eval_s, train_s = samples[:n_eval], samples[n_eval:]
    lengths = [len(s.input_ids) for s in train_s]
    stats = {"train_rows": len(train_s), "eval_rows": len(eval_s), "truncated": truncated,
             "mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths), "classes": len(labels)}
    return Splits(train_s, eval_s, truncated, stats, labels)
