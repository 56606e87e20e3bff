"""`distune` command line: validate, run. Errors are one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from importlib import import_module
from pathlib import Path


def _user_errors() -> tuple[type[BaseException], ...]:
    from distune.cluster.jobs import JobsError
    from distune.errors import ConfigError

    errors = (ConfigError, FileNotFoundError, JobsError)
    # A DataError can only come from an imported distune.data (which imports torch: not for `distune status`).
    data = sys.modules.get("distune.data")
    return errors + (data.DataError,) if data else errors


def _refuse_what_does_not_fit(cfg, summary: dict) -> None:
    """A local run whose plan does not fit this machine (distune plan's verdict): one line with what would make
    room, before any worker starts; Ray would otherwise kill the workers part-way (CPU) or CUDA run out."""
    from distune.errors import ConfigError
    from distune.plan import count_params, estimate, human, verdict
    from distune.hardware import uses_gpu

    gpu = uses_gpu(cfg.cluster.use_gpu)
    counts = count_params(cfg, summary["model_source"])
    v = verdict(estimate(cfg, summary, counts, gpu=gpu), cfg, summary, counts, gpu)
    if v["fits"] is not False:
        return
    room = ("; to make room: " + "; ".join(f"{label} -> {human(p)}" for label, p, _ in v["advice"])
            if v["advice"] else "; no single setting makes room: a smaller model, more workers or more memory")
    raise ConfigError(f"this run does not fit {'GPU 0' if gpu else 'this machine'} (distune plan): it needs "
                      f"{human(v['need'])} and {human(max(v['limit'], 0))} is available{room}; --ignore-plan runs "
                      f"it anyway")


def _version() -> str:
    """The installed package's version; the source tree's when distune runs uninstalled (PYTHONPATH)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("distune")
    except PackageNotFoundError:
        from distune import __version__

        return __version__


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `command`, only that subcommand's module is imported for its options (so
    `distune status` does not import torch)."""
    p = argparse.ArgumentParser(prog="distune", description="Ray + DeepSpeed ZeRO fine-tuning and distillation.")
    p.add_argument("--version", action="version", version=f"distune {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a config (files, model, data, batch arithmetic) without training")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*", help="key.path=value")
    v.add_argument("--sample", type=int, default=2000, metavar="ROWS",
                   help="data of more rows than this is read whole (malformed rows) but only this many are rendered, "
                        "and counts are estimated, unless its tokenized store exists; 0: render every row, building "
                        "the store (default 2000)")
    r = sub.add_parser("run", help="validate, then train on a local embedded Ray cluster or --address")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", help="key.path=value")
    r.add_argument("--address", help="join this Ray cluster (e.g. 10.0.0.1:6379) instead of starting one")
    r.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    r.add_argument("--verbose", action="store_true", help="forward every worker's log lines to this terminal")
    r.add_argument("--ignore-plan", action="store_true",
                   help="run even when `distune plan`'s verdict says the run does not fit this machine")
    for name, (module, help_text) in EXTRA_COMMANDS.items():
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("config")
        sp.add_argument("overrides", nargs="*", help="key.path=value")
        if command in (None, name):
            import_module(module).add_arguments(sp)
    for name, (module, help_text) in TOOL_COMMANDS.items():
        sp = sub.add_parser(name, help=help_text)
        if command in (None, name):
            import_module(module).add_arguments(sp)
    return p


# Commands that take a validated config and live in their own module: `add_arguments(parser)` and
# `command(cfg, summary, args) -> exit code`. Those modules import ray / torch inside `command` only, so
# building this parser stays fast.
EXTRA_COMMANDS = {
    "plan": ("distune.plan", "print the memory each teacher placement and ZeRO stage needs per rank"),
    "cache-teacher": ("distune.cache_teacher", "run the teacher once over the data (Ray tasks) and write "
                                                   "its top-k log-probs to method.cache_dir"),
    "generate": ("distune.generate", "have the teacher write responses into a dataset (sequence-level "
                                     "distillation)"),
    "submit": ("distune.cluster.submit", "validate here, then run the config on a remote Ray cluster through the "
                                         "Jobs API (--address http://HEAD:8265)"),
    "eval": ("distune.eval_command", "score the task as zero-shot / few-shot / CoT / self-consistency prompting "
                                     "and as fine-tuned checkpoints, with format errors counted"),
}

# Commands that do not validate a config here first (none to validate, or one whose files live on a cluster):
# `add_arguments(parser)` and `command(args) -> exit code`, same rules.
TOOL_COMMANDS = {
    "adapters": ("distune.adapters.command", "adapter folders: list, export one from a run, merge into the base, "
                                             "generate with several adapters on one base"),
    "status": ("distune.cluster.jobs", "a submitted job's state"),
    "logs": ("distune.cluster.jobs", "a submitted job's log (--follow to stream it)"),
    "stop": ("distune.cluster.jobs", "stop a submitted job (it checkpoints at the next step boundary)"),
    "list": ("distune.cluster.jobs", "the jobs on a cluster"),
    "k8s": ("distune.k8s", "Kubernetes (KubeRay): `render CFG` prints a RayJob + the config's ConfigMap"),
    "prepare": ("distune.prepare_command", "tokenize the config's data once into its memory-mapped store (a Ray "
                                           "Data job; `run` does it when the store is missing)"),
}


def _project_local_caches() -> None:
    # DeepSpeed JIT-compiles ops per machine; a shared ~/.cache/torch_extensions gets rebuilt by every venv,
    # so keep them per environment (inside the venv when it is writable).
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        from distune.paths import cache_root

        own = Path(sys.prefix) / "torch_extensions"
        writable = os.access(sys.prefix, os.W_OK)
        key = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
        os.environ["TORCH_EXTENSIONS_DIR"] = str(own if writable else cache_root() / "torch_extensions" / key)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--version"]:  # answered here: the whole parser imports every subcommand's module (torch: seconds)
        print(f"distune {_version()}")
        return 0
    parser = _parser(next((a for a in argv if not a.startswith("-")), None))
    args, extra = parser.parse_known_args(argv)
    # Overrides after an option (`distune plan CFG --gpu h100 train.lr=1e-4`): argparse takes positionals only
    # before the first option; what is left that reads key=value is an override too.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _project_local_caches()
    if args.command in TOOL_COMMANDS:
        try:
            return import_module(TOOL_COMMANDS[args.command][0]).command(args)
        except _user_errors() as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    from distune.config import load_config
    from distune.pipeline import is_pipeline

    address = getattr(args, "address", None)
    joins = address and args.command != "submit"  # submit's address is the dashboard's: jobs.py
    pipeline = is_pipeline(args.config)
    if pipeline and args.command not in ("validate", "run", "plan"):
        print(f"error: {args.config} is a pipeline (it has stages:): `distune {args.command}` takes one config; "
              f"run the pipeline with `distune run`, or give one stage's config", file=sys.stderr)
        return 2
    try:
        if joins:
            from distune.cluster.address import check_gcs_address

            check_gcs_address(address)  # seconds, before validation reads the model and the data
        # On a cluster, `use_gpu: auto` / `dtype: auto` are the cluster's to decide: a submitted job's head
        # resolves them when it runs this command with --address auto.
        resolve = not (joins or args.command == "submit")
        if pipeline:
            from distune.pipeline import load_pipeline

            stages = load_pipeline(args.config, args.overrides, resolve=resolve)
        else:
            cfg = load_config(args.config, args.overrides, resolve=resolve)
        if joins:
            from distune.cluster.session import start_ray

            start_ray(address, verbose=getattr(args, "verbose", False))
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if pipeline:
        return _pipeline(stages, args)
    return _one(cfg, args, args.config)


def _pipeline(stages, args) -> int:
    """Each stage in order, on one Ray cluster: done ones skipped, cut ones resumed, changed ones started over;
    then the pipeline's report, when it has one."""
    from distune.pipeline import load_report, published, state

    try:
        report = load_report(args.config, stages)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    reran: set[str] = set()
    by_name = {s.name: s for s in stages}
    for i, stage in enumerate(stages, 1):
        head = f"== stage {stage.name} ({i}/{len(stages)})"
        if args.command != "run":
            waiting = [n for n in stage.needs if not published(by_name[n].cfg.store(), "export")]
            if waiting:  # its model or data is an earlier stage's export: checked once that exists
                print(f"{head}: config ok; its inputs are checked once stage {', '.join(waiting)} has run",
                      flush=True)
                continue
            if stage.generate is not None and args.command == "plan":
                print(f"{head}: generates a dataset (no training to plan); config checked by distune validate",
                      flush=True)
                continue
            print(head, flush=True)
            rc = _one(stage.cfg, args, f"stage {stage.name}")
            if rc:
                return rc
            continue
        what, why = state(stage, reran)
        if what == "done":
            print(f"{head}: done ({why}): {stage.export}", flush=True)
            continue
        print(f"{head}: {what}" + (f" ({why})" if why else ""), flush=True)
        if not reran and not args.address:  # the first stage to run starts the cluster all of them share
            from distune.cluster.session import start_ray
            from distune.training import cpus_wanted

            start_ray(None, num_cpus=max(os.cpu_count() or 1, *(cpus_wanted(s.cfg) for s in stages)),
                      verbose=args.verbose)
        if what == "start over":
            stage.cfg.store().clear()
        reran.add(stage.name)
        began = time.time()
        rc = _generate_stage(stage, args) if stage.generate is not None else _one(stage.cfg, args,
                                                                                  f"stage {stage.name}")
        if rc:
            return rc
        if not published(stage.cfg.store(), "export"):  # stopped early (train.stop_after_steps)
            print(f"stage {stage.name} stopped before its export: run the same command again to resume",
                  file=sys.stderr)
            return 143
        stage.cfg.store().write_text("stage.json", json.dumps(
            {"seconds": round(time.time() - began, 1), "resumed": what == "resume"}))
    if args.command == "run":
        print("pipeline done: " + ", ".join(f"{s.name} -> {s.export}" for s in stages))
        if report is not None:
            from distune.pipeline_report import pipeline_report

            print(pipeline_report(args.config, stages, report), flush=True)
    return 0


