"""100 tasks: 100 full copies, or 1 base + 100 adapters? N adapters in one job vs N separate jobs.

    python bench/multi_adapter.py [--adapters 3] [--steps 5] [--out bench/results/multi_adapter.json]

Base: SmolLM2-135M-Instruct (configs/sentiment-teacher.yaml's model, data and LoRA recipe, bf16, 2 Ray workers,
ZeRO-2). N tasks over the Twitter sentiment CSV, each with its own prompt (so each adapter has its own job to
learn), the same rows, steps, batch and seed in both arms:
- joint: one `distune run` with `method: adapters`, one LoRA adapter per task (the base loaded once per rank);
- separate: N `distune run`s with `method: lora`, one per task.
Both arms run through the real CLI (embedded Ray cluster, DeepSpeed, eval of every adapter at the end, export),
so wall time includes what a user waits for: cluster start, model load, DeepSpeed init, training, eval, export.
Storage: the base model's weight bytes vs the N adapter folders' bytes, and what 100 tasks would take either way.
Writes JSON and a markdown table (and prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import yaml

from harness import ROOT, SENTIMENT_RECIPE, arm_config, read_recipe, run_cli, write_results

RECIPE = SENTIMENT_RECIPE  # the base model, data and LoRA recipe
PROMPTS = [
    "Is the sentiment of this tweet negative, neutral or positive?\n\nTweet: {text}",
    "Tweet: {text}\n\nLabel its sentiment (negative, neutral or positive).",
    "Read the tweet and answer with one word, negative, neutral or positive.\n\n{text}",
    "Sentiment of: {text}",
    "How does the author of this tweet feel? negative, neutral or positive?\n\n{text}",
]


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file())


def configs(args) -> tuple[Path, list[Path]]:
    base = read_recipe(RECIPE)
    base["data"].update(limit=args.rows, eval_size=args.eval_rows, max_length=160)
    base["train"].update(max_steps=args.steps, global_batch_size=args.batch, micro_batch_size=args.batch // 2,
                         warmup_steps=1, log_every=args.steps)
    base["eval"]["micro_batch_size"] = args.eval_rows
    base["wandb"]["mode"] = "disabled"
    names = [f"task{i}" for i in range(args.adapters)]
    separate = [arm_config(base, f"separate-{name}", args.work, data={"prompt": prompt})
                for name, prompt in zip(names, PROMPTS)]
    tasks = [{"name": n, "prompt": p} for n, p in zip(names, PROMPTS)]
    joint = arm_config(base, "joint", args.work, data={"tasks": tasks}, method={
        "name": "adapters", "adapters": [{"name": n, "task": n, "method": base["method"]} for n in names]})
    return joint, separate


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=3, choices=range(1, len(PROMPTS) + 1))
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per adapter (default: 5)")
    p.add_argument("--batch", type=int, default=4, help="global batch per step (default: 4; 2 workers x 2)")
    p.add_argument("--rows", type=int, default=200, help="rows per task (default: 200)")
    p.add_argument("--eval-rows", type=int, default=16)
    p.add_argument("--joint-last", action="store_true", help="run the separate jobs first (the machine's load drifts: "
                                                             "run both orders and compare)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-multi-adapter")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "multi_adapter.json")
    args = p.parse_args(argv)
    joint_cfg, separate_cfgs = configs(args)
    load = [os.getloadavg()[0]]
    wall = {} if args.joint_last else {"joint": run_cli(["run", str(joint_cfg)], args.work / "joint.log")}
    wall["separate"] = [run_cli(["run", str(c)], args.work / f"{c.stem}.log") for c in separate_cfgs]
    if args.joint_last:
        wall["joint"] = run_cli(["run", str(joint_cfg)], args.work / "joint.log")
    load.append(os.getloadavg()[0])

    from distune.models import resolve_model_source

    base_dir = Path(resolve_model_source(yaml.safe_load(joint_cfg.read_text())["model"]["path"]))
    base_bytes = folder_bytes(base_dir, "*.safetensors")
    adapter_bytes = [folder_bytes(d) for d in sorted((args.work / "joint" / "export").iterdir()) if d.is_dir()]
    joint_results = json.loads((args.work / "joint" / "results.json").read_text())
    separate_results = [json.loads((args.work / c.stem / "results.json").read_text()) for c in separate_cfgs]
    mean_adapter = sum(adapter_bytes) / len(adapter_bytes)
    result = {
        "order": "separate, joint" if args.joint_last else "joint, separate",
        "adapters": args.adapters, "steps_per_adapter": args.steps, "global_batch": args.batch, "rows": args.rows,
        "wall_s": {"joint": round(wall["joint"], 1), "separate": [round(w, 1) for w in wall["separate"]],
                   "separate_total": round(sum(wall["separate"]), 1),
                   "ratio_separate_over_joint": round(sum(wall["separate"]) / wall["joint"], 2)},
        "bytes": {"base_weights": base_bytes, "adapter_folders": adapter_bytes,
                  "n_full_copies": base_bytes * args.adapters, "base_plus_n_adapters": base_bytes + sum(adapter_bytes),
                  "100_full_copies": base_bytes * 100, "base_plus_100_adapters": round(base_bytes + 100 * mean_adapter)},
        "eval_accuracy": {"joint": {k: v for k, v in joint_results["after"].items() if k.endswith("accuracy")},
                          "separate": [r["after"].get("eval/accuracy") for r in separate_results]},
        "base_model": str(base_dir), "load_avg_start_end": [round(x, 1) for x in load],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
    }
    write_results(args.out, result, table := report(result))
    print(table)


def report(r: dict) -> str:
    w, b, n = r["wall_s"], r["bytes"], r["adapters"]
    mb = lambda x: f"{x / 1e6:,.1f} MB"  # noqa: E731
    lines = [f"{n} LoRA adapters x {r['steps_per_adapter']} steps on SmolLM2-135M (bf16, 2 Ray workers, ZeRO-2)", "",
             "| | wall time | storage |", "|---|---|---|",
             f"| 1 job, {n} adapters (`method: adapters`) | {w['joint']:.0f} s | base {mb(b['base_weights'])} + "
             f"{n} x {mb(sum(b['adapter_folders']) / n)} = {mb(b['base_plus_n_adapters'])} |",
             f"| {n} separate jobs (`method: lora`) | {w['separate_total']:.0f} s ({', '.join(f'{x:.0f}' for x in w['separate'])}) "
             f"| {n} full copies: {mb(b['n_full_copies'])} (merged) |",
             f"| ratio separate / joint | **{w['ratio_separate_over_joint']:.2f}** (run order {r['order']}, load "
             f"average {r['load_avg_start_end'][0]} -> {r['load_avg_start_end'][1]}) | |",
             f"| 100 tasks | | 1 base + 100 adapters: {mb(b['base_plus_100_adapters'])} vs 100 copies: "
             f"{mb(b['100_full_copies'])} |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
