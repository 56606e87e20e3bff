"""What shares the machine with the ranks, and `distune plan`'s whole-node verdict against a measured run.

    python bench/runtime_memory.py        # ~20 min on 2 cores: bench/results/runtime_memory.{json,md}

Runs `distune run` (the real CLI: an embedded Ray cluster, 2 CPU workers) and samples, every 50 ms, each process's
private memory (RssAnon), grouped: the driver, Ray's own processes (raylet, GCS, dashboard, agents, idle workers,
Ray Train's controller, distune's progress actor) and the training workers; their sum at one instant is compared
with the verdict. The node's used memory as Ray's memory monitor sees it (MemTotal - MemAvailable, less what was
used before the run started) is shown beside it: it also moves with any other work on the machine.

- `fixed`: a 6M-parameter LoRA run: the fixed costs `distune.scale` uses (RAY_NODE = Ray's processes at the
  instant the run's processes peak, DRIVER = the driver's peak, WORKER_PROCESS = a worker's peak less the plan's
  per-rank figure for that run).
- `long` / `long-gc`: SmolLM2-135M (the offline demo model) with LoRA, rows of ~700 tokens (data.max_length 768),
  micro-batch 4, without and with gradient checkpointing: the measured whole-node peak against the verdict's
  figure (every rank with its process, Ray's processes and the driver).
- `long-gc-heap`: `long-gc` with glibc's heap serving every allocation under 32 MiB (MALLOC_MMAP_THRESHOLD_, the
  threshold glibc's default rises to), instead of the 1 MiB threshold checkpointing CPU workers set
  (distune/engine/host_memory.py): what the heap costs in memory and saves in time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

from harness import ROOT, SMOLLM2, arm_config, bpe_tokenizer, cpu_name, random_llama, write_results

RAY_PARTS = ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "agent",
             "ray::IDLE", "ray::TrainController", "ray::ProgressSink", "ray::_", "default_worker.py")


def used() -> int:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        info[key] = int(rest.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def kind(proc) -> str | None:
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:
        return None
    if "RayTrainWorker" in cmd or "ray::_RayTrainWorker" in cmd:
        return "worker"
    if any(part in cmd for part in RAY_PARTS):
        return "ray"
    return None


def anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(cfg_path: Path, log: Path, env_extra: dict | None = None) -> dict:
    import psutil

    # The previous arm's Ray processes exit after its driver does: wait for them, or their memory counts as the
    # baseline and this arm's node peak comes out too low.
    deadline = time.time() + 120
    while time.time() < deadline and any(kind(p) for p in psutil.process_iter()):
        time.sleep(0.5)
    time.sleep(2)
    before = used()
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "distune", "run", str(cfg_path), "--no-progress"],
                                stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        driver = psutil.Process(proc.pid)
        peak = {"node": 0, "processes": 0, "driver": 0, "ray": 0, "workers": 0, "worker_max": 0}
        while proc.poll() is None:
            node = used() - before
            groups = {"ray": 0, "workers": 0}
            worker_max = 0
            for p in psutil.process_iter():
                k = kind(p)  # every time: an idle Ray worker becomes a training worker
                if k == "ray":
                    groups["ray"] += anon(p.pid)
                elif k == "worker":
                    a = anon(p.pid)
                    groups["workers"] += a
                    worker_max = max(worker_max, a)
            d = anon(driver.pid)
            peak["node"] = max(peak["node"], node)
            # The run's own processes at one instant: what the verdict counts, blind to other work on the machine.
            if d + groups["ray"] + groups["workers"] > peak["processes"]:
                peak["processes"] = d + groups["ray"] + groups["workers"]
                peak["at_peak"] = {"driver": d, **groups}  # who held what at that instant
            peak["driver"] = max(peak["driver"], d)
            peak["ray"] = max(peak["ray"], groups["ray"])
            peak["workers"] = max(peak["workers"], groups["workers"])
            peak["worker_max"] = max(peak["worker_max"], worker_max)
            time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"{cfg_path.name}: distune run failed ({proc.returncode}); see {log}")
    rates = [float(m) for m in re.findall(r"^step \d+/\d+ .*tok_s=([\d.]+)", log.read_text(), re.M)][1:]
    return {**peak, "wall_s": round(time.time() - t0, 1),
            "tok_s": round(sum(rates) / len(rates), 1) if rates else None}  # steps after the first


def planned(cfg_path: Path) -> dict:
    """The verdict's figures for the config, from the same functions `distune plan` prints them with."""
    from distune.config import load_config
    from distune.plan import count_params, estimate, need_on_this_machine
    from distune.validate import validate

    cfg = load_config(cfg_path)
    summary = validate(cfg)
    counts = count_params(cfg, summary["model_source"])
    plan = estimate(cfg, summary, counts)
    row = plan["stages"][cfg.deepspeed.stage]
    return {"per_rank": row["combined"]["device"], "node": need_on_this_machine(plan, cfg, False)}


def long_rows(path: Path, n: int, words: int, seed: int = 0) -> Path:
    rnd = random.Random(seed)
    vocab = ("product quality delivery price battery screen sound works great poor returned refund would buy "
             "again never recommend excellent terrible packaging support broke after week month").split()
    with open(path, "w") as f:
        for _ in range(n):
            text = " ".join(rnd.choice(vocab) for _ in range(words))
            f.write(json.dumps({"text": text, "label": rnd.choice(["positive", "negative"])}) + "\n")
    return path


