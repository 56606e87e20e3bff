"""`distune prepare CFG`: tokenize the config's data once into its store (distune.data.prepare), as a Ray Data job
on a local embedded cluster or --address, or with --local in a process pool; prints where it is and what it holds.
`distune validate` and `distune run` build the same store when it is missing; this runs the step on its own."""

from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--local", action="store_true", help="a local process pool instead of Ray Data")
    p.add_argument("--workers", type=int, help="processes / Ray Data actors (default: every CPU)")
    p.add_argument("--force", action="store_true", help="rebuild even if the store is complete")
    p.add_argument("--no-progress", action="store_true")


def command(args) -> int:
    import time

    from distune.config import ConfigError, load_config
    from distune.data.prepare import prepare, store_path
    from distune.data.rendering import process_pool, with_progress
    from distune.data.store import complete, read_meta
    from distune.models import load_tokenizer, resolve_model_source

    from distune.pipeline import is_pipeline

    if is_pipeline(args.config):
        raise ConfigError(f"{args.config} is a pipeline (it has stages:): `distune run` builds each stage's store as "
                          "the stage starts (a stage may read an earlier one's output); give one stage's config")
    cfg = load_config(args.config, args.overrides, resolve=not args.address)
    if not cfg.data.store:
        raise ConfigError("data.store: false: this config reads its data in memory; there is no store to prepare")
    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers must be >= 1")
    tokenizer = load_tokenizer(resolve_model_source(cfg.model.path), cfg.model.trust_remote_code)
    path = store_path(cfg, tokenizer)
    if complete(path) and not args.force:
        print(f"store: {path} (complete; --force rebuilds it)")
        return 0
    if args.local:
        # least=0: asked for by name, the step runs as asked whatever the data's size
        runner, where = process_pool(args.workers, least=0), f"{args.workers or os.cpu_count()} local processes"
    else:
        from distune.cluster.prepare import cluster_cpus, ray_data_runner
        from distune.cluster.session import start_ray

        start_ray(args.address, num_cpus=None if args.address else os.cpu_count())
        runner = ray_data_runner(args.workers, least=0)
        where = f"Ray Data over {args.workers or cluster_cpus()} CPUs"
    if not args.no_progress:
        runner = with_progress(runner)
    print(f"tokenizing {cfg.data.path or 'data.tasks'} with {where} ...", flush=True)
    began = time.perf_counter()
    prepare(cfg, tokenizer, runner, path, force=args.force)
    seconds = time.perf_counter() - began
    splits = read_meta(path)["splits"]
    stats = splits["stats"]
    rows = stats["train_rows"] + stats["eval_rows"] + stats.get("skipped_rows", 0)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"store: {path}")
    print(f"  {stats['train_rows']:,} training / {stats['eval_rows']:,} eval samples, {size / 2**20:,.1f} MiB, "
          f"{seconds:.1f} s ({rows / max(seconds, 1e-9):,.0f} rows/s), "
          f"{stats.get('tokenizer_calls', 0):,} tokenizer calls")
    for w in splits["warnings"]:
        print(f"warning: {w}")
    return 0
