"""The prepare step: a config's data rendered once into a tokenized store (distune.data.store), and opened again
as splits whose samples are read through memory maps.

`splits_for(cfg, tokenizer)` is what every reader calls: the store's splits when data.store is on (built first
when missing), else the in-memory splits of load_splits. Rendering runs in chunks through a runner: a local
process pool by default; Ray Data on a cluster (distune.cluster.prepare). Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from distune.data.dataset import Splits, _mixture, _one_source, load_splits
from distune.data.loader import pack_groups
from distune.data.rendering import ListSink, Target, process_pool
from distune.data.sources import HUB_PREFIX
from distune.data.store import FORMAT, SplitWriter, StoredSamples, complete, publish, read_meta, write_groups
from distune.paths import cache_root, resolve_path

FLUSH = 1024  # samples buffered per column write


class StoreSink(ListSink):
    def __init__(self, folder: Path):
        super().__init__()
        self.writer = SplitWriter(folder)

    def add(self, sample) -> None:
        self.items.append(sample)
        if len(self.items) >= FLUSH:
            self.writer.add(self.items)
            self.items = []

    def done(self) -> StoredSamples:
        self.writer.add(self.items)
        self.items = []
        return StoredSamples(self.writer.folder, self.writer.close())


class StoreTarget(Target):
    """Samples written to a store folder as they are rendered; the splits read them back from it."""

    def __init__(self, folder: Path):
        self.folder = folder

    def sink(self, split: str) -> StoreSink:
        return StoreSink(self.folder / split)

    def part(self, name: str) -> StoreTarget:
        return StoreTarget(self.folder / "tasks" / name)

    def name_task(self, samples: StoredSamples, name: str) -> None:
        samples.task = name


# -- the key ---------------------------------------------------------------------------------------------------


def fingerprint(cfg, tokenizer) -> dict:
    """Everything that changes the store's content."""
    data = cfg.data
    sections = data.task_sections() if data.tasks else [("", 1.0, data)]
    files = {}
    for _, _, section in sections:
        for value in (section.path, section.eval_path):
            if value and value not in files:
                files[value] = _file_identity(value)
    try:
        distune_version = version("distune")
    except PackageNotFoundError:
        distune_version = "source"
    return {"format": FORMAT, "distune": distune_version, "task": cfg.model.task, "seed": cfg.run.seed,
            "choices": cfg.eval.choices, "data": data.model_dump(mode="json", exclude={"store", "store_dir"}),
            "files": files, "tokenizer": tokenizer_fingerprint(tokenizer)}


def _file_identity(value: str):
    if value.startswith(HUB_PREFIX):
        return value  # a hub dataset: its name (a new revision needs data.store_dir or a new store key by hand)
    path = resolve_path(value)
    if not path.exists():
        return None
    found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in found]


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Without the truncation / padding state, which a call with truncation=True leaves behind.
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def store_path(cfg, tokenizer) -> Path:
    key = hashlib.sha256(json.dumps(fingerprint(cfg, tokenizer), sort_keys=True).encode()).hexdigest()[:24]
    root = Path(cfg.data.store_dir) if cfg.data.store_dir else cache_root() / "data"
    return root / key


# -- build and open ------------------------------------------------------------------------------------------


def prepare(cfg, tokenizer, runner=None, path: Path | None = None, force: bool = False) -> Path:
    """Build the store of `cfg`'s data (unless complete, or `force`) and return its folder. `runner` renders the
    chunks (default: a process pool over this machine's CPUs)."""
    path = path or store_path(cfg, tokenizer)
    if complete(path) and not force:
        return path
    _clear_abandoned(path)
    tmp = path.parent / f".{path.name}.{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    began = time.perf_counter()
    try:
        runner = runner or process_pool()
        target = StoreTarget(tmp)
        if cfg.data.tasks:
            splits = _mixture(cfg.data, tokenizer, cfg.run.seed, cfg.eval.choices, cfg.model.task, target, runner)
        else:
            splits = _one_source(cfg.data, tokenizer, cfg.run.seed, cfg.eval.choices, cfg.model.task, None, target,
                                 runner)
        if cfg.data.packing:
            for train in _trains(splits):
                write_groups(train.folder, pack_groups(train.lengths.tolist(), cfg.data.max_length))
        meta = {"format": FORMAT, "key": path.name, "fingerprint": fingerprint(cfg, tokenizer),
                "seconds": round(time.perf_counter() - began, 2), "splits": _tree(splits, tmp)}
        if force and complete(path):
            shutil.rmtree(path)
        return publish(tmp, path, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _clear_abandoned(path: Path) -> None:
    """Remove the half-written folders of this store that a killed prepare on this machine left behind."""
    host = socket.gethostname()
    for tmp in path.parent.glob(f".{path.name}.{host}-*"):
        try:
            pid = int(tmp.name[len(f".{path.name}.{host}-"):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def _trains(splits: Splits):
    yield splits.train
    for part in splits.tasks.values():
        yield from _trains(part)


def _tree(splits: Splits, root: Path) -> dict:
    def ref(view: StoredSamples) -> dict:
        return {"dir": str(view.folder.relative_to(root)), **view.info}

    return {"train": ref(splits.train), "eval": ref(splits.eval), "truncated": splits.truncated,
            "stats": splits.stats, "labels": splits.labels, "warnings": splits.warnings,
            "tasks": {name: _tree(part, root) for name, part in splits.tasks.items()}}


def open_splits(path: Path) -> Splits:
    """The splits of a complete store, read through memory maps."""
    return _open(read_meta(path)["splits"], Path(path), None)


def _open(tree: dict, root: Path, task: str | None) -> Splits:
    train = StoredSamples(root / tree["train"]["dir"], tree["train"], task)
    eval_s = StoredSamples(root / tree["eval"]["dir"], tree["eval"], task)
    return Splits(train, eval_s, tree["truncated"], tree["stats"], tree["labels"], list(tree["warnings"]),
                  {name: _open(part, root, name) for name, part in tree["tasks"].items()})


def splits_for(cfg, tokenizer, runner=None, build: bool = True, path: Path | None = None) -> Splits:
    """The training and eval splits every reader uses: from the store at `path` (default: the config's; built here
    when missing and `build`), or with data.store off, rendered in memory by load_splits."""
    if not cfg.data.store:
        return load_splits(cfg.data, tokenizer, cfg.run.seed, cfg.eval.choices, cfg.model.task)
    path = path or store_path(cfg, tokenizer)
    if not complete(path):
        if not build:
            raise FileNotFoundError(f"no tokenized store at {path}")
        prepare(cfg, tokenizer, runner, path)
    return open_splits(path)
