"""The per-rank program, one screen: build -> wrap -> loop -> export.

Runs the same under Ray (distune.cluster calls `run` in every worker) and without it:

    python -m distune.worker CFG [key=value ...]                       # one process
    torchrun --nproc-per-node 2 -m distune.worker CFG [key=value ...]  # several, no Ray

Imports no ray; deepspeed only through distune.engine (imported after DS_ACCELERATOR is set).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers

from distune.config import RunConfig, dump_config, load_config
from distune.data import Renderer, load_splits
from distune.feeds import build_feeds
from distune.hardware import select_accelerator
from distune.loop import Cadence, TrainState, train
from distune.methods import RunSettings, build_method
from distune.signals import BuildContext
from distune.signals import teachers as teacher_signals
from distune.models import load_model, load_tokenizer, partitioned_blueprint, source_on_this_node
from distune.reporting import CheckpointWriteError, LocalReporter, Reporter
from distune.tracking import make_tracker


def run(cfg: RunConfig, reporter: Reporter, model_source: str | None = None, remote: dict | None = None) -> dict:
    select_accelerator(cfg)
    from distune.engine import checkpoint, export
    from distune.engine.ds_config import build_ds_config
    from distune.engine.runtime import device, init_distributed, start_round

    rank, world = init_distributed(tf32=cfg.model.tf32)
    dev = device()
    transformers.utils.logging.disable_progress_bar()  # per-rank loading bars only clutter the terminal
    source = source_on_this_node(cfg.model.path, model_source)

    # Build: same seed on every rank so adapters start identical; per-rank seed afterwards for dropout.
    tokenizer = load_tokenizer(source, cfg.model.trust_remote_code)
    splits = _splits(cfg, tokenizer)
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    method = build_method(cfg.method.name, cfg.method.model_extra or {}, RunSettings.of(cfg))
    grad_accum = cfg.grad_accum_steps()
    ds_config = build_ds_config(cfg, grad_accum)
    student, adapting = _load_student(cfg, source, splits.labels, tokenizer.pad_token_id, ds_config)
    prepared = teacher_signals.preflight(method.frozen_models(), tokenizer, student.config, task=cfg.model.task)
    method.see_frozen_configs({name: p.config for name, p in prepared.items()})
    with adapting:
        model = method.adapt(student)
    # from_pretrained returns a model in eval mode: without this, dropout never acts and transformers skips
    # gradient checkpointing (it checkpoints only in training mode), so a checkpointed run stored every activation.
    model.train()
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(cfg.run.seed + rank)

    # Wrap. Packed rows are fixed from lengths alone (the step count is known before any teacher signal is
    # attached); a row is merged when read, with the per-sample extras frozen models attach.
    feeds, total = build_feeds(cfg, splits, method.streams(), grad_accum, rank, world, tokenizer.pad_token_id)
    engine, state, client = _wrap(cfg, model, method, ds_config, total, grad_accum, rank, world, reporter)
    frozen = teacher_signals.build(prepared, _build_context(ds_config, method.task, splits.train, remote))
    run_steps = max(f.steps for f in feeds)
    tracker = make_tracker(cfg, rank, dump_config(cfg))
    if client is not None:
        tracker.replay(client.get("wandb_rows", []))
    emit = reporter.progress if rank == 0 else (lambda event: None)
    if rank == 0:
        _announce_data(emit, cfg, splits, method.task, feeds)
    choice_ids = None
    if cfg.eval.choices:
        renderer = Renderer(tokenizer, cfg.data, cfg.data.path)
        choice_ids = [renderer.pair("", c)[1] for c in cfg.eval.choices]

    per_row: dict[str, dict] = {}  # "teacher" / "before" / "after" -> {line: 0 or 1}: results.json's "rows"

    def evaluate(model=None, record: str | None = None) -> dict:
        from distune.evaluation import evaluate as run_eval

        out = {}
        rows = per_row.setdefault(record, {}) if record and cfg.eval.choices else None
        for feed in filter(lambda f: f.eval, feeds):
            choices_note = f" x {len(cfg.eval.choices)} choices" if cfg.eval.choices else ""
            emit({"kind": "info", "text": f"evaluating {len(feed.eval)} held-out samples{choices_note}"
                                          + (f" of {feed.name}" if feed.name else "") + " ..."})
            method.activate(engine.module, feed.name)
            metrics = run_eval(model or engine, feed.eval, cfg.eval.micro_batch_size, tokenizer.pad_token_id, dev,
                               rank, world, cfg.eval.choices, choice_ids, splits.labels, cfg.eval.max_answer_tokens,
                               per_row=rows if sum(1 for f in feeds if f.eval) == 1 else None)
            out |= {feed.prefix + k: v for k, v in metrics.items()}
        return out

    def save(s: TrainState) -> None:
        client = s.as_client_state() | {"wandb_rows": tracker.recent()}
        reporter.checkpoint(s.step, {"step": s.step}, lambda d: checkpoint.save(engine, d, client))
        tracker.checkpointed()

    results: dict = {"params": _param_counts(engine.module)}

    def scored(record: str, when: str, step: int, model=None, prefix: str = "") -> None:
        """Evaluate, keep as results[record], log (under `prefix`) and show."""
        results[record] = evaluate(model, record)
        tracker.log({f"{prefix}{k.removeprefix('eval/') if prefix else k}": v for k, v in results[record].items()}, step)
        emit({"kind": "eval", "step": step, "metrics": results[record], "text": _eval_line(when, step,
                                                                                           results[record])})

    teacher = getattr(frozen.get("teacher"), "model", None)  # a teacher that runs on this rank: score it too
    if cfg.eval.before_training and state.step == 0 and teacher is not None:
        scored("teacher", "of the teacher", 0, teacher, prefix="teacher/")
    if cfg.eval.before_training and state.step == 0:
        scored("before", "before training", 0)

    stop = min(run_steps, cfg.train.stop_after_steps or run_steps)
    emit({"kind": "start", "step": state.step, "total_steps": stop})
    cadence = Cadence(run_steps, stop, grad_accum, cfg.train.log_every, cfg.eval.every, cfg.checkpoint.every)
    state = train(engine, method, frozen, feeds, state, cadence, dev, evaluate, save, tracker.log, emit,
                  lambda: start_round(engine), reporter.stop_requested)

    if state.step >= run_steps:
        scored("after", "after training", state.step)
        keys = method.export_keys(engine.module)
        export.release_gathered(engine)
        state_dict = export.gather_state_dict(engine.module, keys)
        if rank == 0:
            results["export"] = _publish_export(cfg.store(), method, engine.module, state_dict, tokenizer)
    tracker.finish()
    results["step"] = state.step
    if any(per_row.values()):  # eval.choices: which held-out sample (by source line) each model got right
        results["rows"] = {when: {str(line): hit for line, hit in got.items()} for when, got in per_row.items() if got}
    if rank == 0:
        cfg.store().write_text("results.json", json.dumps(results, indent=2))
    emit({"kind": "done", "step": state.step, "metrics": {"step": state.step},
          "text": f"done at step {state.step}/{run_steps}" + (f"; export: {results['export']}" if "export" in results else "")})
    return results


def _wrap(cfg: RunConfig, model, method, ds_config: dict, total: int, grad_accum: int, rank: int, world: int,
          reporter: Reporter):
    """(the training engine, the state to start from, the checkpoint's client state or None): resumed from the run's
    newest complete checkpoint when it has one, re-partitioned when another worker count wrote it."""
    from distune.engine import checkpoint
    from distune.engine.runtime import build_training_engine

    state, client = TrainState(), None
    with contextlib.ExitStack() as stack:
        ckpt_dir = stack.enter_context(reporter.restore())
        universal = None
        if ckpt_dir is not None:  # written by another worker count? then re-partition it (decided before the build)
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="distune-reshard-")))
            universal = checkpoint.reshard_source(ckpt_dir, work)
        train_ds = ds_config | {"checkpoint": {"load_universal": True}} if universal else ds_config
        engine = build_training_engine(model, train_ds, cfg.train, total, method.optimizer_groups(model),
                                       compile_model=cfg.model.compile,
                                       checkpointing=cfg.model.gradient_checkpointing)
        if ckpt_dir is not None:
            client = checkpoint.load(engine, ckpt_dir, universal)
            state = TrainState.from_client_state(client, old_world=client["world_size"], world=world)
            if universal is not None and rank == 0:
                reporter.progress({"kind": "info", "text": f"resumed step {state.step} written by "
                                                           f"{client['world_size']} workers on {world}: ZeRO states "
                                                           f"re-partitioned, {grad_accum} accumulation steps"})
    return engine, state, client


def _announce_data(emit, cfg: RunConfig, splits, task, feeds: list) -> None:
    """The run's `data:` line (its task's statistics among them) and the data's warnings."""
    st = splits.stats
    trained = task.stats_line(st, splits.labels)
    emit({"kind": "info", "text": f"data: {st['train_rows']} train / {st['eval_rows']} eval samples, "
                                  f"{st['mean_tokens']:.1f} tokens mean (max {st['max_tokens']}), "
                                  + (f"{trained}, " if trained else "") + f"{st['truncated']} truncated"
                                  + (f", packed into {len(feeds[0].batches.samples)} rows" if cfg.data.packing
                                     and len(feeds) == 1 else "")})
    for w in splits.warnings:
        emit({"kind": "info", "text": f"warning: {w}"})


