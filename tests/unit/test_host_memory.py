"""Freed host memory goes back to the OS once return_large_frees() ran (glibc), and a user's own
MALLOC_MMAP_THRESHOLD_ is left alone. Each case runs in a fresh interpreter: the setting is process-wide."""

import ctypes.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not ctypes.util.find_library("c") or sys.platform != "linux", reason="glibc only")

# In a thread (its own malloc arena, as a Ray Train worker's training thread has), frees 64 blocks of 4 MiB that
# sit between small live ones (a fragmented heap, as recomputed activations leave it) after a 20 MiB free has raised
# glibc's dynamic threshold; prints how much private memory stayed resident.
SCRIPT = r"""
import ctypes, ctypes.util, json, sys, threading
from distune.engine.host_memory import return_large_frees
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
def touched(n):
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    return p
applied = return_large_frees() if sys.argv[1] == "1" else None
got = {"applied": applied}
def work():
    libc.free(touched(20 << 20))
    before = anon()
    big, small = [], []
    for _ in range(64):
        big.append(touched(4 << 20))
        small.append(touched(64))
    for p in big:
        libc.free(p)
    got["kept"] = anon() - before
t = threading.Thread(target=work)
t.start()
t.join()
print(json.dumps(got))
"""


def run(call: bool, env_threshold: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    if env_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = env_threshold
    out = subprocess.run([sys.executable, "-c", SCRIPT, "1" if call else "0"], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def test_freed_blocks_return_to_the_os():
    heap, mapped = run(call=False), run(call=True)
    assert heap["kept"] > 128 << 20  # the arena kept most of the 256 MiB
    assert mapped["applied"] is True
    assert mapped["kept"] < 16 << 20


def test_a_users_malloc_threshold_wins():
    got = run(call=True, env_threshold=str(32 << 20))
    assert got["applied"] is False
    assert got["kept"] > 128 << 20  # the user's 32 MiB threshold: 4 MiB blocks come from the heap
