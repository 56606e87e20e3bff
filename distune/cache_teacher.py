"""`distune cache-teacher CFG`: the teacher runs once over the training split as Ray tasks (one per
shard, each with one training worker's resources), writing top-k log-probs to `method.cache_dir`: memory-mappable
shards by default, compressed .npz ones with `method.cache_compress` (distune.signals.cache).

meta.json is removed first and written last, so a cache interrupted half-way is never read as complete.
Prints the size figures: bytes per cached token against a dense fp32 row of the vocabulary.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
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
    from distune.errors import ConfigError
    from distune.hardware import uses_gpu, worker_env
    from distune.methods import frozen_models
    from distune.signals import cache
    from distune.tasks import get_task

    spec = frozen_models(cfg).get("teacher")
    if spec is None or not spec.cache_dir:
        raise ConfigError("cache-teacher needs method.name: distill with method.cache_dir set")
    if spec.top_k is None:
        raise ConfigError("cache-teacher stores top-k: set method.top_k (e.g. 64)")
    out = Path(spec.cache_dir)  # anchored when the config loaded
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

    use_gpu = uses_gpu(cfg.cluster.use_gpu)
    spec.cache_dir = str(out)
    shards = run_shards(cache_shard, (cfg.model_dump(mode="json"), spec, summary["model_source"]), count, use_gpu,
                        cfg.cluster.cpus_per_worker, args.address, desc="teacher cache",
                        show_progress=not args.no_progress, env=worker_env(cfg), total=summary.get("train_rows"),
                        gpus=args.gpus_per_shard)
    labels = summary.get("labels") if get_task(cfg.model.task).distills == "classes" else None
    meta = cache.write_meta(out, spec, summary.get("teacher_vocab"), shards, cfg.data.path, labels)
    keep = cache.shard_files(meta)
    for stale in out.glob("shard-*"):  # an earlier build's shards: another count or layout
        if stale.name not in keep:
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


def cache_shard(cfg_dict: dict, spec, model_source: str, index: int, count: int, progress=None) -> dict:
    """Run the teacher `spec` over shard `index` of the training split and write it to its cache_dir.

    Runs anywhere (a Ray task from `distune cache-teacher`, or in-process); the same samples as training
    sees, since every process renders and splits the data identically (seeded). For a student that learns
    next-token distributions: top-k per KD position; for one that learns class probabilities: the teacher's class
    log-probs, from the summed log-probability it gives each class name (the verbalizer) after the prompt.
    `progress(n)`, when given, is called with the number of samples each batch finished.
    """
    import torch

    from distune.config import load_config
    from distune.data import load_splits
    from distune.data.prepare import splits_for
    from distune.data.rendering import in_process
    from distune.models import load_model, load_model_config, load_tokenizer, resolve_model_source, source_on_this_node
    from distune.signals import OnlineSignal, cache
    from distune.signals.loading import place_teacher
    from distune.signals.teachers import preflight
    from distune.tasks import get_task

    cfg = load_config(cfg_dict)
    model_source = source_on_this_node(cfg.model.path, model_source)
    tokenizer = load_tokenizer(model_source, cfg.model.trust_remote_code)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(spec.cache_dir)
    if get_task(cfg.model.task).distills == "classes":
        labels = load_splits(cfg.data, tokenizer, cfg.run.seed, None, cfg.model.task).labels
        source = resolve_model_source(spec.path)
        teacher_tok = load_tokenizer(source, spec.trust_remote_code)
        # The teacher's own rendering: its tokenizer, chat template, and prompt (same rows, same split). It
        # scores whole prompts: data.max_length is the student's input budget, not the teacher's.
        data = cfg.data.model_copy(update={"max_length": 1 << 20, **{k: v for k, v in (
            ("prompt", spec.prompt), ("system", spec.system)) if v is not None}})
        samples = load_splits(data, teacher_tok, cfg.run.seed).train
        model = load_model(source, spec.dtype, spec.trust_remote_code).to(device).eval()
        return cache.write_class_shard(samples, model, teacher_tok, data, labels, out_dir, index, count,
                                       cfg.eval.micro_batch_size, device, progress)
    student_config = load_model_config(model_source, cfg.model.trust_remote_code)
    # The teacher that writes the cache runs here (a cache being built cannot be checked against itself).
    prep = preflight({"teacher": replace(spec, signal=OnlineSignal.name)}, tokenizer, student_config)["teacher"]
    # The training split training reads (the store `distune validate` built, or a node's own): cache rows are
    # addressed by a sample's place in it.
    splits = splits_for(cfg, tokenizer, in_process)
    model, device = place_teacher(prep, device)  # the task's GPUs (cache-teacher --gpus-per-shard)
    teacher = OnlineSignal(model, prep.vocab_size, spec.top_k, spec.temperature)
    return cache.write_shard(splits.train, teacher, out_dir, index, count, cfg.eval.micro_batch_size,
                             tokenizer.pad_token_id, device, progress, which=spec.positions,
                             compress=spec.cache_compress)
