"""The worker side of Ray: checkpoints reported through `ray.train.report`, progress to the driver.

Each rank writes its DeepSpeed shard into a local temp folder and reports it; every rank's files go into one
`step_N` checkpoint in the run's storage (a shared folder or an object store), each rank's marker after the rest
of its files. A resume takes the newest checkpoint whose every marker is there, listed from the storage itself.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import ray
import ray.train


@ray.remote(num_cpus=0)
class ProgressSink:
    """Holds progress events from rank 0 until the driver drains them (fire-and-forget for the worker)."""

    def __init__(self):
        self.events: list[dict] = []
        self.stop = False

    def push(self, event: dict) -> None:
        self.events.append(event)

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop

    def drain(self) -> list[dict]:
        out, self.events = self.events, []
        return out


class RayReporter:
    POLL_S = 0.2  # how often a rank asks the driver's sink whether a stop was requested (a call of ~1 ms)

    def __init__(self, sink):
        self.sink = sink
        self._stop, self._polled = False, 0.0

    def stop_requested(self) -> bool:
        """The driver got SIGTERM (a preempted head, `distune stop`, a scheduler's grace period) and asked
        for a checkpoint. Polled at most every POLL_S; the loop all-reduces the answer, so ranks agree."""
        now = time.monotonic()
        if self.sink is not None and not self._stop and now - self._polled >= self.POLL_S:
            self._polled = now
            self._stop = bool(ray.get(self.sink.stop_requested.remote()))
        return self._stop

    @contextlib.contextmanager
    def restore(self) -> Iterator[Path | None]:
        """The newest checkpoint in the run's storage that every rank finished writing. Found by listing the
        storage, not from Ray's record alone: that record is missing when the run is resumed by another launcher,
        and may name a checkpoint whose save failed half-way."""
        from distune.rundir import latest_complete, step_names

        store = _run_store()
        name = latest_complete(store)
        if name is None:
            yield None
            return
        newer = [n for n in step_names(store) if int(n[5:]) > int(name[5:])]
        if newer and ray.train.get_context().get_world_rank() == 0:
            self.progress({"kind": "info", "text": f"{', '.join(newer)} in {store} never finished writing: "
                                                   f"resuming from {name}"})
        checkpoint = ray.train.Checkpoint(filesystem=store.fs or _local_fs(), path=f"{store.root}/{name}")
        with checkpoint.as_directory() as d:
            yield Path(d)

    def checkpoint(self, step: int, metrics: dict, write: Callable[[Path], None]) -> None:
        """This rank's part goes to a local temp folder, then into the run's storage through Ray; its marker
        (`complete_rank{r}`) follows the rest of its files (`_upload`), so a copy cut short leaves a folder that
        does not look complete. Any OSError on the way is one CheckpointWriteError."""
        from distune.reporting import CheckpointWriteError

        world = ray.train.get_context().get_world_size()
        tmp = Path(tempfile.mkdtemp(prefix=f"distune-step{step}-"))
        where = tmp
        try:
            write(tmp)
            where = _run_store()
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=f"step_{step}", checkpoint_upload_fn=_upload)
        except (OSError, RuntimeError) as e:
            if not CheckpointWriteError.failed_write(e, tmp):
                raise
            raise CheckpointWriteError.of(step, where, e, tmp, world) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def progress(self, event: dict) -> None:
        if self.sink is not None:
            self.sink.push.remote(event)  # not awaited: progress must never slow a step


def _local_fs():
    import pyarrow.fs

    return pyarrow.fs.LocalFileSystem()


def _run_store():
    """The run directory in Ray Train's storage (RunConfig's storage_path / name), as a RunStore."""
    from distune.storage import RunStore

    storage = ray.train.get_context().get_storage()
    return RunStore.on(storage.storage_filesystem, storage.experiment_fs_path)


def _upload(checkpoint, dir_name: str):
    """Ray's checkpoint_upload_fn: this rank's files, then its marker, into storage's `dir_name`."""
    from distune.storage import upload

    storage = ray.train.get_context().get_storage()
    fs, dest = storage.storage_filesystem, storage.build_checkpoint_path_from_name(dir_name)
    local = Path(checkpoint.path)
    upload(local, fs, dest, skip=lambda name: name.startswith("complete_rank"))
    for marker in sorted(local.glob("complete_rank*")):
        with fs.open_output_stream(f"{dest}/{marker.name}") as f:
            f.write(marker.read_bytes())
    return ray.train.Checkpoint(filesystem=fs, path=dest)
