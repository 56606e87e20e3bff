"""Build the train / eval sample lists from a data file: read, render, check, split; or, with data.tasks, from
one such file per task, mixed by temperature sampling (FLAN / T5).

Every rank builds the same lists (seeded), so no data moves between processes. Imports neither ray nor
deepspeed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from transformers import PreTrainedTokenizerBase

from distune.data.render import Renderer
from distune.data.rendering import DROPPED, ERROR, RenderJob, Target, render_rows
from distune.data.sources import (HUB_PREFIX, BadRows, DataError, Source, TableRows, describe, hub_table, read_rows,
                                  read_table)
from distune.paths import resolve_path
from distune.tasks import Task, get_task
from distune.tasks.base import totals

DEFAULT_EVAL_FRACTION, DEFAULT_EVAL_ROWS = 0.1, 1000  # data.eval_size unset: 10 % of the rows, at most 1,000


@dataclass
class Splits:
    train: list  # the task's samples (distune.tasks)
    eval: list
    truncated: int = 0
    stats: dict = field(default_factory=dict)
    labels: list[str] | None = None  # sequence / token classification: class or tag names, index = id
    warnings: list[str] = field(default_factory=list)
    tasks: dict[str, Splits] = field(default_factory=dict)  # a data.tasks mixture: each task's own splits, unmixed


def sampled_rows(data_cfg, seed: int, bad: BadRows | None = None) -> tuple[Source, list[tuple[int, dict]]]:
    """The data's rows (line or row number, row) in the seeded order training uses, past data.skip, cut to
    data.limit.
    With `bad`, malformed rows are recorded there and dropped instead of raising."""
    on_bad = bad.add if bad is not None else None
    if data_cfg.path is None:
        raise DataError("data.path: not set (a data.tasks mixture has no single file to read here)")
    if data_cfg.path.startswith(HUB_PREFIX):
        source, table = describe(data_cfg.path, None), hub_table(data_cfg.path, data_cfg.split)
    else:
        path = resolve_path(data_cfg.path)
        if not path.exists():
            raise DataError(f"data.path: {data_cfg.path} does not exist")
        source = describe(data_cfg.path, path)
        table = read_table(path, data_cfg.split)
        if table is None:  # JSONL / CSV: parsed row by row (each numbered by its line)
            rows = list(read_rows(path, data_cfg.encoding, data_cfg.encoding_errors, data_cfg.split, on_bad))
    if table is not None:  # parquet, datasets: rows stay Arrow until rendered, in the order shuffled below
        rows = TableRows(table, range(table.num_rows))
    if not rows:
        raise DataError(f"{source.name}: no rows")
    rows = _shuffled(rows, seed)
    if data_cfg.skip:
        if data_cfg.skip >= len(rows):
            raise DataError(f"data.skip: {data_cfg.skip} passes over all {len(rows)} rows of {source.name}")
        rows = rows[data_cfg.skip:]
    if data_cfg.limit:
        rows = rows[: data_cfg.limit]
    return source, rows


def _shuffled(rows, seed: int):
    """The seeded order. An Arrow table's rows get the permutation that shuffling a list of them would give (it
    depends only on their count), applied to the row numbers alone."""
    if isinstance(rows, TableRows):
        perm = list(range(len(rows)))
        random.Random(seed).shuffle(perm)
        return TableRows(rows.table, perm, rows.sign)
    random.Random(seed).shuffle(rows)
    return rows


def split_rows(data_cfg, seed: int, bad: BadRows | None = None) -> tuple[Source, list[tuple[int, dict]], int]:
    """(source, rows, n_eval): the first n_eval rows are the eval rows. With data.eval_path they are that file's
    rows, numbered negatively (-7 is its line 7) so that no id clashes with a training row's and
    `source.at` names the right file."""
    source, rows = sampled_rows(data_cfg, seed, bad)
    if data_cfg.eval_path is None:
        size = data_cfg.eval_size
        n_eval = (min(round(len(rows) * DEFAULT_EVAL_FRACTION), DEFAULT_EVAL_ROWS) if size is None
                  else size if isinstance(size, int) else round(len(rows) * size))
        return source, rows, n_eval
    path = resolve_path(data_cfg.eval_path)
    if not path.exists():
        raise DataError(f"data.eval_path: {data_cfg.eval_path} does not exist")
    held = describe(data_cfg.eval_path, path)
    on_bad = bad.add if bad is not None else None
    # Negated numbers from here on: the message of a bad row must already name the eval file.
    table = read_table(path, data_cfg.split)
    eval_rows = TableRows(table, range(table.num_rows), sign=-1) if table is not None else [
        (-n, row) for n, row in read_rows(path, data_cfg.encoding, data_cfg.encoding_errors, data_cfg.split, on_bad)]
    if not eval_rows:
        raise DataError(f"data.eval_path: {held.name} has no rows")
    source = Source(source.name, source.unit, held.name, held.unit)
    return source, eval_rows + rows, len(eval_rows)


def load_splits(data_cfg, tokenizer: PreTrainedTokenizerBase, seed: int, choices: list[str] | None = None,
                task: str = "causal_lm") -> Splits:
    if data_cfg.tasks:
        return _mixture(data_cfg, tokenizer, seed, choices, task)
    return _one_source(data_cfg, tokenizer, seed, choices, task)


def sampled_splits(data_cfg, tokenizer: PreTrainedTokenizerBase, seed: int, choices: list[str] | None,
                   task: str, rows: int) -> Splits | None:
    """Validation of a large dataset without tokenizing it: every row is read (malformed ones found, the rows
    counted), but only `rows` of them rendered, eval and training rows in their proportion, from the start of the
    seeded order. The splits' lengths are estimates scaled from the sample (`Estimated`); their stats are the
    sample's with the counts scaled. None when the data has no more rows than that (render it all)."""
    return _one_source(data_cfg, tokenizer, seed, choices, task, sample=rows)


