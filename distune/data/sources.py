"""Read rows from JSONL / CSV files, each tagged with its line number so errors can point at it.

Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

csv.field_size_limit(1 << 24)


class DataError(ValueError):
    """A data problem, naming the file and line."""


def read_rows(path: Path, encoding: str = "utf-8", errors: str = "strict") -> Iterator[tuple[int, dict]]:
    """Yield (line_number, row). JSONL rows must be objects; CSV rows are keyed by the header."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            yield from _jsonl(path, encoding, errors)
        elif suffix in (".csv", ".tsv"):
            yield from _csv(path, encoding, errors, delimiter="\t" if suffix == ".tsv" else ",")
        else:
            raise DataError(f"{path}: unsupported data file type {suffix!r} (use .jsonl, .csv or .tsv)")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid {encoding} ({e.reason} at byte {e.start}); "
                        f"set data.encoding or data.encoding_errors: replace") from None


def _jsonl(path: Path, encoding: str, errors: str) -> Iterator[tuple[int, dict]]:
    with path.open(encoding=encoding, errors=errors) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {line_no}: expected a JSON object, got {type(row).__name__}")
            yield line_no, row


def _lines(f, encoding: str, errors: str) -> Iterator[str]:
    # Split on b"\n" only, like editors and `sed -n`: text mode would also split on a lone "\r" inside a
    # quoted field and shift every later line number.
    for raw in f:
        yield raw.decode(encoding, errors)


def _csv(path: Path, encoding: str, errors: str, delimiter: str) -> Iterator[tuple[int, dict]]:
    with path.open("rb") as f:
        reader = csv.DictReader(_lines(f, encoding, errors), delimiter=delimiter)
        if not reader.fieldnames:
            raise DataError(f"{path}: empty file or no header row")
        start = 2  # line of the first data row
        for row in reader:
            if None in row:  # more cells than header columns
                raise DataError(f"{path} line {start}: {len(row) - 1 + len(row[None])} cells, header has "
                                f"{len(reader.fieldnames)}")
            yield start, row
            start = reader.line_num + 1
