"""The prepare step as a Ray Data job: chunks of rows -> map_batches(render) over the cluster's CPUs -> the
driver writes the store in order (distune.data.prepare). Same chunk rendering as the local process pool, so the
store is the same byte for byte."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable, Iterator

from distune.data.rendering import SMALL, in_process, small_data


class _RenderChunks:
    """A Ray Data actor: renders chunks with its own copy of the job (tokenizer, templates)."""

    def __init__(self, job: bytes):
        self.job = pickle.loads(job)

    def __call__(self, batch: dict) -> dict:
        return {"result": [pickle.dumps(self.job.render_chunk(pickle.loads(bytes(c)))) for c in batch["chunk"]]}


def cluster_cpus() -> int:
    """The connected Ray cluster's CPUs."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def ray_data_runner(workers: int | None = None, least: int = SMALL) -> Callable:
    """A chunk runner (distune.data.rendering) on the connected Ray cluster: `workers` actors of one CPU each
    (default: every CPU of the cluster). Fewer than `least` chunks render in this process."""
    def run(job, chunks: Iterable[list]) -> Iterator:
        import ray.data

        small, chunks = small_data(chunks, least)
        if small:
            yield from in_process(job, chunks)
            return
        items = [{"chunk": pickle.dumps(c)} for c in chunks]
        if not items:
            return
        n = workers or cluster_cpus()
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the store is written in the rows' order
        ctx.enable_progress_bars = False  # the prepare step draws its own bar over rows
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(_RenderChunks, fn_constructor_kwargs={"job": pickle.dumps(job)}, batch_size=1,
                            concurrency=(1, min(n, len(items))), num_cpus=1,
                            max_restarts=0)  # its argument (the tokenizer) is in the object store; a failed prepare is rerun whole
        for row in ds.iter_rows():
            yield pickle.loads(bytes(row["result"]))
    return run