def _splits(cfg: RunConfig, tokenizer):
    """The data's splits. With data.store the driver normally built the store; where it cannot be seen (another
    node's disk) the first rank of each node builds it while the others wait."""
    if not cfg.data.store:
        return load_splits(cfg.data, tokenizer, cfg.run.seed, cfg.eval.choices, cfg.model.task)
    import torch.distributed as dist

    from distune.data.prepare import open_splits, prepare, store_path
    from distune.data.rendering import process_pool
    from distune.data.store import complete

    path = store_path(cfg, tokenizer)
    alone = not dist.is_initialized() or dist.get_world_size() == 1
    if (alone or int(os.environ.get("LOCAL_RANK", 0)) == 0) and not complete(path):
        # This node's CPUs are shared with its other ranks: one process per rank of the node would not be faster.
        prepare(cfg, tokenizer, process_pool(max(1, (os.cpu_count() or 1) // max(1, int(
            os.environ.get("LOCAL_WORLD_SIZE", 1))))), path)
    if not alone:
        dist.barrier()
    if not complete(path):  # a launcher that sets no LOCAL_RANK: every rank that misses it builds it
        prepare(cfg, tokenizer, process_pool(1), path)
    return open_splits(path)


def _build_context(ds_config: dict, task, train_samples: list, served: dict | None) -> BuildContext:
    """What teacher signals may use on this rank: the engine's frozen-model builders (imported here, after
    DS_ACCELERATOR is set) and the signals the cluster layer started (`served`)."""
    from distune.engine.runtime import build_frozen_engine, frozen_ds_config
    from distune.engine.sharded_load import load_partitioned

    return BuildContext(
        stage=ds_config["zero_optimization"]["stage"], task=task, train_samples=train_samples,
        frozen_engine=lambda model, dtype, partitioned: build_frozen_engine(model, ds_config, dtype, partitioned),
        load_partitioned=lambda plan, dtype: load_partitioned(plan, frozen_ds_config(ds_config, dtype), dtype),
        served=served or {})


