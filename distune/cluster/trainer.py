"""Run a config on Ray: TorchTrainer(ScalingConfig, RunConfig(FailureConfig, CheckpointConfig)).

Placement, process groups, restarts and checkpoint storage are Ray's job; each worker runs the per-rank program
it is given (`distune.worker.run`, passed in by distune.training). The driver starts an embedded local cluster on
loopback, or joins `address`, and draws the progress bar from events rank 0 pushes to a `ProgressSink` actor.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from distune.cluster.session import ray, start_ray
from distune.hardware import uses_gpu, worker_env
from distune.progress import ProgressPrinter
from distune.signals.teachers import actor_groups

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from distune.cluster.reporter import ProgressSink, RayReporter


def _train_fn(loop_config: dict) -> None:
    """Runs in every Ray worker."""
    from distune.config import load_config

    cfg = load_config(loop_config["config"])
    # Where each rank landed (every attempt: a restart may land elsewhere), printed by the driver.
    ctx = ray.get_runtime_context()
    loop_config["sink"].push.remote({"kind": "info", "text": (
        f"rank {ray.train.get_context().get_world_rank()}: node {ctx.get_node_id()[:12]} "
        f"({ray.util.get_node_ip_address()}, pid {os.getpid()})")})
    loop_config["worker"](cfg, RayReporter(loop_config["sink"]), model_source=loop_config["model_source"],
                          remote=loop_config["served"])


def cpus_wanted(cfg, teachers: dict) -> int:
    """CPUs a run's workers and its teachers' actor groups take (an embedded cluster gets at least this many).
    `teachers`: the frozen models the run's method asks for (distune.signals.TeacherSpec)."""
    actor_cpus = sum(g["actors"] * g["cpus_per_actor"] for g in actor_groups(teachers).values())
    return int(cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + actor_cpus + 0.999)


def train_on_ray(cfg, model_source: str, worker, teachers: dict, address: str | None = None,
                 show_progress: bool = True, verbose: bool = False):
    """Train `cfg` on Ray, each rank running `worker(cfg, reporter, model_source=..., remote=...)`; returns Ray's
    Result. Resumes from the run's latest checkpoint if it has one. `teachers`: the frozen models the run's method
    asks for; those whose signal runs in an actor group of its own are started first."""
    from distune.cluster.teachers import start_remote_signals, stop

    use_gpu = uses_gpu(cfg.cluster.use_gpu)
    start_ray(address, num_cpus=None if address else max(os.cpu_count() or 1, cpus_wanted(cfg, teachers)),
              verbose=verbose)
    remote = start_remote_signals(cfg, model_source, use_gpu, teachers)
    _drop_torn_ray_record(cfg.store())
    env = worker_env(cfg)
    # Events become a bar, or plain lines without show_progress. The sink lives on the driver's node: elsewhere,
    # losing that node would take the driver's progress (and its stop flag) down with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    sink = ProgressSink.options(scheduling_strategy=here).remote()
    trainer = TorchTrainer(
        _train_fn,
        train_loop_config={"config": cfg.model_dump(mode="json"), "model_source": model_source, "sink": sink,
                           "served": remote, "worker": worker},
        scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.cluster.cpus_per_worker},
                                     placement_strategy=cfg.cluster.placement),
        run_config=RunConfig(
            name=cfg.run.name, **_storage(cfg.run.output_dir),
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            worker_runtime_env={"env_vars": env} if env else None,
        ),
    )
    try:
        return _fit_with_progress(trainer, sink, show_progress)
    except Exception as e:
        why = failure_line(e, cfg.store())
        if why is None:
            raise
        raise RunFailed(why) from None
    finally:
        stop(remote)


class RunFailed(RuntimeError):
    """The run ended for a reason the user can act on: one line (the CLI prints it, exit 1)."""


def _storage(output_dir: str) -> dict:
    """Ray Train's storage for run.output_dir: a folder, or an object store through its pyarrow filesystem."""
    from distune.storage import filesystem, is_uri

    if is_uri(output_dir):
        fs, path = filesystem(output_dir)
        return {"storage_path": path, "storage_filesystem": fs}
    return {"storage_path": str(Path(output_dir).absolute())}


