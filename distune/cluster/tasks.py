"""One-shot data-parallel jobs on Ray (teacher caching, generation): N shards as N Ray tasks.

`run_shards(fn, args, count, ...)` calls `fn(*args, index, count[, progress=...])` in a Ray task per shard, with
the resources of one training worker, and shows a progress bar: over the units of work (samples, prompts) when
the caller gives their `total` and `fn` reports them through `progress(n)`, else over finished shards (with two
shards that bar would sit at 0/2 for the whole job). A shard's function writes its output atomically itself, so a
failed or retried task never leaves half a file; Ray retries a task whose process died (`max_retries`). Returns
the shards' results in shard order.
"""

from __future__ import annotations

from collections.abc import Callable

from tqdm import tqdm

from distune.cluster.session import gpu_env, ray, start_ray


@ray.remote(num_cpus=0)  # no CPU slot: the shards hold every one the local cluster has
class _Tally:
    """Units of work the shards reported done; the driver polls it for the bar."""

    def __init__(self) -> None:
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n

    def value(self) -> int:
        return self.done


def _shard(fn: Callable, tally, *args):
    """In the task: `fn(*args, progress=...)` when the bar counts units (each report goes to the tally without
    waiting for it), else `fn(*args)`."""
    if tally is None:
        return fn(*args)
    out = fn(*args, progress=lambda n: tally.add.remote(n))
    ray.get(tally.value.remote())  # one caller's actor calls run in order: every report above has landed
    return out


def run_shards(fn: Callable, args: tuple, count: int, use_gpu: bool, cpus: float, address: str | None = None,
               desc: str = "shards", show_progress: bool = True, env: dict | None = None,
               total: int | None = None, unit: str = "sample", gpus: int = 1) -> list:
    """`gpus`: GPUs per shard when `use_gpu` (a model spread over several of a node's GPUs)."""
    start_ray(address, num_cpus=None if address else max(1, int(cpus * count)))
    num_gpus = gpus if use_gpu else 0
    task = ray.remote(_shard).options(num_cpus=cpus, num_gpus=num_gpus, max_retries=2,
                                      runtime_env={"env_vars": gpu_env(env or {}, num_gpus)})
    tally = _Tally.remote() if show_progress and total else None
    refs = [task.remote(fn, tally, *args, index, count) for index in range(count)]
    order = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * count
    pending = list(refs)
    with tqdm(total=total if tally else count, desc=desc, unit=unit if tally else "shard",
              disable=not show_progress, dynamic_ncols=True) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0 if tally else None)
            for ref in done:
                results[order[ref]] = ray.get(ref)  # re-raises a task's error here, on the driver
            if tally is None:
                bar.update(len(done))
            else:  # a retried shard reports its samples again: never past the total
                bar.update(min(total, ray.get(tally.value.remote())) - bar.n)
        if tally is not None:
            ray.kill(tally)
    return results
