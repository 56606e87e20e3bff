"""One-shot data-parallel jobs on Ray (teacher caching, generation): N shards as N Ray tasks.

`run_shards(fn, args, count, ...)` calls `fn(*args, index, count)` in a Ray task per shard, with the
resources of one training worker, and shows a progress bar over finished shards. A shard's function
writes its output atomically itself, so a failed or retried task never leaves half a file; Ray retries a
task whose process died (`max_retries`). Returns the shards' results in shard order.
"""

from __future__ import annotations

from collections.abc import Callable

from tqdm import tqdm

from distune.cluster.trainer import start_ray

import ray  # noqa: E402  (after trainer set Ray's environment)


def run_shards(fn: Callable, args: tuple, count: int, use_gpu: bool, cpus: float, address: str | None = None,
               desc: str = "shards", show_progress: bool = True, env: dict | None = None) -> list:
    start_ray(address, num_cpus=None if address else max(1, int(cpus * count)))
    runtime_env = {"env_vars": env} if env else None
    task = ray.remote(fn).options(num_cpus=cpus, num_gpus=1 if use_gpu else 0, max_retries=2,
                                  runtime_env=runtime_env)
    refs = [task.remote(*args, index, count) for index in range(count)]
    order = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * count
    pending = list(refs)
    with tqdm(total=count, desc=desc, unit="shard", disable=not show_progress, dynamic_ncols=True) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results[order[done[0]]] = ray.get(done[0])  # re-raises a task's error here, on the driver
            bar.update(1)
    return results