def config(work: Path, name: str, model: str, data: Path, method: dict, max_length: int, micro: int, gc: bool,
           steps: int) -> Path:
    return arm_config({}, name, work, output_dir=work / "runs",
                      model={"path": model, "dtype": "fp32", "gradient_checkpointing": gc}, method=method,
                      data={"path": str(data), "prompt": "Review: {text}\nSentiment:", "response": " {label}",
                            "max_length": max_length, "eval_size": 8},
                      train={"max_steps": steps, "micro_batch_size": micro, "global_batch_size": 2 * micro,
                             "lr": 1e-4, "log_every": 1},
                      eval={"before_training": False}, checkpoint={"every": None}, deepspeed={"stage": 2},
                      cluster={"num_workers": 2, "use_gpu": False}, wandb={"mode": "disabled"})


def tiny_model(out: Path, data: Path) -> str:
    """A 2-block, 64-wide Llama with a BPE tokenizer trained on the rows: the `fixed` arm's model."""
    if not (out / "config.json").is_file():
        rows = [json.loads(line) for line in data.read_text().splitlines()]
        tok = bpe_tokenizer([f"{r['text']} {r['label']}" for r in rows], 400)
        random_llama(out, tok, 64, 2, 128, 4, 2, max_pos=256)
    return str(out)


def main(argv=None) -> int:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--work", default="runs/bench-runtime-memory")
    a.add_argument("--out", default="bench/results/runtime_memory.json")
    a.add_argument("--arms", default="fixed,long,long-gc,long-gc-heap")
    args = a.parse_args(argv)
    os.environ.setdefault("DISTUNE_CACHE", str(ROOT / ".cache" / "distune"))
    import shutil

    from distune.models import resolve_model_source

    work = (ROOT / args.work).resolve()
    shutil.rmtree(work / "runs", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": {"cpus": os.cpu_count(), "cpu": cpu_name()}, "arms": {}}
    lora = {"name": "lora", "r": 8}
    for arm in args.arms.split(","):
        if arm == "fixed":
            data = long_rows(work / "short.jsonl", 64, 8)
            cfg = config(work, arm, tiny_model(work / "tiny", data), data, lora, 256, 4, False, 4)
        else:
            model = resolve_model_source(SMOLLM2)
            data = long_rows(work / "long.jsonl", 96, 690)
            cfg = config(work, arm, model, data, lora, 768, 4, arm.startswith("long-gc"), 4)
        plan = planned(cfg)
        heap = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20)} if arm == "long-gc-heap" else None
        got = measure(cfg, work / f"{arm}.log", heap)
        results["arms"][arm] = {"measured": got, "plan": plan,
                                "processes_over_plan": round(got["processes"] / plan["node"], 3),
                                "node_measured_over_plan": round(got["node"] / plan["node"], 3)}
        print(f"{arm:8s} the run's processes {got['processes'] / 2**30:.2f} GiB, node {got['node'] / 2**30:.2f} "
              f"(plan {plan['node'] / 2**30:.2f}: x{got['processes'] / plan['node']:.3f}); "
              f"driver {got['driver'] / 2**30:.2f}, Ray {got['ray'] / 2**30:.2f}, "
              f"workers {got['workers'] / 2**30:.2f} (largest {got['worker_max'] / 2**30:.2f}; plan per rank "
              f"{plan['per_rank'] / 2**30:.2f}), {got['wall_s']} s", flush=True)
    fixed = results["arms"].get("fixed")
    if fixed:
        m = fixed["measured"]
        at = m["at_peak"]  # Ray's processes while the workers train (their own peak comes at start-up)
        results["constants"] = {"RAY_NODE": at["ray"], "DRIVER": m["driver"],
                                "WORKER_PROCESS": m["worker_max"] - fixed["plan"]["per_rank"]}
        print("constants (GiB): " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in results["constants"].items()))
    out = ROOT / args.out
    write_results(out, results, table(results))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def table(results: dict) -> str:
    g = 2**30
    lines = [f"Machine: {results['machine']['cpu']}, {results['machine']['cpus']} cores. GiB. The run's processes: "
             "the driver's, Ray's and the workers' private memory at one instant (peak); node: MemTotal - "
             "MemAvailable less what was used before (Ray's memory monitor's measure; other work on the machine "
             "moves it).", "",
             "| arm | the run's processes (peak) | at that instant: driver / Ray / workers | plan's verdict figure | "
             "processes / plan | node | peaks: driver | Ray's processes | workers (largest) | plan per rank | wall s "
             "| tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm, r in results["arms"].items():
        m, p = r["measured"], r["plan"]
        at = m.get("at_peak", {})
        split = " / ".join(f"{at.get(k, 0) / g:.2f}" for k in ("driver", "ray", "workers"))
        lines.append(f"| {arm} | {m['processes'] / g:.2f} | {split} | {p['node'] / g:.2f} | "
                     f"{r['processes_over_plan']:.3f} | "
                     f"{m['node'] / g:.2f} | "
                     f"{m['driver'] / g:.2f} | {m['ray'] / g:.2f} | {m['workers'] / g:.2f} ({m['worker_max'] / g:.2f}) "
                     f"| {p['per_rank'] / g:.2f} | {m['wall_s']} | {m.get('tok_s')} |")
    if "constants" in results:
        lines += ["", "Fixed costs from the `fixed` arm (distune/scale.py): " + ", ".join(
            f"{k} {v / g:.2f} GiB" for k, v in results["constants"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
