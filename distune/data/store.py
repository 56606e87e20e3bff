"""The tokenized store: the rendered samples of a config's data, written once, memory-mapped by every rank.

One folder per store, named by a hash of everything that changes the tokens (data files and their sizes and
mtimes, the data section, the tokenizer with its chat template, the task, the seed); `meta.json` is written last
and the folder appears by one rename, so a store is complete exactly when it exists. Layout:

    meta.json                    counts, stats, warnings, labels, the sample type, each split's columns
    train/ eval/                 one split each: per sample-field column files (below)
    train/packed.*               with data.packing: the packed rows (indices into train), computed once here
    tasks/<name>/train, eval     with data.tasks: each task's own splits (the mixture's train is train/)

A column follows its field's annotation in the task's sample dataclass: `list[int]` fields are ragged int32
(`<f>.values` + `<f>.offsets` int64 [n+1], `<f>.nulls` where the field may be None), `int` fields int64, anything
else (strings, answer spans) pickled per sample (`<f>.bytes` + `<f>.offsets`, empty for None). Raw
little-endian arrays, read with numpy.memmap: a rank touches only the pages of the samples it reads.
Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import os
import pickle
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from distune.data.sources import Rows
from distune.mapped import Maps

FORMAT = 1
INT_LIST, INT, OBJECT = "ints", "int", "object"


def _kind(annotation: str) -> tuple[str, bool]:
    """(column kind, may be None) from a dataclass field's annotation (a string: modules use postponed
    annotations)."""
    text = str(annotation).replace(" ", "")
    nullable = "None" in text.split("|")
    core = "|".join(p for p in text.split("|") if p != "None")
    if core in ("list[int]", "List[int]"):
        return INT_LIST, nullable
    if core == "int" and not nullable:
        return INT, False
    return OBJECT, True


def sample_type_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def sample_type(name: str) -> type:
    module, _, qual = name.partition(":")
    return getattr(importlib.import_module(module), qual)


class SplitWriter:
    """Appends samples of one split to its column files (under a folder that is renamed into place later)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.cls: type | None = None
        self.columns: dict[str, tuple[str, bool]] = {}
        self.files: dict[str, object] = {}
        self.ends: dict[str, int] = {}
        self.count = 0

    def _open(self, cls: type) -> None:
        self.cls = cls
        for f in dataclasses.fields(cls):
            kind, nullable = _kind(f.type)
            self.columns[f.name] = (kind, nullable)
            names = {INT_LIST: ["values", "offsets"] + (["nulls"] if nullable else []), INT: ["values"],
                     OBJECT: ["bytes", "offsets"]}[kind]
            for part in names:
                self.files[f"{f.name}.{part}"] = open(self.folder / f"{f.name}.{part}", "wb")
            if kind != INT:
                self.ends[f.name] = 0
                self.files[f"{f.name}.offsets"].write(np.zeros(1, np.int64).tobytes())

    def add(self, samples: Sequence) -> None:
        if not samples:
            return
        if self.cls is None:
            self._open(type(samples[0]))
        for name, (kind, nullable) in self.columns.items():
            values = [getattr(s, name) for s in samples]
            if kind == INT:
                self.files[f"{name}.values"].write(np.asarray(values, np.int64).tobytes())
                continue
            if kind == INT_LIST:
                if nullable:
                    self.files[f"{name}.nulls"].write(np.asarray([v is None for v in values], np.uint8).tobytes())
                lists = [v or [] for v in values]
                flat = np.fromiter(itertools.chain.from_iterable(lists), np.int64, sum(map(len, lists)))
                if flat.size and (flat.min() < -2**31 or flat.max() >= 2**31):
                    raise ValueError(f"{name}: a value does not fit int32")
                self.files[f"{name}.values"].write(flat.astype(np.int32).tobytes())
                lengths = [len(v) for v in lists]
            else:
                blobs = [b"" if v is None else pickle.dumps(v, protocol=5) for v in values]
                self.files[f"{name}.bytes"].write(b"".join(blobs))
                lengths = [len(b) for b in blobs]
            ends = self.ends[name] + np.cumsum(lengths, dtype=np.int64)
            self.ends[name] = int(ends[-1])
            self.files[f"{name}.offsets"].write(ends.tobytes())
        self.count += len(samples)

    def close(self, extra: dict | None = None) -> dict:
        for f in self.files.values():
            f.close()
        return {"count": self.count, "sample": sample_type_name(self.cls) if self.cls else None,
                "columns": {k: list(v) for k, v in self.columns.items()}, **(extra or {})}


