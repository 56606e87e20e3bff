"""Everything that can be checked before any worker is scheduled.

Files exist, the model's config loads, the dtype suits the hardware (fp16 is refused on CPU), the
batch arithmetic divides, every sample has trained tokens, eval choices cover the eval labels, the method fits
the model (e.g. LoRA's target_modules exist), the run directory can be written, W&B online has credentials.
Raises ConfigError / DataError with a one-line message. Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import netrc
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import torch

from distune.config import ConfigError, RunConfig, resolve_for_hardware
from distune.data import load_splits
from distune.data.dataset import sampled_splits
from distune.data.loader import lengths_of
from distune.data.prepare import open_splits, splits_for, store_path
from distune.data.store import complete
from distune.feeds import build_feeds
from distune.hardware import Facts, cpu_has_native_bf16, uses_gpu
from distune.methods import RunSettings, build_method
from distune.signals import get_signal
from distune.signals.teachers import preflight
from distune.tasks import get_task, known_tasks
from distune.models import layer_indices, load_model_config, meta_model, load_tokenizer, resolve_model_source
from distune.storage import is_uri


def validate(cfg: RunConfig, local_cluster: bool = True, check_cache: bool = True, runner=None,
             sample: int | None = None) -> dict:
    """Check `cfg`; return a summary (and the resolved model source) for printing. The data's tokenized store is
    built here when missing (`runner` renders it; default: a local process pool); with `sample`, data of more rows
    than that is only read and a sample of it rendered (counts are then estimates).

    `cluster.use_gpu` / `dtype` still `auto` (a submit, where the cluster's head resolves them): the checks that
    depend on the workers' hardware wait for the head, which validates again before any worker starts."""
    # Resolved when the config loads (`auto` -> this machine, or the cluster for a run with --address); None: a
    # submit, whose cluster's head resolves it.
    gpu = None if cfg.cluster.use_gpu == "auto" and not local_cluster else uses_gpu(cfg.cluster.use_gpu)
    if gpu is None:  # the model's shapes and the data are checked the same whatever dtype the head picks
        cfg = cfg.model_copy(deep=True)
        resolve_for_hardware(cfg, Facts(known=False), gpu=True)
    _check_hardware(cfg, gpu, local_cluster)
    if local_cluster:  # elsewhere (submit, --address), the folders and credentials are the cluster's nodes'
        _check_output_dir(cfg)
        _check_wandb_login(cfg)
    method = build_method(cfg.method.name, cfg.method.model_extra or {}, RunSettings.of(cfg))
    if cfg.model.quantization and gpu is not None:
        _check_quantization(cfg, method, gpu, local_cluster)
    if cfg.model.attn_implementation == "flash_attention_2":
        _check_flash_attention(cfg, gpu, local_cluster)
    grad_accum = cfg.grad_accum_steps()

    try:
        source = resolve_model_source(cfg.model.path)
        model_config = load_model_config(source, cfg.model.trust_remote_code)
        tokenizer = load_tokenizer(source, cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if first.startswith("model.path:"):  # resolve_model_source already named the key and the path
            raise ConfigError(first) from None
        raise ConfigError(f"model.path: cannot load {cfg.model.path!r}: {first}") from None
    if len(tokenizer) > getattr(model_config, "vocab_size", len(tokenizer)):
        raise ConfigError(f"model.path: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{model_config.vocab_size}")

    if cfg.model.layers is not None:
        _check_layers(cfg, model_config)
    task = method.task
    teachers = method.frozen_models()
    try:
        task.check(cfg, method)
        if teachers and task.distills is None:
            able = " and ".join(n for n in known_tasks() if get_task(n).distills)
            raise ValueError(f"method.name: {cfg.method.name!r} needs a teacher signal, which distune has for {able} "
                             f"only, not model.task {task.name}; train it with full or a PEFT method")
        for spec in teachers.values():
            get_signal(spec.signal).check_run(spec, task, cfg)
        method.check(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    prepared = preflight(teachers, tokenizer, model_config, check_cache, cfg.model.task)
    try:
        method.check_model(meta_model(model_config, cfg.model.trust_remote_code, cfg.model.task, cfg.model.layers))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    streams = method.streams()
    if streams is not None:
        if not cfg.data.tasks:
            raise ConfigError(f"data.tasks: method {cfg.method.name!r} trains one stream per data task "
                              f"({streams[0].key}.task); list the tasks under data.tasks")
    splits = _splits(cfg, tokenizer, runner, local_cluster, sample)
    world = cfg.cluster.num_workers
    feeds, _ = build_feeds(cfg, splits, streams, grad_accum, 0, world, tokenizer.pad_token_id or 0)
    for feed, stream in zip(feeds, streams or [None]):
        if feed.batches.per_epoch < grad_accum:
            rows = len(feed.batches.samples)
            what = f" of task {stream.task!r} ({stream.key}.task)" if stream else ""
            raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} is larger than the {rows} "
                              f"training {'rows' if cfg.data.packing else 'samples'}{what} can fill once")
    if cfg.data.packing and not streams:
        rows = len(feeds[0].batches.samples)
        splits.stats |= {"packed_rows": rows, "pack_fill": int(lengths_of(splits.train).sum())
                         / (rows * cfg.data.max_length)}
    if (cfg.eval.every or cfg.eval.choices or cfg.eval.before_training) and not splits.eval:
        raise ConfigError("data.eval_size: evaluation is configured but the eval split is empty")
    steps_per_epoch = max(f.batches.per_epoch for f in feeds) // grad_accum
    total = max(f.steps for f in feeds)
    if streams is None and cfg.train.warmup_steps > total:
        raise ConfigError(f"train.warmup_steps={cfg.train.warmup_steps} is more than the run's {total} optimizer "
                          f"steps: the learning rate would never reach train.lr; lower it or raise train.max_steps")
    vocabs = {f"{name}_vocab": p.vocab_size for name, p in prepared.items() if p.vocab_size is not None}
    if splits.labels:
        vocabs["labels"] = splits.labels
    warnings = (splits.warnings + _emulated_bf16(cfg, teachers, gpu)
                + _partitioned_loads(cfg, source, splits, prepared))
    return {"model_source": source, "model_type": model_config.model_type, **vocabs, "grad_accum": grad_accum,
            "total_steps": total, "steps_per_epoch": steps_per_epoch, **splits.stats, "warnings": warnings}


def _splits(cfg: RunConfig, tokenizer, runner, local_cluster: bool, sample: int | None):
    path = store_path(cfg, tokenizer) if cfg.data.store else None
    if path is not None and complete(path):
        return open_splits(path)  # exact, and read in an instant
    if sample and not cfg.data.tasks:
        splits = sampled_splits(cfg.data, tokenizer, cfg.run.seed, cfg.eval.choices, cfg.model.task, sample)
        if splits is not None:
            return splits
    if local_cluster or runner is not None:
        return splits_for(cfg, tokenizer, runner, path=path)  # data.store: built here once, read by every rank
    # A submit: the cluster's head builds the store where its workers can read it.
    return load_splits(cfg.data, tokenizer, cfg.run.seed, cfg.eval.choices, cfg.model.task)


def _check_hardware(cfg: RunConfig, gpu: bool | None, local_cluster: bool) -> None:
    """The dtype suits the workers' hardware; a local run has the GPUs it asks for and can place its workers."""
    if cfg.model.dtype == "fp16" and gpu is False:
        raise ConfigError("model.dtype: fp16 is not supported on CPU workers; use bf16 or fp32")
    if gpu and local_cluster:
        if not torch.cuda.is_available():
            raise ConfigError("cluster.use_gpu: true, but this machine has no CUDA device")
        if torch.cuda.device_count() < cfg.cluster.num_workers:
            raise ConfigError(f"cluster.num_workers={cfg.cluster.num_workers} needs as many GPUs; "
                              f"this machine has {torch.cuda.device_count()}")
        if cfg.model.dtype == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError("model.dtype: bf16 is not supported by this GPU; use fp16 or fp32")
    if local_cluster and cfg.cluster.placement == "STRICT_SPREAD" and cfg.cluster.num_workers > 1:
        # Ray would wait forever for nodes that a one-node embedded cluster never gets.
        raise ConfigError(f"cluster.placement: STRICT_SPREAD puts each of the {cfg.cluster.num_workers} workers on "
                          f"its own node, and the local embedded cluster is one node; join a cluster with "
                          f"--address, or use PACK or SPREAD")


def _check_flash_attention(cfg: RunConfig, gpu: bool | None, local_cluster: bool) -> None:
    import importlib.util

    if gpu is False:
        raise ConfigError("model.attn_implementation: flash_attention_2 runs on CUDA GPUs only and "
                          "cluster.use_gpu is false; use sdpa")
    if cfg.model.dtype == "fp32":
        raise ConfigError("model.attn_implementation: flash_attention_2 computes in bf16/fp16 only and model.dtype "
                          "is fp32; set model.dtype: bf16 (or auto on a bf16 GPU), or use sdpa")
    if local_cluster and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attn_implementation: flash_attention_2 needs the flash-attn package "
                          "(pip install flash-attn); or use sdpa")


