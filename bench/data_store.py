"""Data at scale: the in-memory path (every process reads and tokenizes everything) beside the tokenized store
(rendered once, memory-mapped, each rank reads its share), on synthetic chat rows with a real tokenizer.

    python bench/data_store.py                      # 1M rows, 2 ranks: bench/results/data_store.{json,md}
    python bench/data_store.py --rows 20000         # a quick look

Rows are prompt/response pairs rendered with SmolLM2's chat template (data.use_chat_template), words drawn from the
tokenizer's vocabulary, prompt and response lengths log-normal (median ~60 and ~110 words). Measured:
- the in-memory path (data.store: false) on --today-rows rows: the driver's validate and each rank's load_splits,
  every one a separate process: seconds, tokenizer calls, RSS growth;
- the store on --rows rows: `prepare` over a process pool of every core (rows/s per core, tokenizer calls, size
  on disk), then each of --ranks processes opens it and reads its share of the first epoch's micro-batches (RSS
  growth split into private memory, RssAnon, and mapped file pages, RssFile; samples/s).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path

import harness

RSS_FIELDS = ("VmRSS", "RssAnon", "RssFile")


def rss() -> dict[str, int]:
    """This process's resident memory in bytes: total, private (anonymous) and file-backed (mapped) pages."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in RSS_FIELDS:
            out[key] = int(value.split()[0]) * 1024
    return out


def grown(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in RSS_FIELDS}


def write_rows(path: Path, n: int, tok, seed: int = 0) -> None:
    """n synthetic prompt/response rows; words are whole-word tokens of the tokenizer's vocabulary."""
    vocab = [t[1:] for t in tok.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 3]
    vocab.sort()
    rng = random.Random(seed)
    if len(vocab) < 100:  # a toy tokenizer: made-up words
        vocab = sorted({"".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 8))) for _ in range(2000)})
    with path.open("w") as f:
        for _ in range(n):
            p = max(3, min(400, int(rng.lognormvariate(4.1, 0.6))))
            r = max(3, min(600, int(rng.lognormvariate(4.7, 0.6))))
            f.write(json.dumps({"prompt": " ".join(rng.choices(vocab, k=p)),
                                "response": " ".join(rng.choices(vocab, k=r))}) + "\n")


def config(model: str, data: Path, work: Path, store: bool, micro: int, max_length: int) -> dict:
    return {"run": {"name": "data-store", "output_dir": str(work / "runs"), "seed": 0},
            "model": {"path": model},
            "method": {"name": "full"},
            "data": {"path": str(data), "prompt": "{prompt}", "response": "{response}", "max_length": max_length,
                     "store": store, "store_dir": str(work / "stores")},
            "train": {"epochs": 1, "global_batch_size": micro * 2, "micro_batch_size": micro},
            "cluster": {"num_workers": 2, "use_gpu": False},
            "wandb": {"mode": "disabled"}}


def _counted(tok) -> list[int]:
    """Count every call of the tokenizer's class (the in-memory path's calls; the store counts its own)."""
    calls = [0]
    cls = type(tok)
    original = cls.__call__

    def counting(self, *a, **k):
        calls[0] += 1
        return original(self, *a, **k)

    cls.__call__ = counting
    return calls


def today_process(cfg_dict: dict, queue) -> None:
    """One process of the in-memory path: tokenizer, then load_splits over the whole data."""
    from distune.config import load_config
    from distune.data import load_splits
    from distune.models import load_tokenizer, resolve_model_source

    cfg = load_config(cfg_dict)
    tok = load_tokenizer(resolve_model_source(cfg.model.path))
    calls = _counted(tok)
    before, t, cpu = rss(), time.perf_counter(), time.process_time()
    splits = load_splits(cfg.data, tok, cfg.run.seed, None, cfg.model.task)
    queue.put({"seconds": time.perf_counter() - t, "cpu_s": time.process_time() - cpu, "tokenizer_calls": calls[0],
               "rss_growth": grown(before, rss()), "samples": len(splits.train) + len(splits.eval)})


