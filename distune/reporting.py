"""How a worker talks to whatever launched it: checkpoints, progress, results.

`Reporter` is the seam between the per-rank program and the launcher. `LocalReporter` serves plain
processes (single process or torchrun): checkpoints go to `<run_dir>/checkpoints/step_N`, published by
an atomic rename once every rank has written. The Ray implementation lives in distune.cluster.
Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch.distributed as dist


class Reporter(Protocol):
    def restore(self) -> contextlib.AbstractContextManager[Path | None]:
        """Context giving the latest complete checkpoint directory, or None for a fresh start."""

    def checkpoint(self, step: int, metrics: dict, write: Callable[[Path], None]) -> None:
        """Collective: every rank calls it; `write(dir)` writes this rank's part of the checkpoint."""

    def progress(self, event: dict) -> None:
        """Rank 0: a step or eval event for the user's terminal ({'kind': 'step'|'eval'|'info', ...})."""

    def stop_requested(self) -> bool:
        """Has this process been asked to stop (SIGTERM, preemption, the driver)? Cheap: called every step;
        the loop agrees on it across ranks, then checkpoints and returns."""


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, a lost connection to the store): one line for the user. The
    checkpoint before it stays the one a resume takes."""

    @classmethod
    def failed_write(cls, error: Exception, folder: Path) -> bool:
        """`error` is a write that failed for lack of space or I/O: an OSError, or a RuntimeError from torch.save
        ("iostream error", "unexpected pos") on a filesystem with (almost) no room left."""
        if isinstance(error, OSError):
            return True
        try:
            return isinstance(error, RuntimeError) and shutil.disk_usage(folder).free < 64 * 2**20
        except OSError:
            return False

    @classmethod
    def of(cls, step: int, where, error: Exception, part: Path | None, world: int) -> CheckpointWriteError:
        size = sum(f.stat().st_size for f in part.rglob("*") if f.is_file()) if part is not None and part.exists() \
            else 0
        need = (f"; this rank's part is {mib(size)}, the checkpoint about {mib(size * world)}: free that much there "
                f"(checkpoint.keep older ones are kept beside it), or set another run.output_dir") if size else ""
        why = getattr(error, "strerror", None) or (str(error) if isinstance(error, OSError) else "No space left on device")
        return cls(f"checkpoint step_{step}: writing to {where} failed: {why}{need}")


def checkpoint_dirs(root: Path) -> list[Path]:
    """Published local checkpoints, oldest first (temp dirs start with '.' and are never listed)."""
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


class LocalReporter:
    def __init__(self, run_dir: Path, keep: int, rank: int, show_progress: bool = True, catch_sigterm: bool = False):
        self.root = run_dir / "checkpoints"
        self.keep, self.rank = keep, rank
        self._bar = None
        self._show = show_progress and rank == 0
        self._stop = False
        if catch_sigterm and threading.current_thread() is threading.main_thread():
            # torchrun forwards SIGTERM to every rank (preemption, a scheduler's grace period): checkpoint
            # at the next step boundary instead of dying mid-step. Only the rank's own program asks for it:
            # a library caller (a test process) keeps its own SIGTERM behaviour.
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop

    @contextlib.contextmanager
    def restore(self) -> Iterator[Path | None]:
        dirs = checkpoint_dirs(self.root)
        yield dirs[-1] if dirs else None

    def checkpoint(self, step: int, metrics: dict, write: Callable[[Path], None]) -> None:
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp-step_{step}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that was killed
            tmp.mkdir(parents=True)
        dist.barrier()
        try:
            write(tmp)
        except (OSError, RuntimeError) as e:  # the other ranks are writing too: they fail alike or finish
            if not CheckpointWriteError.failed_write(e, tmp):
                raise
            raise CheckpointWriteError.of(step, self.root, e, tmp, dist.get_world_size()) from None
        dist.barrier()  # every rank has written its part
        if self.rank == 0:
            if final.exists():  # same step saved before (e.g. a re-run): the new one replaces it
                shutil.rmtree(final)
            tmp.rename(final)
            for old in checkpoint_dirs(self.root)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def close(self) -> None:
        """End the progress bar (before a last message)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def progress(self, event: dict) -> None:
        if not self._show:
            return
        from distune.progress import ProgressPrinter

        if self._bar is None:
            self._bar = ProgressPrinter()
        self._bar.handle(event)
        if event.get("kind") == "done":
            self._bar.close()
            sys.stdout.flush()
