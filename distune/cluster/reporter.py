"""The worker side of Ray: checkpoints reported through `ray.train.report`, progress to the driver.

Each rank writes its DeepSpeed shard into a local temp folder and reports it; Ray gathers every rank's
folder into one `step_N` checkpoint in storage and records it only once all ranks reported, so a
checkpoint Ray hands back on restart is complete (and engine.checkpoint checks the rank markers too).
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
    POLL_S = 0.5  # how often a rank asks the driver's sink whether a stop was requested

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
