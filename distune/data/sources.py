"""Read rows from data files, each tagged with where it came from so every error can point at it.

Sources: JSONL, CSV/TSV (numbered by file line), parquet and local Hugging Face `datasets` folders (written
by `save_to_disk`; numbered by row, from 1), and hub datasets (`hf:owner/name`, loaded by `datasets` where a
network exists). Bad rows either stop the read or are skipped and counted (`data.bad_rows`).
Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from distune.errors import DataError

csv.field_size_limit(1 << 24)
_MISSING = object()  # csv restval: a row with fewer cells than the header

HUB_PREFIX = "hf:"


@dataclass
class Source:
    """A data source and how its rows are numbered: `source.at(n)` -> 'file.csv line 7' / 'x.parquet row 7'."""

    name: str
    unit: str = "line"
    eval_name: str | None = None  # data.eval_path: its rows carry negated numbers
    eval_unit: str = "line"

    def at(self, n: int) -> str:
        if n < 0 and self.eval_name is not None:
            return f"{self.eval_name} {self.eval_unit} {-n}"
        return f"{self.name} {self.unit} {n}"


@dataclass
class BadRows:
    """The `skip` policy's record: how many rows were dropped and the first few reasons."""

    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.first) < 5:
            self.first.append(message)

    def summary(self) -> str:
        more = f" (and {self.count - len(self.first)} more)" if self.count > len(self.first) else ""
        return f"skipped {self.count} bad rows: " + "; ".join(self.first) + more


def describe(path_value: str, path: Path | None) -> Source:
    if path is None:
        return Source(path_value, "row")
    return Source(str(path), "line" if path.suffix.lower() in (".jsonl", ".json", ".csv", ".tsv") else "row")


def read_rows(path: Path, encoding: str = "utf-8", errors: str = "strict", split: str = "train",
              on_bad: Callable[[str], None] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line or row number, row). A malformed row raises DataError, or goes to `on_bad` and is skipped."""
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            yield from _numbered(_load_folder(path, split))
        elif suffix in (".jsonl", ".json"):
            yield from _jsonl(path, encoding, errors, on_bad)
        elif suffix in (".csv", ".tsv"):
            yield from _csv(path, encoding, errors, "\t" if suffix == ".tsv" else ",", on_bad)
        elif suffix == ".parquet":
            yield from _numbered(_parquet(path))
        else:
            raise DataError(f"{path}: unsupported data file type {suffix!r} (use .jsonl, .csv, .tsv, .parquet, a "
                            "datasets folder written by save_to_disk, or hf:<hub id>)")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid {encoding} ({e.reason} at byte {e.start}); "
                        f"set data.encoding or data.encoding_errors: replace") from None


def read_table(path: Path, split: str = "train"):
    """A parquet file or datasets folder as one Arrow table (memory-mapped where the format allows: a datasets
    folder's Arrow files, parquet's pages read once into Arrow buffers); None for line-based files."""
    if path.is_dir():
        ds = _load_folder(path, split)
        return _dataset_table(ds)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path, memory_map=True)
        except Exception as e:  # pyarrow.lib.ArrowInvalid and friends
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
    return None


def hub_table(name: str, split: str):
    """`hf:owner/name[:config]`: a dataset from the Hugging Face hub (needs a network, or the datasets cache), as
    an Arrow table."""
    import datasets

    repo, _, config = name[len(HUB_PREFIX):].partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:  # datasets raises many types (connection, missing split, ...): one message
        raise DataError(f"data.path: cannot load {name!r} split {split!r}: {str(e).splitlines()[0]}") from None
    return _dataset_table(ds)


def _dataset_table(ds):
    if getattr(ds, "_indices", None) is not None:  # a selection over the files: the rows it names, in its order
        ds = ds.flatten_indices()
    return ds.data.table


class TableRows(Sequence):
    """(row number, row) pairs of an Arrow table in a given order, numbered from 1 (negated: `sign=-1`, an eval
    file's). Rows stay Arrow until read: iterating turns a block of them into dicts at a time, slicing is free."""

    BLOCK = 2048

    def __init__(self, table, order, sign: int = 1):
        import numpy as np

        self.table, self.order, self.sign = table, np.asarray(order, dtype=np.int64), sign

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k):
        if isinstance(k, slice):
            if k.step not in (None, 1):
                raise ValueError("TableRows: slices with a step are not supported")
            return TableRows(self.table, self.order[k], self.sign)
        i = int(self.order[k])
        return self.sign * (i + 1), self.table.slice(i, 1).to_pylist()[0]

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        for start in range(0, len(self.order), self.BLOCK):
            idx = self.order[start:start + self.BLOCK]
            yield from zip((self.sign * (idx + 1)).tolist(), self.table.take(idx).to_pylist())

    def __add__(self, other) -> Rows:
        return Rows([self, other])

    def __radd__(self, other) -> Rows:
        return Rows([other, self])


