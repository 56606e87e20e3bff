"""The worker side of Ray: checkpoints reported through `ray.train.report`, progress to the driver.

Each rank writes its DeepSpeed shard into a local temp folder and reports it; Ray gathers every rank's
folder into one `step_N` checkpoint in storage and records it only once all ranks reported, so a
checkpoint Ray hands back on restart is complete (and engine.checkpoint checks the rank markers too).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import ray
import ray.train


@ray.remote(num_cpus=0)
class ProgressSink:
    """Holds progress events from rank 0 until the driver drains them (fire-and-forget for the worker)."""

    def __init__(self):
        self.events: list[dict] = []

    def push(self, event: dict) -> None:
        self.events.append(event)

    def drain(self) -> list[dict]:
        out, self.events = self.events, []
        return out


class RayReporter:
    def __init__(self, sink):
        self.sink = sink

    @contextlib.contextmanager
    def restore(self) -> Iterator[Path | None]:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def checkpoint(self, step: int, metrics: dict, write: Callable[[Path], None]) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f"distune-step{step}-"))
        try:
            write(tmp)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=f"step_{step}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def progress(self, event: dict) -> None:
        if self.sink is not None:
            self.sink.push.remote(event)  # not awaited: progress must never slow a step
