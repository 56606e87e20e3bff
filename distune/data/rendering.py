"""Rendering many rows: in chunks, with one batched tokenizer call per chunk, in this process or spread over
workers (a local process pool here; Ray Data through distune.cluster.prepare), and where the samples go (a list,
or a tokenized store).

A chunk renders in three passes: the rows once with a recording tokenizer (it notes each text to tokenize; chat
templates are rendered and kept), one tokenizer call over all the noted texts, then the rows again served from
those results. The samples equal those of rendering row by row; calls a pass cannot batch (word-level and
question/context encodings) go to the tokenizer as they come. Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from distune.data.render import Renderer
from distune.errors import DataError

SAMPLE, DROPPED, ERROR = "sample", "dropped", "error"
CHUNK_ROWS = 512  # rows per chunk: one tokenizer call each; small enough to keep workers evenly busy
_BATCHABLE = {"add_special_tokens", "truncation", "max_length"}


class _Unbatched(Exception):
    """The recording pass met a call it cannot defer; the row renders for real in the last pass."""


class BatchedTokenizer:
    """A tokenizer that serves `tok(text, ...)["input_ids"]` from one batched call per chunk (see module doc)."""

    def __init__(self, tok):
        self._tok = tok
        self._ids: dict = {}
        self._chat: dict = {}
        self.recording: set | None = None
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __len__(self) -> int:
        return len(self._tok)

    def __call__(self, text, *args, **kwargs):
        if isinstance(text, str) and not args and set(kwargs) <= _BATCHABLE:
            key = (text, tuple(sorted(kwargs.items())))
            if self.recording is not None:
                self.recording.add(key)
                return {"input_ids": []}
            ids = self._ids.get(key)
            if ids is not None:
                return {"input_ids": list(ids)}
        elif self.recording is not None:
            raise _Unbatched
        self.calls += 1
        return self._tok(text, *args, **kwargs)

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = False, **kwargs):
        if tokenize or kwargs:
            return self._tok.apply_chat_template(messages, tokenize=tokenize,
                                                 add_generation_prompt=add_generation_prompt, **kwargs)
        key = (json.dumps(messages, sort_keys=True), add_generation_prompt)
        text = self._chat.get(key)
        if text is None:
            text = self._chat[key] = self._tok.apply_chat_template(messages, tokenize=False,
                                                                   add_generation_prompt=add_generation_prompt)
        return text

    def fill(self, keys: set) -> None:
        """Tokenize the recorded texts: one call per distinct set of options (normally one)."""
        by_options: dict[tuple, list[str]] = {}
        for text, options in keys:
            by_options.setdefault(options, []).append(text)
        for options, texts in by_options.items():
            self.calls += 1
            for text, ids in zip(texts, self._tok(texts, **dict(options))["input_ids"]):
                self._ids[(text, options)] = ids

    def clear(self) -> None:
        self._ids.clear()
        self._chat.clear()


@dataclass
class RenderJob:
    """Everything a worker needs to render rows of one data source (picklable: sent once per worker)."""

    tokenizer: object
    data_cfg: object
    source: object
    seed: int
    task: str
    labels: list[str] | None
    calls: int | None = None  # tokenizer calls across all workers (chunked rendering only)

    def __post_init__(self):
        self._renderer = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state):
        self.__dict__.update(state, _renderer=None)

    @property
    def renderer(self) -> Renderer:
        if self._renderer is None:
            from distune.tasks import get_task

            self._tok = BatchedTokenizer(self.tokenizer)
            self._renderer = Renderer(self._tok, self.data_cfg, self.source, self.seed)
            self._task = get_task(self.task)
        return self._renderer

    def render_one(self, line: int, row: dict, canonical: bool) -> tuple[str, object]:
        renderer = self.renderer
        return outcome(self._task, renderer, line, row, canonical, self.labels)

    def render_chunk(self, chunk: list[tuple[int, dict, bool]]) -> tuple[list[tuple[bool, str, object]], int]:
        """[(line, row, canonical)] -> ([(canonical, kind, sample or message)], tokenizer calls)."""
        renderer = self.renderer
        tok = self._tok
        before = tok.calls
        tok.recording = set()
        try:
            for line, row, canonical in chunk:
                try:
                    self._task.render(renderer, line, row, canonical, self.labels)
                except Exception:  # fake ids can fail a check; the real pass decides
                    pass
            keys, tok.recording = tok.recording, None
            tok.fill(keys)
            out = [(canonical, *self.render_one(line, row, canonical)) for line, row, canonical in chunk]
        finally:
            tok.recording = None
            tok.clear()
        return out, tok.calls - before


def outcome(task, renderer: Renderer, line: int, row: dict, canonical: bool, labels) -> tuple[str, object]:
    """(kind, sample or message) of rendering one row."""
    try:
        sample = task.render(renderer, line, row, canonical, labels)
    except DataError as e:
        return ERROR, str(e)
    return (DROPPED, None) if sample is None else (SAMPLE, sample)


def render_rows(job: RenderJob, rows: list, n_eval: int | None, runner: Callable | None = None) -> Iterator:
    """(canonical guess, kind, value) per row, in order. Without a runner: row by row with the tokenizer as it
    is (the in-memory path); with one: in chunks through the runner."""
    if runner is None:
        renderer = Renderer(job.tokenizer, job.data_cfg, job.source, job.seed)
        from distune.tasks import get_task

        task = get_task(job.task)
        for pos, (line, row) in enumerate(rows):
            canonical = line < 0 if n_eval is None else pos < n_eval
            yield canonical, *outcome(task, renderer, line, row, canonical, job.labels)
        return
    job.calls = 0

    def chunks() -> Iterator[list]:
        for start in range(0, len(rows), CHUNK_ROWS):
            yield [(line, row, line < 0 if n_eval is None else pos < n_eval)
                   for pos, (line, row) in enumerate(rows[start:start + CHUNK_ROWS], start)]

    for results, calls in runner(job, chunks()):
        job.calls += calls
        yield from results


# -- runners: (job, chunks) -> (results, calls) per chunk, in order ------------------------------------------


def in_process(job: RenderJob, chunks: Iterable[list]) -> Iterator:
    for chunk in chunks:
        yield job.render_chunk(chunk)


_JOB: RenderJob | None = None


def _start_worker(job_bytes: bytes) -> None:
    global _JOB
    _JOB = pickle.loads(job_bytes)


def _chunk_in_worker(chunk: list):
    return _JOB.render_chunk(chunk)


SMALL = 8  # chunks: data this small renders in process (starting workers would take longer)


def small_data(chunks: Iterable[list], least: int = SMALL) -> tuple[bool, Iterable[list]]:
    """(fewer than `least` chunks?, the same chunks): looks at the first few only."""
    chunks = iter(chunks)
    head = list(itertools.islice(chunks, least))
    return len(head) < least, itertools.chain(head, chunks)


def process_pool(workers: int | None = None, least: int = SMALL) -> Callable:
    """A runner over `workers` local processes (default: every CPU); at most 2 chunks per worker in flight, so
    memory stays bounded whatever the data's size. Fewer than `least` chunks render in this process."""
    def run(job: RenderJob, chunks: Iterable[list]) -> Iterator:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        n = workers or os.cpu_count() or 1
        small, chunks = small_data(chunks, least)
        if n <= 1 or small:
            yield from in_process(job, chunks)
            return
        # spawn: the caller may hold threads (torch, gloo) that a fork would copy mid-state.
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                                 initargs=(pickle.dumps(job),)) as pool:
            pending: deque = deque()
            for chunk in chunks:
                pending.append(pool.submit(_chunk_in_worker, chunk))
                if len(pending) >= 2 * n:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    return run


# -- where samples go ----------------------------------------------------------------------------------------


class ListSink:
    def __init__(self):
        self.items: list = []

    def add(self, sample) -> None:
        self.items.append(sample)

    def done(self) -> list:
        return self.items


class Target:
    """Samples kept in memory as lists (the store's target writes them to disk instead)."""

    def sink(self, split: str) -> ListSink:
        return ListSink()

    def part(self, name: str) -> Target:
        return self

    def name_task(self, samples, name: str) -> None:
        for s in samples:
            s.task = name


def with_progress(runner: Callable, desc: str = "tokenizing") -> Callable:
    """`runner` with a progress bar over the rows it renders (one bar per data source)."""
    def run(job: RenderJob, chunks: Iterable[list]) -> Iterator:
        from tqdm import tqdm

        # delay: no bar at all for data rendered in a moment (and none before a quick one-line error)
        with tqdm(desc=desc, unit="row", dynamic_ncols=True, mininterval=1.0, delay=2.0) as bar:
            for results, calls in runner(job, chunks):
                bar.update(len(results))
                yield results, calls
    return run