MEMORY_ADVICE = ("lower the per-rank peak (`distune plan CFG` shows it): model.gradient_checkpointing: true, a smaller "
                 "train.micro_batch_size (the same global batch), train.loss_chunk, deepspeed.offload_optimizer / "
                 "offload_param, or a higher deepspeed.stage")


def failure_line(error: BaseException, store=None) -> str | None:
    """One line for a failure with a known cause, found anywhere in what Ray raised (a worker's exception is
    wrapped in the trainer's, a task's in RayTaskError, sometimes only as text); None otherwise (the traceback is
    then the message). `store`: the run directory (a RunStore), to size a checkpoint when the storage filled up."""
    import re

    from distune.reporting import CheckpointWriteError, mib

    found, todo = [], [error]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is f for f in found):
            continue
        found.append(e)
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        todo += list(getattr(e, "worker_failures", {}).values())
        todo += list(getattr(e, "exceptions", None) or [])
    for e in found:
        if isinstance(e, CheckpointWriteError):
            return str(e)
    for e in found:
        written = re.search(r"CheckpointWriteError: (checkpoint step_\d+: [^\n]*)", str(e))
        if written:
            return written.group(1)
    for e in found:
        if isinstance(e, ray.exceptions.OutOfMemoryError) or "low on memory" in str(e):
            return ("a worker was killed by Ray's memory monitor: the node's memory passed its kill threshold "
                    f"(RAY_memory_usage_threshold, 0.95 by default); {MEMORY_ADVICE}")
    for e in found:
        if isinstance(e, OSError) and e.errno == 28 or "No space left on device" in str(e):
            # Ray's controller writes its own record into the same storage and may meet the full disk first.
            size = _last_checkpoint_bytes(store)
            need = (f"; a checkpoint of this run is {mib(size)}: free that much there (checkpoint.keep older "
                    f"ones are kept beside it), or set another run.output_dir") if size else ""
            return f"the run's storage {store} is full (No space left on device): a save failed half-way{need}"
    return None


RAY_RECORD = "checkpoint_manager_snapshot.json"  # Ray Train's record of its checkpoints, in the run directory


def _drop_torn_ray_record(store) -> None:
    """A save that failed on a full disk can leave Ray's own record of its checkpoints empty or cut, and Ray Train
    then refuses to start the run again. distune resumes from what the storage holds (RayReporter.restore), not
    from that record: an unreadable one is removed (Ray starts a new one)."""
    text = store.read_text(RAY_RECORD)
    if text is None:
        return
    try:
        json.loads(text)
    except ValueError:
        store.delete(RAY_RECORD)
        print(f"{store}/{RAY_RECORD} was cut short by a failed save: removed (the run resumes from the newest "
              f"complete checkpoint)", flush=True)


def _last_checkpoint_bytes(store) -> int:
    from distune.rundir import latest_complete

    name = latest_complete(store) if store is not None else None
    return store.size(name) if name else 0


def _fit_with_progress(trainer, sink, bar: bool):
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # re-raised on the driver thread below
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    printer = ProgressPrinter(bar)
    previous = _stop_on_sigterm(sink)
    try:
        while True:
            alive = thread.is_alive()
            for event in ray.get(sink.drain.remote()):
                printer.handle(event)
            if not alive:
                break
            time.sleep(0.25)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        printer.close()
        ray.kill(sink)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _stop_on_sigterm(sink):
    """First SIGTERM (a preempted head node, `distune stop`, a scheduler's grace period): ask the workers
    to checkpoint at the next step boundary and return. A second one ends the driver at once. Returns the
    handler it replaced (None off the main thread, where Python cannot install one)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        print("SIGTERM: asking the workers to checkpoint at the next step boundary (again: stop now)",
              file=sys.stderr, flush=True)
        sink.request_stop.remote()

    signal.signal(signal.SIGTERM, handler)
    return previous