def _partitioned_loads(cfg: RunConfig, source: str, splits, prepared: dict) -> list[str]:
    """model.load / method.teacher.placement: a checkpoint that cannot be read slice by slice is an error when
    partitioned was asked for by name, a warning (loaded whole, then partitioned by DeepSpeed) under auto."""
    from distune.models import partitioned_blueprint
    from distune.signals.loading import teacher_blueprint

    out = []
    m = cfg.model
    # A hub id is checked where the workers fetch it: validate never downloads weights.
    if cfg.loads_partitioned() and Path(source).is_dir():
        _, why = partitioned_blueprint(source, m.load == "partitioned", dtype=m.dtype,
                                       trust_remote_code=m.trust_remote_code, layers=m.layers, labels=splits.labels,
                                       task=m.task, attn_implementation=m.attn_implementation)
        if why:
            out.append(f"model.load: auto loads this model whole on every rank, then partitions it ({why})")
    for name, prep in prepared.items():
        if (get_signal(prep.spec.signal).runs_here and prep.spec.partitioned(cfg.deepspeed.stage)
                and Path(prep.source).is_dir()):
            _, why = teacher_blueprint(prep)
            if why:
                out.append(f"method.{name}.placement: partitioned, but loaded whole on every rank first ({why})")
    return out


