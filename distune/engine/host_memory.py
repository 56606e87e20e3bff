"""Host memory that ZeRO-3 or gradient checkpointing frees goes back to the OS (glibc; elsewhere a no-op).

ZeRO-3 allocates every gathered parameter whole for a moment and frees it again, many times a step. glibc serves
allocations under its mmap threshold from the heap, and the heap it frees stays resident (a thread's arena, and
Ray Train trains in a thread, gives back only its top). The threshold starts at
128 KiB and rises with every large free up to 32 MiB, so after the first gathers every weight under 32 MiB
(a 2048x2048 fp32 projection is 16 MiB) comes from the heap: a 1.17B LoRA run at ZeRO-3 on 2 CPU ranks grew by
0.4-1.0 GB per step for its first steps this way (bench/sharded_load.py). A fixed 1 MiB threshold (fixed: glibc
then stops raising it) maps each such tensor on its own and unmaps it when freed.

Gradient checkpointing on CPU workers frees the same way: backward recomputes each block's activations and frees
them block by block (a 4 x 768 x 576 fp32 hidden state is 7 MiB), and the fragmented heap they leave behind kept
most of what checkpointing saves. The fixed threshold costs page faults on fresh mappings, so steps run slower;
bench/runtime_memory.py measures both sides (its long-gc and long-gc-heap arms).

A `MALLOC_MMAP_THRESHOLD_` set in the environment is the user's choice and is left alone (glibc applied it when
the process started).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def return_large_frees(threshold: int = THRESHOLD) -> bool:
    """From now on, allocations of `threshold` bytes or more are mapped on their own and unmapped when freed; the
    heap freed so far is trimmed. False where the C library is not glibc or the environment sets
    MALLOC_MMAP_THRESHOLD_."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    trim(0)
    return ok