def _load_student(cfg: RunConfig, source: str, labels, pad_token_id: int | None, ds_config: dict):
    """The student, and the context its adapters are added in. Partitioned (model.load): built already split
    across the ZeRO-3 ranks, each reading only its own slices; adapters are then added where transformers and
    PEFT know ZeRO-3 is on (they gather a partitioned weight they must read)."""
    m = cfg.model
    plan = None
    if cfg.loads_partitioned():  # auto: where the checkpoint allows (validate said why not, if not)
        plan, _ = partitioned_blueprint(source, m.load == "partitioned", dtype=m.dtype,
                                        trust_remote_code=m.trust_remote_code, layers=m.layers, labels=labels,
                                        pad_token_id=pad_token_id, task=m.task,
                                        attn_implementation=m.attn_implementation)
    if plan is None:
        return load_model(source, m.dtype, m.trust_remote_code, m.layers, labels=labels, pad_token_id=pad_token_id,
                          task=m.task, quantization=m.quantization,
                          attn_implementation=m.attn_implementation), contextlib.nullcontext()
    from distune.engine.sharded_load import load_partitioned, zero3_aware

    return load_partitioned(plan, ds_config, m.dtype), zero3_aware(ds_config)


def _param_counts(model) -> dict:
    """Parameters of the trained model, all and trainable (ZeRO-3 partitions count whole: ds_numel)."""
    total = trainable = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return {"total": total, "trainable": trainable}


def _eval_line(when: str, step: int, metrics: dict) -> str:
    shown = "  ".join(f"{k.removeprefix('eval/')}={v:.4f}" for k, v in metrics.items())
    return f"eval {when} (step {step}): {shown}"


def _publish_export(store, method, module, state_dict: dict, tokenizer) -> str:
    """Write the artifact into a staging folder, then publish it as run_dir/export: complete or absent."""
    staged = store.staging("export")
    try:
        method.export(module, state_dict, staged)
        tokenizer.save_pretrained(staged)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return store.publish(staged, "export")


def main(argv: list[str] | None = None) -> int:
    """Entry point without Ray: one process, or one per rank under torchrun."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m distune.worker CFG [key=value ...]", file=sys.stderr)
        return 2
    cfg = load_config(args[0], args[1:])
    if cfg.store().remote:
        print(f"error: run.output_dir: {cfg.run.output_dir} is object storage, which runs under Ray write to "
              f"(distune run); without Ray, write to a folder every rank can reach", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    reporter = LocalReporter(cfg.run_dir, cfg.checkpoint.keep, rank, catch_sigterm=True)
    try:
        run(cfg, reporter)
    except CheckpointWriteError as e:
        reporter.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
