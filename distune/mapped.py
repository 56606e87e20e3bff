"""Read-only memory maps that a training rank reads at random and lets go of.

A rank reads its samples (and their teacher-cache rows) in a shuffled order from files of many gigabytes. Two things
keep its resident memory to the pages it is reading: MADV_RANDOM (no read-ahead, and no fault-around, which would map
up to 16 neighbouring pages on every read), and `release()`, which unmaps what was read (MADV_DONTNEED on a shared
read-only map: the pages stay in the page cache for the next read, they only leave this process's RSS). Imports
neither ray nor deepspeed.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np


class Maps:
    """The maps of one reader (a stored split, a cache's shards)."""

    def __init__(self):
        self._maps: list[mmap.mmap] = []

    def open(self, path: Path, dtype) -> np.ndarray:
        """`path` as a read-only 1-D array (a plain ndarray: slicing a np.memmap costs several times more)."""
        if Path(path).stat().st_size == 0:  # numpy cannot map an empty file
            return np.zeros(0, dtype)
        m = np.memmap(path, dtype=dtype, mode="r")
        raw = getattr(m, "_mmap", None)
        if raw is not None:
            if hasattr(mmap, "MADV_RANDOM"):
                raw.madvise(mmap.MADV_RANDOM)
            self._maps.append(raw)
        return m.view(np.ndarray)

    def release(self) -> None:
        """Drop every page read so far from this process's resident set (they stay cached by the kernel)."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for raw in self._maps:
            try:
                raw.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):  # closed, or a platform that refuses it: nothing to release
                pass