class Estimated(Sequence):
    """A sampled split standing for `n` samples: its items repeat the sample's, its length is the estimate."""

    def __init__(self, samples: list, n: int):
        self.samples, self.n = samples, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        return self.samples[i % len(self.samples)]

    @property
    def lengths(self) -> np.ndarray:
        return np.resize(np.asarray([len(s.input_ids) for s in self.samples], dtype=np.int64), self.n)


def _one_source(data_cfg, tokenizer: PreTrainedTokenizerBase, seed: int, choices: list[str] | None, task: str,
                labels: list[str] | None = None, target: Target | None = None, runner=None,
                sample: int | None = None) -> Splits | None:
    target = target or Target()
    bad = BadRows() if data_cfg.bad_rows == "skip" else None
    source, rows, n_eval = split_rows(data_cfg, seed, bad)
    if n_eval >= len(rows):
        size = data_cfg.eval_size if data_cfg.eval_size is not None else n_eval
        raise DataError(f"data.eval_size={size} leaves no training rows out of {len(rows)}")
    scale = None
    if sample is not None:
        if len(rows) <= sample:
            return None
        # The first rows of each role in the seeded order: a random sample of each.
        k_eval = min(n_eval, max(1, round(sample * n_eval / len(rows)))) if n_eval else 0
        scale = (n_eval, k_eval, len(rows) - n_eval, sample - k_eval)
        rows = rows[:k_eval] + rows[n_eval:n_eval + sample - k_eval]
        n_eval = k_eval
    if data_cfg.eval_path:
        n_eval = None  # the eval rows are told by their (negated) numbers from here on

    renderer = Renderer(tokenizer, data_cfg, source, seed)
    t = get_task(task)
    if t.labelled:  # data.labels, or every name the data uses, sorted
        labels = labels or data_cfg.labels or class_names(renderer, _hub_rows(data_cfg, rows), data_cfg, t)
    dropped: list[int] = []
    job = RenderJob(tokenizer, data_cfg, source, seed, task, labels)
    eval_s, train_s = _render_all(rows, n_eval, bad, job, dropped, target, runner)
    del rows
    stats, warnings = t.summarise(train_s, eval_s, data_cfg, labels, dropped, renderer)
    splits = Splits(train_s, eval_s, stats["truncated"], stats, labels if t.labelled else None, warnings)
    if choices:
        for s in splits.eval:
            if s.response is None or s.response.strip() not in [c.strip() for c in choices]:
                raise DataError(f"{source.at(s.line)}: response {s.response!r} is not one of eval.choices {choices}")
    if bad is not None and bad.count:
        splits.warnings.insert(0, bad.summary())
    splits.stats["skipped_rows"] = bad.count if bad is not None else 0
    if job.calls is not None:
        splits.stats["tokenizer_calls"] = job.calls
    if scale is not None:
        _estimate(splits, *scale)
    return splits