class StoredSamples(Sequence):
    """One split of a store, read through memory maps: `view[i]` builds the i-th sample (the task's own sample
    type, equal to the one rendered) from its rows only. `lengths` and `lines` are arrays, read without building
    samples. `attach(fn)` adds per-sample extras at read time (`fn(i, sample) -> dict`), e.g. cached teacher rows."""

    def __init__(self, folder: Path, info: dict, task: str | None = None):
        self.folder, self.info, self.n = folder, info, info["count"]
        self.cls = sample_type(info["sample"]) if info["sample"] else None
        self.columns = {k: tuple(v) for k, v in info["columns"].items()}
        self._maps: dict[str, np.ndarray] = {}
        self._files = Maps()
        self.task = task  # data.tasks: the task these samples came from (set on each sample read)
        self._extras: Callable | None = None
        self._read: list | None = None

    def _map(self, name: str, dtype) -> np.ndarray:
        m = self._maps.get(name)
        if m is None:
            path = self.folder / name
            if self.n == 0 and not path.exists():  # an empty split has no column files
                return np.zeros(1 if name.endswith(".offsets") else 0, dtype)
            m = self._maps[name] = self._files.open(path, dtype)
        return m

    def release(self) -> None:
        """Let go of the pages read so far (distune.mapped), the attached extras' too (e.g. a teacher cache's)."""
        self._files.release()
        getattr(self._extras, "release", lambda: None)()

    def __getstate__(self) -> dict:  # a copy in another process maps the files again
        return {**self.__dict__, "_maps": {}, "_read": None, "_files": Maps()}

    def _readers(self) -> list:
        """(name, fn(i) -> value) per column, bound to its arrays once."""
        readers = []
        for name, (kind, nullable) in self.columns.items():
            if kind == INT:
                values = self._map(f"{name}.values", np.int64)
                readers.append((name, lambda i, v=values: int(v[i])))
                continue
            off = self._map(f"{name}.offsets", np.int64)
            if kind == INT_LIST:
                values = self._map(f"{name}.values", np.int32)
                nulls = self._map(f"{name}.nulls", np.uint8) if nullable else None
                readers.append((name, lambda i, o=off, v=values, z=nulls: None if z is not None and z[i]
                                else v[o[i]:o[i + 1]].tolist()))
            else:
                blob = self._map(f"{name}.bytes", np.uint8)
                readers.append((name, lambda i, o=off, b=blob: pickle.loads(b[o[i]:o[i + 1]].tobytes())
                                if o[i + 1] > o[i] else None))
        return readers

    def __len__(self) -> int:
        return self.n

    @property
    def lengths(self) -> np.ndarray:
        off = self._map("input_ids.offsets", np.int64)
        return np.diff(off)

    def ragged(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(values, offsets [n+1]) of a list-of-ints column (None entries are empty)."""
        if self.n == 0:
            return np.zeros(0, np.int32), np.zeros(1, np.int64)
        if self.columns[name][0] != INT_LIST:
            raise ValueError(f"{name}: not a list-of-ints column")
        return self._map(f"{name}.values", np.int32), self._map(f"{name}.offsets", np.int64)

    @property
    def lines(self) -> np.ndarray:
        return self._map("line.values", np.int64)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        if self._read is None:
            self._read = self._readers()
        sample = self.cls(**{name: read(i) for name, read in self._read})
        if self.task is not None and hasattr(sample, "task"):
            sample.task = self.task
        if self._extras is not None:
            sample.extras = self._extras(i, sample)
        return sample

    def __iter__(self) -> Iterator:
        return (self[i] for i in range(self.n))

    def __add__(self, other) -> Rows:
        return Rows([self, other])

    def __radd__(self, other) -> Rows:
        return Rows([other, self])

    def attach(self, fn: Callable | None) -> None:
        self._extras = fn

    def packed_groups(self) -> list[list[int]] | None:
        """The packed rows written by the prepare step (indices into this split), or None."""
        if not (self.folder / "packed.offsets").exists():
            return None
        off = self._map("packed.offsets", np.int64)
        values = self._map("packed.values", np.int64)
        return [values[off[j]:off[j + 1]].tolist() for j in range(len(off) - 1)]


def write_groups(folder: Path, groups: list[list[int]]) -> None:
    ends = np.cumsum([len(g) for g in groups], dtype=np.int64)
    with open(folder / "packed.offsets", "wb") as f:
        f.write(np.zeros(1, np.int64).tobytes() + ends.tobytes())
    with open(folder / "packed.values", "wb") as f:
        f.write(np.fromiter((i for g in groups for i in g), np.int64, int(ends[-1]) if len(ends) else 0).tobytes())


def publish(tmp: Path, final: Path, meta: dict) -> Path:
    """meta.json last, then one rename: readers see no store or a whole one. A store another process
    published first (same key, same content) wins; ours is dropped."""
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if not complete(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def complete(folder: Path) -> bool:
    return (Path(folder) / "meta.json").is_file()


def read_meta(folder: Path) -> dict:
    meta = json.loads((Path(folder) / "meta.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder}: tokenized store format {meta.get('format')}, this distune reads {FORMAT}; "
                         "delete it to have it rebuilt")
    return meta