def store_rank(cfg_dict: dict, rank: int, world: int, batches: int | None, queue) -> None:
    """One rank of the store path: open the store, read this rank's micro-batches of the first epoch."""
    from distune.config import load_config
    from distune.data.prepare import open_splits, store_path
    from distune.feeds import build_feeds
    from distune.models import load_tokenizer, resolve_model_source

    cfg = load_config(cfg_dict)
    tok = load_tokenizer(resolve_model_source(cfg.model.path))
    path = store_path(cfg, tok)
    before, t = rss(), time.perf_counter()
    splits = open_splits(path)
    feeds, _ = build_feeds(cfg, splits, None, 1, rank, world, tok.pad_token_id or 0)
    opened = time.perf_counter() - t
    read = tokens = 0
    t = time.perf_counter()
    peak = dict(before)
    for _, b, batch in feeds[0].batches.iterate(0, 0):
        if b % 500 == 0:
            now = rss()
            peak = {k: max(peak[k], now[k]) for k in RSS_FIELDS}
        read += batch["input_ids"].shape[0]
        tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        if b + 1 == (batches or feeds[0].batches.per_epoch):
            break
    seconds = time.perf_counter() - t
    queue.put({"rank": rank, "open_s": opened, "read_s": seconds, "samples": read, "tokens": tokens,
               "samples_per_s": read / max(seconds, 1e-9), "rss_growth": grown(before, rss()),
               "peak_rss_growth": grown(before, peak)})


