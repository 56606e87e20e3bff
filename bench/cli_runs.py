"""Runs of the real `distune` CLI for the benchmarks: one subprocess per step, its output in a log file."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], log: Path) -> float:
    """`python -m distune ARGS --no-progress` from the repository root; wall seconds; exits on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "distune", *args, "--no-progress"], stdout=f,
                              stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"distune {' '.join(args)} failed ({proc.returncode}); see {log}")
    return time.perf_counter() - t0