class Rows(Sequence):
    """Sequences one after the other, read in place and sliced part by part: an eval file's rows then the training
    file's, or stored splits (`train + eval` copies nothing)."""

    def __init__(self, parts: list):
        self.parts = [p for p in parts if len(p)]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, k):
        if isinstance(k, slice):
            start, stop, step = k.indices(len(self))
            if step != 1:
                raise ValueError("Rows: slices with a step are not supported")
            out = []
            for p in self.parts:
                if stop > 0 and start < len(p):
                    out.append(p[max(0, start):min(len(p), stop)])
                start, stop = start - len(p), stop - len(p)
            return Rows(out)
        if k < 0:
            k += len(self)
        for p in self.parts:
            if k < len(p):
                return p[k]
            k -= len(p)
        raise IndexError(k)

    def __iter__(self):
        for p in self.parts:
            yield from p

    def __add__(self, other) -> Rows:
        return Rows(self.parts + [other])

    def __radd__(self, other) -> Rows:
        return Rows([other] + self.parts)


def _numbered(rows) -> Iterator[tuple[int, dict]]:
    for i, row in enumerate(rows, start=1):
        yield i, dict(row)


def _load_folder(path: Path, split: str):
    import datasets

    if not any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
        raise DataError(f"{path}: a folder must be a datasets folder written by save_to_disk")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"data.split: {path} has splits {sorted(ds)}, not {split!r}")
        ds = ds[split]
    return ds


def _parquet(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow.lib.ArrowInvalid and friends
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    for batch in table.iter_batches(batch_size=4096):
        yield from batch.to_pylist()


def _jsonl(path: Path, encoding: str, errors: str, on_bad) -> Iterator[tuple[int, dict]]:
    with path.open(encoding=encoding, errors=errors) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problem = None if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg})"
            if problem:
                _bad(f"{path} line {line_no}: {problem}", on_bad)
                continue
            yield line_no, row


def _bad(message: str, on_bad) -> None:
    if on_bad is None:
        raise DataError(message + " (data.bad_rows: skip drops such rows and counts them)")
    on_bad(message)


def _lines(f, encoding: str, errors: str) -> Iterator[str]:
    # Split on b"\n" only, like editors and `sed -n`: text mode would also split on a lone "\r" inside a
    # quoted field and shift every later line number.
    for raw in f:
        yield raw.decode(encoding, errors)


def _csv(path: Path, encoding: str, errors: str, delimiter: str, on_bad) -> Iterator[tuple[int, dict]]:
    with path.open("rb") as f:
        reader = csv.DictReader(_lines(f, encoding, errors), delimiter=delimiter, restval=_MISSING)
        if not reader.fieldnames:
            raise DataError(f"{path}: empty file or no header row")
        start = 2  # line of the first data row
        for row in reader:
            cells = sum(v is not _MISSING for k, v in row.items() if k is not None) + len(row.get(None, ()))
            if cells != len(reader.fieldnames):
                _bad(f"{path} line {start}: {cells} cells, header has {len(reader.fieldnames)}", on_bad)
            else:
                yield start, row
            start = reader.line_num + 1