def in_processes(target, args_list: list[tuple]) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, queue)) for a in args_list]
    for p in procs:
        p.start()
    out = [queue.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"{target.__name__} exited with {p.exitcode}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="rows for the store path")
    p.add_argument("--today-rows", type=int, default=20_000, help="rows for the in-memory path (it holds them all "
                                                                  "in every process)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--read-batches", type=int, help="micro-batches each rank reads (default: its whole epoch)")
    p.add_argument("--ray-rows", type=int, default=0, help="also prepare this many rows as a Ray Data job on an "
                                                             "embedded cluster, beside the process pool")
    p.add_argument("--ranks-only", action="store_true", help="read the store --out's run prepared again (the ranks "
                                                              "alone; the other figures are kept from --out)")
    p.add_argument("--only-ray", action="store_true", help="the Ray Data comparison alone (with --ray-rows)")
    p.add_argument("--model", default=harness.SMOLLM2, help="the tokenizer's model (default: SmolLM2, offline)")
    p.add_argument("--work", type=Path, default=Path("/tmp/distune-bench-data"))
    p.add_argument("--out", type=Path, default=harness.ROOT / "bench" / "results" / "data_store.json")
    args = p.parse_args(argv)

    from distune.config import load_config
    from distune.data.prepare import prepare
    from distune.data.rendering import process_pool
    from distune.data.store import read_meta
    from distune.models import load_tokenizer, resolve_model_source

    args.work.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(resolve_model_source(args.model))
    cores = len(os.sched_getaffinity(0))
    result: dict = {"machine": harness.cpu_name(), "cores": cores, "ranks": args.ranks, "micro_batch": args.micro}

    if args.ray_rows:
        result["ray_data"] = ray_data_arm(args, tok, cores)
        print("ray data:", json.dumps(result["ray_data"]), flush=True)
        if args.only_ray:
            text = ray_report(result)
            print(text)
            harness.write_results(args.out, result, text)
            return 0

    if args.ranks_only:
        result = json.loads(args.out.read_text())
        cfg_dict = config(args.model, args.work / f"rows-{result['store']['rows']}.jsonl", args.work, True,
                          result["micro_batch"], args.max_length)
        return read_ranks(args, result, cfg_dict, result["store"]["store_bytes"])

    # The in-memory path: the driver (validate) and every rank render everything.
    small = args.work / f"rows-{args.today_rows}.jsonl"
    if not small.exists():
        write_rows(small, args.today_rows, tok)
    today_cfg = config(args.model, small, args.work, False, args.micro, args.max_length)
    today = in_processes(today_process, [(today_cfg,)] * (1 + args.ranks))
    per_row = sum(r["tokenizer_calls"] for r in today) / args.today_rows
    result["today"] = {"rows": args.today_rows, "processes": today, "tokenizer_calls_per_row": per_row,
                       "seconds_per_row_per_process": today[0]["seconds"] / args.today_rows}
    print("in-memory path:", json.dumps(result["today"]), flush=True)

    # The store: prepare once over every core, then each rank reads its share.
    big = args.work / f"rows-{args.rows}.jsonl"
    if not big.exists():
        t = time.perf_counter()
        write_rows(big, args.rows, tok)
        print(f"wrote {args.rows:,} rows in {time.perf_counter() - t:.0f} s", flush=True)
    cfg_dict = config(args.model, big, args.work, True, args.micro, args.max_length)
    cfg = load_config(cfg_dict)
    before, t = rss(), time.perf_counter()
    path = prepare(cfg, tok, process_pool(cores), force=True)
    prep_s = time.perf_counter() - t
    stats = read_meta(path)["splits"]["stats"]
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    tokens = stats["mean_tokens"] * stats["train_rows"]
    result["store"] = {"rows": args.rows, "prepare_s": prep_s, "rows_per_s": args.rows / prep_s,
                       "rows_per_s_per_core": args.rows / prep_s / cores, "tokenizer_calls": stats["tokenizer_calls"],
                       "tokenizer_calls_per_row": stats["tokenizer_calls"] / args.rows, "store_bytes": size,
                       "bytes_per_token": size / max(1.0, tokens), "mean_tokens": stats["mean_tokens"],
                       "driver_rss_growth": grown(before, rss())}
    print("store prepare:", json.dumps(result["store"]), flush=True)
    return read_ranks(args, result, cfg_dict, size)


def read_ranks(args, result: dict, cfg_dict: dict, size: int) -> int:
    ranks = in_processes(store_rank, [(cfg_dict, r, result["ranks"], args.read_batches)
                                      for r in range(result["ranks"])])
    for r in ranks:
        r["rss_growth_pct_of_store"] = {k: 100 * v / size for k, v in r["rss_growth"].items()}
        r["peak_rss_growth_pct_of_store"] = {k: 100 * v / size for k, v in r["peak_rss_growth"].items()}
    result["store"]["ranks"] = sorted(ranks, key=lambda r: r["rank"])
    print("store ranks:", json.dumps(result["store"]["ranks"]), flush=True)
    result["projection_10M_64"] = project(result, 10_000_000, 64)
    text = report(result) + ("\n\n" + ray_report(result) if "ray_data" in result else "")
    print(text)
    harness.write_results(args.out, result, text)
    return 0


def ray_data_arm(args, tok, cores: int) -> dict:
    """The same rows prepared by the local process pool and by Ray Data on an embedded cluster of every core: the
    two stores must be identical; rows/s per core for each."""
    import ray

    from distune.cluster.prepare import ray_data_runner
    from distune.cluster.session import start_ray
    from distune.config import load_config
    from distune.data.prepare import prepare
    from distune.data.rendering import process_pool

    data = args.work / f"rows-{args.ray_rows}.jsonl"
    if not data.exists():
        write_rows(data, args.ray_rows, tok)
    cfg = load_config(config(args.model, data, args.work, True, args.micro, args.max_length))
    out = {"rows": args.ray_rows}
    t = time.perf_counter()
    pool = prepare(cfg, tok, process_pool(cores, least=0), args.work / "ray-arm" / "pool", force=True)
    out["pool_s"] = time.perf_counter() - t
    start_ray(None, num_cpus=cores)
    try:
        t = time.perf_counter()
        on_ray = prepare(cfg, tok, ray_data_runner(cores, least=0), args.work / "ray-arm" / "ray", force=True)
        out["ray_data_s"] = time.perf_counter() - t
    finally:
        ray.shutdown()
    out |= {"pool_rows_per_s_per_core": args.ray_rows / out["pool_s"] / cores,
            "ray_data_rows_per_s_per_core": args.ray_rows / out["ray_data_s"] / cores,
            "identical": _files(pool) == _files(on_ray)}
    return out


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "meta.json"}


def ray_report(r: dict) -> str:
    a = r["ray_data"]
    return (f"Prepare on {r['machine']} ({r['cores']} cores), {a['rows']:,} rows: process pool {a['pool_s']:.0f} s "
            f"({a['pool_rows_per_s_per_core']:,.0f} rows/s/core), Ray Data {a['ray_data_s']:.0f} s "
            f"({a['ray_data_rows_per_s_per_core']:,.0f} rows/s/core); stores identical: {a['identical']}")