def _estimate(splits: Splits, n_eval: int, k_eval: int, n_train: int, k_train: int) -> None:
    """Scale a sample's splits and counts to the whole data's (rows the sample dropped are dropped in proportion)."""
    est_train = max(1, round(len(splits.train) * n_train / k_train)) if splits.train else 0
    est_eval = round(len(splits.eval) * n_eval / k_eval) if k_eval else 0
    sampled = len(splits.train) + len(splits.eval)
    splits.train, splits.eval = Estimated(splits.train, est_train), Estimated(splits.eval, est_eval)
    factor = (est_train + est_eval) / max(1, sampled)
    splits.truncated = round(splits.truncated * factor)
    splits.stats |= {"train_rows": est_train, "eval_rows": est_eval, "truncated": splits.truncated,
                     "skipped_rows": round(splits.stats["skipped_rows"] * factor), "sampled_rows": sampled}
    splits.warnings.append(f"checked a sample of {sampled:,} rows (templates, masks, statistics; every row was read "
                           f"for malformed ones): counts are estimates until `distune prepare` or `run` tokenizes "
                           f"all of them")


def _mixture(data_cfg, tokenizer: PreTrainedTokenizerBase, seed: int, choices: list[str] | None,
             task: str, target: Target | None = None, runner=None) -> Splits:
    """Each task's splits as if it were the only data, then its training samples drawn in proportion to
    (weight x size) ** (1 / mixture_temperature); eval is every task's eval split, unsampled."""
    target = target or Target()
    sections = data_cfg.task_sections()
    labels = data_cfg.labels
    t = get_task(task)
    if t.labelled and labels is None:
        labels = _mixture_classes(sections, tokenizer, seed, t)
    parts = []
    for name, _, cfg in sections:
        try:
            part = _one_source(cfg, tokenizer, seed, choices, task, labels, target.part(name), runner)
        except DataError as e:
            raise DataError(f"[task {name}] {e}") from None
        for split in (part.train, part.eval):
            target.name_task(split, name)
        parts.append(part)

    sizes = [len(p.train) for p in parts]
    # In log space: a small temperature raises sizes to large powers.
    logs = [math.log(weight * n) / data_cfg.mixture_temperature for (_, weight, _), n in zip(sections, sizes)]
    mass = [math.exp(x - max(logs)) for x in logs]
    shares = [m / sum(mass) for m in mass]
    rng = random.Random(seed)
    drawn, per_task, warnings = [], {}, []
    for p, ((name, _, _), part, share) in enumerate(zip(sections, parts, shares)):
        count = round(sum(sizes) * share)
        n = len(part.train)
        # Without replacement while the task has enough rows; beyond that all of them plus seeded repeats.
        # Drawn as indices: the same draws as from the samples themselves (random uses only the length).
        picks = rng.sample(range(n), count) if count <= n else list(range(n)) + rng.choices(range(n), k=count - n)
        drawn += [(p, i) for i in picks]
        per_task[name] = {"rows": n, "share": round(share, 4), "drawn": count}
        warnings += [f"[task {name}] {w}" for w in part.warnings]
        if not count:
            warnings.append(f"[task {name}] no training samples drawn (share {share:.4f}); raise its weight or "
                            f"data.mixture_temperature")
    rng.shuffle(drawn)
    sink = target.sink("train")
    for p, i in drawn:
        sink.add(parts[p].train[i])
    train = sink.done()
    eval_sink = target.sink("eval")
    for part in parts:
        for s in part.eval:
            eval_sink.add(s)
    eval_s = eval_sink.done()
    truncated = sum(p.truncated for p in parts)
    stats = totals(train, eval_s, truncated) | t.mixture_stats(parts, train, labels)
    stats |= {"skipped_rows": sum(p.stats["skipped_rows"] for p in parts), "tasks": per_task}
    return Splits(train, eval_s, truncated, stats, labels if t.labelled else None, warnings,
                  {name: part for (name, _, _), part in zip(sections, parts)})


