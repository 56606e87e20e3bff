"""Where a run's durable files live: a local (or shared) folder, or an object store.

`run.output_dir` may be a path or a URI that pyarrow opens (`s3://bucket/runs`, `gs://bucket/runs`, `hdfs://...`),
the same storage Ray Train writes checkpoints to. A `RunStore` is one run's directory there: the recorded
config, the W&B run id, results, the export and the checkpoints. Credentials and endpoints come from the
environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS), set on
every node, never in a config; a URI may carry non-secret options (`s3://b/runs?region=eu-west-1`).

What is complete says so last: a checkpoint by its ranks' `complete_rank{r}` markers (written after the rank's
files are in the store), a folder published here by `DONE` (written after every other file). An object store has
no atomic rename; a reader that finds no marker treats the folder as absent. Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from distune.paths import write_atomic

DONE = "DONE"  # written last into a folder published to an object store


def is_uri(location: str) -> bool:
    return "://" in str(location)


def filesystem(location: str, key: str = "run.output_dir"):
    """(pyarrow filesystem, path inside it) for a URI; ConfigError naming `key` when pyarrow cannot open it."""
    import pyarrow.fs

    from distune.errors import ConfigError

    try:
        return pyarrow.fs.FileSystem.from_uri(location)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError, ValueError) as e:
        scheme = urlsplit(location).scheme
        raise ConfigError(f"{key}: {location}: cannot open {scheme}:// storage ({str(e).splitlines()[0]})") from None


def strip_options(location: str) -> str:
    """The URI without its query (`?endpoint_override=...`): for messages and for joining paths."""
    return location.split("?", 1)[0]


def join(location: str, *parts: str) -> str:
    """`location`/parts, keeping a URI's query options at the end."""
    base, sep, query = location.partition("?")
    joined = "/".join([base.rstrip("/"), *parts]) if is_uri(base) else str(Path(base, *parts))
    return joined + sep + query


class RunStore:
    """One run directory, local or in an object store."""

    def __init__(self, location: str):
        self.location = location
        self.remote = is_uri(location)
        if self.remote:
            self.fs, self.root = filesystem(location)
        else:
            self.fs, self.root = None, str(location)

    @classmethod
    def on(cls, fs, root: str) -> RunStore:
        """A run directory at `root` on an open pyarrow filesystem (Ray Train's storage, on a worker)."""
        import pyarrow.fs

        local = isinstance(fs, pyarrow.fs.LocalFileSystem)
        store = cls.__new__(cls)
        store.location, store.remote = (root if local else f"{fs.type_name}://{root}"), not local
        store.fs, store.root = (None if local else fs), root
        return store

    def __str__(self) -> str:
        return strip_options(self.location)

    def _path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    # ---------------------------------------------------------------------------------------------- files

    def read_text(self, rel: str) -> str | None:
        if not self.remote:
            p = Path(self.root, rel)
            return p.read_text() if p.is_file() else None
        import pyarrow.fs

        if self.fs.get_file_info(self._path(rel)).type != pyarrow.fs.FileType.File:
            return None
        with self.fs.open_input_stream(self._path(rel)) as f:
            return f.read().decode()

    def write_text(self, rel: str, text: str) -> None:
        """Atomically: the old content or the new, never half (a local temp file renamed into place; one object
        PUT)."""
        if not self.remote:
            write_atomic(Path(self.root, rel), text)
            return
        with self.fs.open_output_stream(self._path(rel)) as f:
            f.write(text.encode())

    def exists(self, rel: str) -> bool:
        if not self.remote:
            return Path(self.root, rel).exists()
        import pyarrow.fs

        return self.fs.get_file_info(self._path(rel)).type != pyarrow.fs.FileType.NotFound

    def names(self, rel: str = "") -> list[str]:
        """The entries directly under `rel` (none if it does not exist)."""
        if not self.remote:
            p = Path(self.root, rel)
            return sorted(c.name for c in p.iterdir()) if p.is_dir() else []
        import pyarrow.fs

        selector = pyarrow.fs.FileSelector(self._path(rel), allow_not_found=True)
        return sorted(Path(info.path).name for info in self.fs.get_file_info(selector))

    # -------------------------------------------------------------------------------------------- folders

    def staging(self, rel: str) -> Path:
        """A new empty local folder to write what `publish(folder, rel)` will put at `rel` (next to it when local,
        so that publishing is a rename)."""
        if self.remote:
            return Path(tempfile.mkdtemp(prefix=f"distune-{Path(rel).name}-"))
        target = Path(self.root, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))

    def publish(self, staged: Path, rel: str) -> str:
        """Put the folder `staged` (from `staging(rel)`, consumed) at `rel`, replacing what was there; a reader sees
        it complete or not at all: a rename when local; in an object store, `DONE` is written after every other file
        (and removed first when replacing). Returns where it went."""
        try:
            if not self.remote:
                target = Path(self.root, rel)
                old = target.with_name(f".old-{target.name}")
                if target.exists():
                    shutil.rmtree(old, ignore_errors=True)
                    target.rename(old)
                staged.rename(target)
                shutil.rmtree(old, ignore_errors=True)
                return str(target)
            dest = self._path(rel)
            self.delete(f"{rel}/{DONE}")  # from here on the old copy reads as absent
            if self.exists(rel):
                self.fs.delete_dir_contents(dest, missing_dir_ok=True)
            upload(staged, self.fs, dest)
            with self.fs.open_output_stream(f"{dest}/{DONE}") as f:
                f.write(b"ok")
            return join(strip_options(self.location), rel)
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def delete(self, rel: str) -> None:
        """Remove the file `rel` (none there: nothing to do)."""
        if not self.remote:
            Path(self.root, rel).unlink(missing_ok=True)
        elif self.exists(rel):
            self.fs.delete_file(self._path(rel))

    def clear(self) -> None:
        """Remove the whole run directory (a pipeline stage that starts over)."""
        if not self.remote:
            shutil.rmtree(self.root, ignore_errors=True)
        elif self.exists(""):
            self.fs.delete_dir_contents(self.root, missing_dir_ok=True)

    def size(self, rel: str) -> int:
        """Bytes of every file under the folder `rel`."""
        if not self.remote:
            return sum(f.stat().st_size for f in Path(self.root, rel).rglob("*") if f.is_file())
        import pyarrow.fs

        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self._path(rel), recursive=True, allow_not_found=True))
        return sum(i.size or 0 for i in infos if i.type == pyarrow.fs.FileType.File)


def upload(local: Path, fs, dest: str, skip=lambda name: False) -> None:
    """Every file under `local` to `dest` on `fs` (a pyarrow filesystem), but those whose name `skip`s."""
    import pyarrow.fs

    here = pyarrow.fs.LocalFileSystem()
    fs.create_dir(dest, recursive=True)
    for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        if skip(path.name):
            continue
        target = f"{dest}/{path.relative_to(local).as_posix()}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pyarrow.fs.copy_files(str(path), target, source_filesystem=here, destination_filesystem=fs)


def checkpoint_complete(store: RunStore, rel: str) -> bool:
    """A checkpoint folder holds meta.json and every rank's marker (engine.checkpoint writes both)."""
    import json

    meta = store.read_text(f"{rel}/meta.json")
    if meta is None:
        return False
    names = set(store.names(rel))
    return all(f"complete_rank{r}" in names for r in range(json.loads(meta)["world_size"]))