def _emulated_bf16(cfg: RunConfig, teachers: dict, uses_gpu: bool) -> list[str]:
    """bf16 chosen for CPU workers on a CPU that only emulates it (distune.hardware): legal, but ~30x slower."""
    if uses_gpu is not False or cpu_has_native_bf16():  # None: the cluster decides (submit)
        return []
    keys = [k for k, d in (("model.dtype", cfg.model.dtype),
                           *((f"method.{name}.dtype", spec.dtype) for name, spec in teachers.items())) if d == "bf16"]
    return [f"{k}: bf16 on a CPU without native bf16 (AVX512-BF16/AMX): torch emulates it, about 30x slower than "
            f"fp32 here; use auto or fp32" for k in keys]


def _check_output_dir(cfg: RunConfig) -> None:
    """The run directory can be written: a temp file is made and removed in it, or in its nearest existing parent
    (validate creates no folder). Without it, an unwritable folder fails later: writing the config, or on the workers.
    An object store is opened (and checked) by distune.storage."""
    if is_uri(cfg.run.output_dir):
        return
    out = Path(cfg.run.output_dir)
    run_dir = out / cfg.run.name
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"run.output_dir: {existing} is a file, not a folder; choose another run.output_dir")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".distune-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        what = (f"cannot write to {existing}" if existing in (run_dir, out) else
                f"{out} does not exist and cannot be created: {existing} is not writable")
        raise ConfigError(f"run.output_dir: {what} ({e.strerror or e}); choose a folder this user can write") from None


def _check_wandb_login(cfg: RunConfig) -> None:
    """wandb.mode online needs an API key where the workers run (this machine): WANDB_API_KEY, or the netrc entry
    `wandb login` writes for the W&B host. Only whether one exists is looked at; no key is read into a message."""
    if cfg.wandb.mode != "online" or os.environ.get("WANDB_API_KEY", "").strip():
        return
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc  # wandb's netrc machine
    file = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        entry = netrc.netrc(str(file)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        entry = None  # absent or unreadable: wandb finds no key there either
    if entry and entry[2]:
        return
    raise ConfigError(f"wandb.mode: online, but this machine has no W&B credentials (WANDB_API_KEY is unset and "
                      f"{file} has no machine {host}); run `wandb login`, set WANDB_API_KEY, or use wandb.mode: "
                      f"offline")


def _check_quantization(cfg: RunConfig, method, uses_gpu: bool, local_cluster: bool) -> None:
    import importlib.util

    what = f"model.quantization: {cfg.model.quantization} (QLoRA)"
    if not uses_gpu or (local_cluster and not torch.cuda.is_available()):
        raise ConfigError(f"{what} loads the base through bitsandbytes, which needs CUDA GPUs; "
                          f"{'cluster.use_gpu is false' if not uses_gpu else 'this machine has no CUDA device'}. "
                          f"Set model.quantization: null to train the unquantised base")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{what} needs bitsandbytes: pip install 'distune[qlora]'")
    if not method.quantizable:
        raise ConfigError(f"{what}: quantised weights cannot be trained in full; use a PEFT method (lora, ia3, ...)")
    if cfg.deepspeed.stage == 3:
        raise ConfigError(f"{what}: ZeRO-3 would partition the packed 4/8-bit weights; use deepspeed.stage 0-2")


def _check_layers(cfg: RunConfig, model_config) -> None:
    """model.layers fits this architecture: built on the meta device (shapes only, no weights read)."""
    try:
        layer_indices(cfg.model.layers, model_config.num_hidden_layers)
        meta_model(model_config, cfg.model.trust_remote_code, cfg.model.task, cfg.model.layers)
    except ValueError as e:
        raise ConfigError(str(e)) from None