def _mixture_classes(sections: list, tokenizer: PreTrainedTokenizerBase, seed: int, task: Task) -> list[str]:
    """The label map of a classification mixture: every task's classes (or tags) together, sorted."""
    names: set[str] = set()
    for name, _, cfg in sections:
        try:
            source, rows = sampled_rows(cfg, seed, BadRows() if cfg.bad_rows == "skip" else None)
            names |= _class_set(Renderer(tokenizer, cfg, source, seed), _hub_rows(cfg, rows), cfg, task)
        except DataError as e:
            raise DataError(f"[task {name}] {e}") from None
    if len(names) < 2:
        raise DataError(f"data.tasks: {task.name.replace('_', ' ')} needs at least 2 {task.labelled}, the tasks "
                        f"have {sorted(names)}")
    return sorted(names)


def _hub_rows(data_cfg, rows: list) -> list | None:
    # A hub dataset is only read once (its sampled rows); a local file is re-read whole for its classes.
    return rows if data_cfg.path.startswith(HUB_PREFIX) else None


def _render_all(rows: list, n_eval: int | None, bad: BadRows | None, job: RenderJob, dropped: list,
                target: Target, runner=None) -> tuple:
    """Render rows in order -> (eval samples, training samples). The first n_eval good ones are eval rows
    (canonical instruction); with n_eval None (data.eval_path) the eval rows are those numbered negatively, so a
    skipped eval row never turns a training row into an eval one. A DataError skips the row under data.bad_rows:
    skip, and stops everything otherwise. A render that returns None drops the row (its line goes to `dropped`).

    `runner` renders chunks of rows elsewhere (a process pool, Ray Data) with a guess of each row's eval role (its
    position); the few rows that a skipped row moved across the eval boundary render again here, so the result is
    the same as rendering one row after the other."""
    eval_sink, train_sink = target.sink("eval"), target.sink("train")
    n_good = n_evals = 0
    for (line, row), (guess, kind, value) in zip(rows, render_rows(job, rows, n_eval, runner)):
        canonical = line < 0 if n_eval is None else n_good < n_eval
        if canonical != guess:
            kind, value = job.render_one(line, row, canonical)
        if kind == ERROR:
            if bad is None:
                raise DataError(value)
            bad.add(value)
        elif kind == DROPPED:
            dropped.append(line)
        else:
            n_good += 1
            if canonical:
                n_evals += 1
                eval_sink.add(value)
            else:
                train_sink.add(value)
    if n_eval is None:
        n_eval = n_evals
        if not n_eval:
            raise DataError("data.eval_path: no usable eval rows")
    if n_good <= n_eval:
        raise DataError(f"only {n_good} usable rows, data.eval_size={n_eval} leaves none for training")
    return eval_sink.done(), train_sink.done()


def class_names(renderer: Renderer, rows: list | None, data_cfg, task: Task) -> list[str]:
    """The label map from the data: every distinct class (or tag) in the whole file (not only the sampled
    rows), sorted."""
    names = sorted(_class_set(renderer, rows, data_cfg, task))
    if len(names) < 2:
        raise DataError(f"{renderer.source.name}: {task.name.replace('_', ' ')} needs at least 2 {task.labelled}, "
                        f"the data has {names}")
    return names


def _class_set(renderer: Renderer, rows: list | None, data_cfg, task: Task) -> set[str]:
    if rows is None:
        path = resolve_path(data_cfg.path)
        rows = read_rows(path, data_cfg.encoding, data_cfg.encoding_errors, data_cfg.split,
                         (lambda msg: None) if data_cfg.bad_rows == "skip" else None)
    names = set()
    for line, row in rows:
        try:
            names |= task.label_names(renderer, line, row)
        except DataError:
            if data_cfg.bad_rows != "skip":
                raise
    return names
