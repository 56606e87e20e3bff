"""Read what an offline W&B run logged (distune.tracking.read_offline_run), and wait until it is all written."""

from __future__ import annotations

import time
from pathlib import Path

from distune.tracking import read_offline_run as logged  # noqa: F401  (the tests' name for it)


def finished(run_dir: Path, timeout: float = 60.0) -> dict:
    """`logged(run_dir)` once every run file holds its exit record: wandb's service may still be writing the
    last blocks for a moment after `run.finish()` returns (seen under load)."""
    deadline = time.time() + timeout
    while True:
        got = logged(run_dir)
        if got["finished"] or time.time() > deadline:
            return got
        time.sleep(0.5)