def project(result: dict, rows: int, ranks: int) -> dict:
    """10M rows on 64 ranks from the per-row figures measured here (rendering scales with cores; a rank's private
    memory with its share of the order it samples)."""
    today, store = result["today"], result["store"]
    procs = today["processes"]
    # CPU seconds of one process: measured, or (older results) its wall time x the share of a core it had.
    cpu = procs[0].get("cpu_s", procs[0]["seconds"] * min(1.0, result["cores"] / len(procs)))
    per_proc_s = cpu / today["rows"] * rows
    anon = max(r["rss_growth"]["RssAnon"] for r in store["ranks"]) / store["rows"] * rows
    return {"rows": rows, "ranks": ranks,
            "today_tokenize_s_per_process": per_proc_s, "today_cpu_s_all_processes": per_proc_s * (1 + ranks),
            "today_tokenizer_calls": today["tokenizer_calls_per_row"] * rows * (1 + ranks) / (1 + result["ranks"]),
            "store_cpu_s": rows / store["rows_per_s_per_core"], "store_tokenizer_calls": store["tokenizer_calls_per_row"]
            * rows, "store_bytes": store["store_bytes"] / store["rows"] * rows,
            "store_rank_private_bytes": max(0.0, anon)}


def report(r: dict) -> str:
    t, s, pr = r["today"], r["store"], r["projection_10M_64"]
    gib = 2 ** 30
    lines = [f"Data at scale on {r['machine']} ({r['cores']} cores), {r['ranks']} ranks, micro-batch {r['micro_batch']}",
             "", "| path | rows | tokenizer calls / row (all processes) | time | RSS growth per process |",
             "|---|---:|---:|---|---|",
             f"| in memory (driver + {r['ranks']} ranks each render all) | {t['rows']:,} | {t['tokenizer_calls_per_row']:.2f} | "
             f"{t['processes'][0]['seconds']:.1f} s per process ({len(t['processes'])} at once on {r['cores']} cores) | "
             f"{max(p['rss_growth']['VmRSS'] for p in t['processes']) / 2**20:,.0f} MiB |",
             f"| store (prepare once, {r['cores']} processes) | {s['rows']:,} | {s['tokenizer_calls_per_row']:.4f} | "
             f"{s['prepare_s']:.0f} s ({s['rows_per_s_per_core']:,.0f} rows/s/core) | "
             f"driver {s['driver_rss_growth']['VmRSS'] / 2**20:,.0f} MiB |",
             "", f"Store: {s['store_bytes'] / gib:.2f} GiB, {s['bytes_per_token']:.1f} bytes per token, "
             f"{s['mean_tokens']:.0f} tokens per sample.", "",
             "| rank | samples read | samples/s | private RSS growth (RssAnon) | mapped file pages (RssFile), end "
             "| peak RSS growth while reading |",
             "|---:|---:|---:|---:|---:|---:|"]
    for k in s["ranks"]:
        g, pct = k["rss_growth"], k["rss_growth_pct_of_store"]
        peak = k.get("peak_rss_growth_pct_of_store", {}).get("VmRSS")
        lines.append(f"| {k['rank']} | {k['samples']:,} | {k['samples_per_s']:,.0f} | {g['RssAnon'] / 2**20:,.0f} MiB "
                     f"({pct['RssAnon']:.1f} % of the store) | {g['RssFile'] / 2**20:,.0f} MiB ({pct['RssFile']:.1f} %) | "
                     + (f"{peak:.1f} % |" if peak is not None else "- |"))
    lines += ["", f"Projected for {pr['rows']:,} rows on {pr['ranks']} ranks: in memory, "
              f"{pr['today_tokenize_s_per_process'] / 3600:.1f} CPU-hours of rendering in every one of {pr['ranks'] + 1} "
              f"processes; the store, {pr['store_cpu_s'] / 3600:.1f} CPU-hours once "
              f"({pr['store_cpu_s'] / 3600 / 64:.2f} h over 64 cores), {pr['store_bytes'] / gib:.0f} GiB on disk, "
              f"{pr['store_rank_private_bytes'] / 2**20:,.0f} MiB private memory per rank."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
