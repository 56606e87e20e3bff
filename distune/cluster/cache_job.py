"""`distune cache-teacher CFG`: the teacher runs once over the training split as Ray tasks (one per
shard, each with one training worker's resources), writing top-k log-probs to `method.cache_dir`.

meta.json is removed first and written last, so a cache interrupted half-way is never read as complete.
Prints the size figures: bytes per cached token against a dense fp32 row of the vocabulary.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", type=int, help="shard files / Ray tasks (default: cluster.num_workers)")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--force", action="store_true", help="rebuild even if a complete cache exists")
    p.add_argument("--gpus-per-shard", type=int, default=1,
                   help="GPUs per shard on a GPU cluster (default 1); above 1 the teacher is spread over them, a "
                        "layer range on each (a teacher too big for one GPU)")
    p.add_argument("--no-progress", action="store_true")


def command(cfg, summary: dict, args) -> int:
    from distune.config import ConfigError
    from distune.distill import cache
    from distune.frozen import cache_shard, teacher_specs
    from distune.validate import target_uses_gpu

    spec = teacher_specs(cfg).get("teacher")
    if spec is None or not spec.cache_dir:
        raise ConfigError("cache-teacher needs method.name: distill with method.cache_dir set")
    if spec.top_k is None:
        raise ConfigError("cache-teacher stores top-k: set method.top_k (e.g. 64)")
    out = Path(spec.cache_dir).expanduser().absolute()
    if (out / "meta.json").is_file() and not args.force:
        raise ConfigError(f"method.cache_dir: {out} already holds a complete cache; pass --force to rebuild")
    count = args.shards or cfg.cluster.num_workers
    if count <= 0:
        raise ConfigError("--shards must be >= 1")
    if args.gpus_per_shard <= 0:
        raise ConfigError("--gpus-per-shard must be >= 1")
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)

    from distune.cluster.tasks import run_shards

    use_gpu = target_uses_gpu(cfg)
    env = dict(cfg.cluster.env)
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    cfg_dict = cfg.model_dump(mode="json")
    cfg_dict["method"]["cache_dir"] = str(out)
    shards = run_shards(cache_shard, (cfg_dict, summary["model_source"]), count, use_gpu, cfg.cluster.cpus_per_worker,
                        args.address, desc="teacher cache", show_progress=not args.no_progress, env=env,
                        total=summary.get("train_rows"), gpus=args.gpus_per_shard)
    spec.cache_dir = str(out)
    labels = summary.get("labels") if cfg.model.task == "sequence_classification" else None
    meta = cache.write_meta(out, spec, summary.get("teacher_vocab"), shards, cfg.data.path, labels)
    for stale in out.glob("shard-*.npz"):
        if stale.name not in meta["shards"]:
            stale.unlink()
    if labels:
        print(f"teacher cache: class probabilities over {labels} for {meta['samples']} samples, "
              f"{meta['bytes'] / 2**10:.1f} KiB in {len(shards)} shards")
        print(f"cache: {out}")
        return 0
    ratio = meta["dense_fp32_bytes_per_token"] / meta["bytes_per_token"]
    print(f"teacher cache: {meta['samples']} samples, {meta['positions']} trained positions, top-{meta['top_k']} "
          f"at T={meta['temperature']}, {meta['bytes'] / 2**20:.2f} MiB in {len(shards)} shards: "
          f"{meta['bytes_per_token']:.1f} bytes/token ({ratio:.0f}x smaller than dense fp32 logits)")
    print(f"cache: {out}")
    return 0
