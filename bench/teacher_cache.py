"""The offline teacher cache on the training ranks: what attaching and reading it costs each rank in memory and time,
the memory-mapped layout (the default) against the compressed npz one (`method.cache_compress`).

    python bench/teacher_cache.py    # ~5 GB under --dir, deleted at the end: bench/results/teacher_cache.{json,md}

A synthetic training split (causal-LM samples of random ids, a 20-token prompt and on average 200 trained positions)
is written to a tokenized store (distune.data.store), and its top-64 cache by `distune.signals.cache.write_shard`
(`--shards` shards, as `distune cache-teacher` writes them) with a stand-in teacher: ids skewed towards low (frequent)
ids and descending log-probs, so that compression sees roughly a real cache's redundancy; the row bytes are a real
cache's. The mmap layout holds `--positions` positions; the npz layout `--npz-positions` (fewer: it is held in memory
by every rank). Then, per arm, `--world` ranks (separate processes, started together) each attach the cache through
the real `distune.signals.cache.attach` and read their share (samples i with i % world == rank) in micro-batches,
twice: once after the cache and store files were dropped from the page cache (posix_fadvise DONTNEED), once warm.

    mmap       the mmap cache on the memory-mapped split (StoredSamples): a sample's rows are read when it is read
    npz-list   the npz cache on a list of samples: every sample's rows decompressed and upcast to int64 / fp32 at
               attach, on every rank (the path before the mmap layout)
    npz-store  the npz cache on the memory-mapped split: every shard decompressed at attach, rows upcast at read

Per rank, from /proc/self/status: growth of RssAnon (private memory) and RssFile (file-backed pages mapped: shared,
the kernel's to drop) over the process's own baseline (taken after the split is open, and for npz-list after the
list of samples exists), after attach and after reading, as a percentage of that layout's cache size on disk; the
peak (VmHWM) growth; the cache files' own mapped pages (from /proc/self/smaps). Read throughput: positions/s and the
cache's row bytes/s (positions x k x (id + log-prob bytes)).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import harness

K = 64
PROMPT = 20  # untrained tokens at the start of each synthetic sample
ARMS = {"mmap": "mmap", "npz-list": "npz", "npz-store": "npz"}  # arm -> the cache layout it reads


# ------------------------------------------------------------------------------------------------ the synthetic cache


class StandIn:
    """A teacher stand-in: per KD position, k ids log-uniform over the vocabulary (low ids, the frequent tokens of a
    BPE vocabulary, most often) and descending log-probs, from a seeded generator."""

    def __init__(self, vocab: int, k: int, seed: int):
        import torch

        self.vocab_size, self.k, self.torch = vocab, k, torch
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, batch, positions):
        from distune.signals import TeacherOutput

        torch, n = self.torch, int(positions.sum())
        ids = (self.vocab_size ** torch.rand(n, self.k, generator=self.gen)).long() - 1
        steps = torch.empty(n, self.k).exponential_(2.0, generator=self.gen)
        return TeacherOutput(topk_ids=ids, topk_logp=-torch.cumsum(steps, 1))


def synthetic_split(folder: Path, positions: int, trained: int, vocab: int, seed: int) -> tuple[dict, int]:
    """A store of causal-LM samples holding about `positions` trained positions (uniform in [trained/2, 3·trained/2]
    per sample): the split's info and its sample count."""
    from distune.data.store import SplitWriter
    from distune.tasks.causal_lm import Sample

    rng = np.random.default_rng(seed)
    n = max(1, round(positions / trained))
    writer = SplitWriter(folder)
    for start in range(0, n, 10_000):
        chunk = []
        for j in range(start, min(n, start + 10_000)):
            t = int(rng.integers(trained // 2, trained * 3 // 2 + 1))
            ids = rng.integers(4, vocab, PROMPT + 1 + t).tolist()
            chunk.append(Sample(ids, [-100] * (PROMPT + 1) + ids[PROMPT + 1:], line=j + 1))
        writer.add(chunk)
    return writer.close(), n


def build(work: Path, layout: str, positions: int, args) -> dict:
    """The split and its cache in `layout` under work/layout: the cache's meta.json plus write seconds."""
    import torch

    from distune.data.store import StoredSamples
    from distune.signals import TeacherSpec, cache

    root = work / layout
    shutil.rmtree(root, ignore_errors=True)
    info, n = synthetic_split(root / "split", positions, args.trained, args.vocab, args.seed)
    (root / "split.json").write_text(json.dumps(info))
    split, teacher = StoredSamples(root / "split", info), StandIn(args.vocab, K, args.seed)
    t = time.perf_counter()
    shards = [cache.write_shard(split, teacher, root / "cache", i, args.shards, args.teacher_batch, 0,
                                torch.device("cpu"), compress=layout == "npz") for i in range(args.shards)]
    spec = TeacherSpec(path="stand-in", signal="cached", top_k=K, cache_dir=str(root / "cache"),
                       cache_compress=layout == "npz")
    meta = cache.write_meta(root / "cache", spec, args.vocab, shards, "synthetic")
    meta["write_s"] = round(time.perf_counter() - t, 1)
    print(f"{layout}: {n:,} samples, {meta['positions']:,} positions, {meta['bytes'] / 2**30:.2f} GiB, "
          f"{meta['bytes_per_token']:.1f} B/position, written in {meta['write_s']} s", flush=True)
    return meta


def evict(folder: Path) -> None:
    """Written back and dropped from the page cache, so that the next read comes from the disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ------------------------------------------------------------------------------------------------ one rank


def status() -> dict[str, int]:
    """RssAnon, RssFile and VmHWM of this process, bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


def mapped_rss(folder: Path) -> int:
    """Bytes of this process's resident pages mapped from files under `folder` (/proc/self/smaps)."""
    total, inside = 0, False
    prefix = str(folder)
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):  # a mapping's header
            inside = len(head) >= 6 and head[5].startswith(prefix)
        elif inside and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


def rank_main(arm: str, rank: int, world: int, root: str, micro: int, out: str) -> None:
    """One rank: open the split, attach the cache, read this rank's share twice; figures to `out` (JSON)."""
    from distune.data.loader import RELEASE_EVERY
    from distune.data.store import StoredSamples
    from distune.signals import cache

    root_dir = Path(root)
    info = json.loads((root_dir / "split.json").read_text())
    samples = StoredSamples(root_dir / "split", info)
    if arm == "npz-list":
        samples = list(samples)  # the split as a list of samples, as before the store
    base = status()
    t = time.perf_counter()
    cache.attach(samples, root_dir / "cache")
    got = {"rank": rank, "attach_s": time.perf_counter() - t, "attached": status(), "passes": []}
    mine = range(rank, len(samples), world)
    release = getattr(samples, "release", None)
    for _ in ("cold", "warm"):
        t, positions = time.perf_counter(), 0
        for b, start in enumerate(range(0, len(mine), micro)):
            batch = [samples[i] for i in mine[start:start + micro]]
            positions += sum(len(s.extras["teacher_topk_ids"]) for s in batch)
            if release is not None and b % RELEASE_EVERY == RELEASE_EVERY - 1:
                release()  # as the training loader does: the pages read leave the rank's resident set
        got["passes"].append({"read_s": time.perf_counter() - t, "positions": positions, "after": status()})
    got |= {"base": base, "cache_rss": mapped_rss(root_dir / "cache")}
    Path(out).write_text(json.dumps(got))


def run_arm(arm: str, root: Path, args) -> list[dict]:
    """`args.world` ranks started together, each its own process (forked from a server that imported distune once,
    before any work: no thread pools or arrays are inherited)."""
    import teacher_cache  # this file as a module: the processes find rank_main by its module's name

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["distune.signals.cache", "distune.data.store", "teacher_cache"])
    evict(root)
    outs = [root / f"{arm}-rank{r}.json" for r in range(args.world)]
    procs = [ctx.Process(target=teacher_cache.rank_main, args=(arm, r, args.world, str(root), args.micro_batch,
                                                               str(outs[r]))) for r in range(args.world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"arm {arm}: a rank failed (exit codes {[p.exitcode for p in procs]})")
    return [json.loads(o.read_text()) for o in outs]


# ------------------------------------------------------------------------------------------------ the report


def figures(rank: dict, meta: dict) -> dict:
    """A rank's raw readings as growths over its baseline, % of the cache on disk, and throughput."""
    size, base, row = meta["bytes"], rank["base"], K * (np.dtype(meta["ids_dtype"]).itemsize + 2)

    def pct(after: dict, key: str) -> float:
        return round(100 * (after[key] - base[key]) / size, 1)

    last = rank["passes"][-1]["after"]
    out = {"rank": rank["rank"], "attach_s": round(rank["attach_s"], 3),
           "anon_after_attach_pct": pct(rank["attached"], "RssAnon"),
           "file_after_attach_pct": pct(rank["attached"], "RssFile"),
           "anon_after_read_pct": pct(last, "RssAnon"), "file_after_read_pct": pct(last, "RssFile"),
           "peak_pct": round(100 * (last["VmHWM"] - base["VmRSS"]) / size, 1),
           "cache_pages_mapped_pct": round(100 * rank["cache_rss"] / size, 1),
           "anon_growth_bytes": last["RssAnon"] - base["RssAnon"],
           "file_growth_bytes": last["RssFile"] - base["RssFile"]}
    for name, p in zip(("cold", "warm"), rank["passes"]):
        seconds = max(p["read_s"], 1e-9)
        out[name] = {"positions": p["positions"], "read_s": round(p["read_s"], 3),
                     "positions_per_s": round(p["positions"] / seconds),
                     "mb_per_s": round(p["positions"] * row / seconds / 1e6, 1)}
    return out


def table(result: dict) -> str:
    lines = ["| arm | cache on disk | B/position | rank | attach s | RssAnon growth | private B/position | "
             "RssFile growth | cache pages mapped | peak RSS growth | cold read: Mpos/s, MB/s | "
             "warm read: Mpos/s, MB/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm, ranks in result["arms"].items():
        meta = result["layouts"][ARMS[arm]]
        for r in ranks:
            speeds = [f"{r[p]['positions_per_s'] / 1e6:.2f}, {r[p]['mb_per_s']:,.0f}" for p in ("cold", "warm")]
            lines.append(f"| {arm} | {meta['bytes'] / 2**30:.2f} GiB ({meta['positions']:,} pos) | "
                         f"{meta['bytes_per_token']:.1f} | {r['rank']} | {r['attach_s']:.3f} | "
                         f"{r['anon_after_read_pct']} % | {r['anon_growth_bytes'] / meta['positions']:.1f} | "
                         f"{r['file_after_read_pct']} % | {r['cache_pages_mapped_pct']} % | "
                         f"{r['peak_pct']} % | {speeds[0]} | {speeds[1]} |")
    world, load = result["world"], (result["load_avg_start"], result["load_avg_end"])
    return (f"Teacher cache, top-{K}, {world} ranks reading their share (i % {world} == rank) in micro-batches of "
            f"{result['micro_batch']}, on {result['machine']} (load average {load[0]:.1f} at start, {load[1]:.1f} at "
            f"end). Memory: growth over each rank's baseline after reading, as % of that cache's size on disk.\n\n"
            + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--positions", type=int, default=20_000_000, help="KD positions in the mmap cache")
    p.add_argument("--npz-positions", type=int, default=1_000_000, help="KD positions in the npz cache")
    p.add_argument("--trained", type=int, default=200, help="mean trained positions per sample")
    p.add_argument("--vocab", type=int, default=32_000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--world", type=int, default=2, help="ranks reading the cache at once")
    p.add_argument("--micro-batch", type=int, default=8, help="samples per read")
    p.add_argument("--teacher-batch", type=int, default=64, help="samples per stand-in teacher call when writing")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, default=Path("/tmp/distune-bench-cache"), help="where the caches are written")
    p.add_argument("--keep", action="store_true", help="keep the synthetic caches (deleted by default)")
    p.add_argument("--out", type=Path, default=harness.ROOT / "bench" / "results" / "teacher_cache.json")
    args = p.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise SystemExit(f"--arms: unknown {sorted(unknown)}; known: {', '.join(ARMS)}")
    sizes = {"mmap": args.positions, "npz": args.npz_positions}
    result = {"machine": harness.cpu_name(), "k": K, "world": args.world, "micro_batch": args.micro_batch,
              "shards": args.shards, "vocab": args.vocab, "load_avg_start": os.getloadavg()[0], "layouts": {},
              "arms": {}}
    try:
        for layout in dict.fromkeys(ARMS[a] for a in arms):
            meta = build(args.dir, layout, sizes[layout], args)
            result["layouts"][layout] = {k: meta[k] for k in ("format", "layout", "samples", "positions", "bytes",
                                                              "bytes_per_token", "ids_dtype", "write_s")}
        for arm in arms:
            meta = result["layouts"][ARMS[arm]]
            result["arms"][arm] = [figures(r, meta) for r in run_arm(arm, args.dir / ARMS[arm], args)]
            print(f"{arm}: " + "; ".join(
                f"rank {r['rank']} attach {r['attach_s']} s, RssAnon +{r['anon_after_read_pct']} %, RssFile "
                f"+{r['file_after_read_pct']} %, cold {r['cold']['positions_per_s']:,} pos/s"
                for r in result["arms"][arm]), flush=True)
    finally:
        if not args.keep:
            for layout in ("mmap", "npz"):
                shutil.rmtree(args.dir / layout, ignore_errors=True)
    result["load_avg_end"] = os.getloadavg()[0]
    text = table(result)
    print(text)
    harness.write_results(args.out, result, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