def _generate_stage(stage, args) -> int:
    """A pipeline stage that writes a dataset (distune generate) into its run directory's export folder, published
    by one rename once complete (a cut stage leaves no export and runs again)."""
    import shutil

    from distune.rundir import write_config

    run_dir = Path(stage.cfg.run_location)
    work = run_dir / "generating"
    shutil.rmtree(work, ignore_errors=True)
    gen_args = argparse.Namespace(**stage.generate, command="generate", out=str(work / "generated.jsonl"),
                                  force=True, address=args.address, no_progress=args.no_progress,
                                  verbose=args.verbose, ignore_plan=True, overrides=[])
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(stage.cfg, {"generate": stage.generate})
    rc = _one(stage.cfg, gen_args, f"stage {stage.name}")
    if rc:
        return rc
    os.replace(work, run_dir / "export")
    return 0


def _one(cfg, args, label: str) -> int:
    """Validate one config, then the command: the whole of `distune CMD CFG`, or one stage of a pipeline."""
    from distune.validate import validate

    address = getattr(args, "address", None)
    joins = address and args.command != "submit"
    try:
        if joins:
            from distune.cluster.target import resolve_on_cluster

            print(resolve_on_cluster(cfg), flush=True)
        print(f"validating {label} ...", flush=True)
        # A paper plan (`plan --gpu`) is for a cluster that is not this machine, as a submit's is.
        elsewhere = address or args.command == "submit" or getattr(args, "gpu", None)
        from distune.data.rendering import process_pool, with_progress

        runner = None if elsewhere and not joins else process_pool()  # a submit's head builds its own store
        if joins:  # on the cluster: the store is tokenized by a Ray Data job over its CPUs
            from distune.cluster.prepare import ray_data_runner

            runner = ray_data_runner()
        if runner is not None and not getattr(args, "no_progress", False):
            runner = with_progress(runner)
        sample = getattr(args, "sample", None) if args.command == "validate" else None
        summary = validate(cfg, local_cluster=not elsewhere, runner=runner, sample=sample or None,
                           check_cache=args.command not in ("cache-teacher", "plan"))  # plan: before it exists
        if args.command in ("validate", "run", "submit"):
            from distune.rundir import check_resumable

            check_resumable(cfg)  # before any worker starts, and before the run directory's record is replaced
        if args.command == "run" and not address and not args.ignore_plan:
            _refuse_what_does_not_fit(cfg, summary)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items() if k != "warnings"}
    print("ok: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    for w in summary.get("warnings", []):
        print(f"warning: {w}")
    if args.command == "validate":
        return 0
    if args.command in EXTRA_COMMANDS:
        try:
            return import_module(EXTRA_COMMANDS[args.command][0]).command(cfg, summary, args)
        except _user_errors() as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    from distune.training import RunFailed, fit
    from distune.rundir import write_config
    from distune.tracking import run_id

    write_config(cfg)

    if cfg.wandb.mode != "disabled":
        run_id(cfg.run_dir, cfg.store())  # fixed before any worker starts: every restart logs to the same W&B run
    try:
        fit(cfg, summary["model_source"], address=address, show_progress=not args.no_progress,
            verbose=args.verbose)
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"run directory: {cfg.store()}")
    done = json.loads(cfg.store().read_text("results.json"))["step"]
    if done < min(summary["total_steps"], cfg.train.stop_after_steps or summary["total_steps"]):
        # Stopped on request (SIGTERM): the checkpoint is written; a non-zero exit makes schedulers retry.
        print(f"stopped at step {done} of {summary['total_steps']}: run the same command again to resume",
              file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
