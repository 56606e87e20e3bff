"""The performance suite: tokens/s, step time, MFU and peak memory per rank, against baselines run in the same session.

    python bench/perf.py                         # the CPU suite (~24 min on 2 idle cores)
    python bench/perf.py --rounds 1 --steps 2 --seqs 128 --shapes 256x4 --out /tmp/perf.json   # smoke, ~6 min
    python bench/perf.py --gpu-1b                # one GPU: the Llama-shape ~1B model at seq 2048 (bench/README.md)
    python bench/perf.py --rescore bench/results/perf.json   # MFU again from a saved run's step times

Every (round, arm) is one subprocess running one rank (world of one: gloo on CPU, nccl on a GPU) for warmup + steps
optimizer steps; arms go round-robin, the order rotated every round, so machine noise hits all of them alike; the
warmup steps of each subprocess are dropped. All arms train the same random-weight Llama shape on the same rows:
word-level tokens, so a row is exactly `seq` tokens (prompt + a response of seq/8 tokens; the loss on the response,
or on every token with --train-on-inputs). The arms:

  distune  full-z0..z3     full fine-tuning through `distune.worker.run` at ZeRO stage 0-3
           full-z2-offload ZeRO-2 with the optimizer in host memory; full-z3-offload: ZeRO-3, parameters too
           lora            LoRA r=16 on every linear layer, ZeRO-2
           kd-online       distillation, a 2x wider teacher on the same rank, dense logits (ZeRO-2)
           kd-cached       the same from the teacher's top-64 cache (built once first, not timed)
           kd-remote       the teacher on its own Ray actor (top-64), the loop prefetching the next micro-batches
           kd-remote-sync  the same without prefetch: the student waits for every answer
           gkd             on-policy: the student samples 16 tokens per prompt, the teacher scores them
  baseline hand-ds         the loop a user writes by hand: deepspeed.initialize + the model's own loss (HF's
                           full-logits CE) + engine.backward / engine.step, same ds config as full-z2
           hf-trainer      transformers.Trainer with the same DeepSpeed config as full-z2 (needs accelerate)
           trl-gkd         TRL's GKDTrainer (trl.experimental.gkd), the same student/teacher/lmbda=1 (needs trl)
A size / sequence sweep adds full-z2 and lora at every --shapes x --seqs.

Figures: median step time; tokens/s = seq x global batch / step time; MFU = model FLOPs per second / peak, where model
FLOPs per token = 6·N_body + 6·V·h·f + 12·L·h·s for full fine-tuning (N_body: parameters but the input embedding,
whose lookup has no FLOPs, and the output head, which distune runs only on the fraction f of trained positions;
12·L·h·s: attention scores and values, forward + backward, PaLM's appendix B convention), 4·N_body + 6·N_trained +
4·V·h·f for PEFT (frozen weights need no weight gradient), + 2·N_T,body + 2·V_T·h_T·f + 4·L_T·h_T·s for a teacher
forward on the same rank (online and GKD only: a cached or remote teacher runs elsewhere); GKD's sampling is not
counted (its MFU understates). Peak: the GPU's dense bf16 figure (H100/H200 989 TFLOP/s, A100 312) or, on CPU, the best
torch.matmul rate measured at the start of this run with the same threads and dtype. Peak memory: on a GPU
torch.cuda.max_memory_allocated; on CPU the growth of the process's resident memory (sampled, RssPeak) over its
value once the libraries are imported, before the model loads: what `distune plan` predicts there (device and host
in one RAM), plus the runtime's fixed ~25-80 MiB (gloo, DeepSpeed's buffers, allocator) that dominates toy shapes.
The memory check (--memory-shapes, --memory-only) therefore runs the ZeRO/offload/LoRA arms again at shapes where
the model states dominate, with glibc's mmap threshold fixed so a freed tensor leaves the RSS at once, and reports
measured / plan. Saved: JSON (every step time), markdown, PNG.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from harness import (build_cache, child_env, device_name, pyplot, random_llama, run_child, run_rounds, save_figure,
                     timed_run, write_results)

GPU_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
WORDS = "w{}"  # the word-level vocabulary: one word, one token


# ----------------------------------------------------------------------------------------------- artifacts

def build_tokenizer(vocab: int):
    """A word-level tokenizer over the words w0, w1, ...: one word, one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    words = {w: i for i, w in enumerate(specials + [WORDS.format(i) for i in range(vocab - len(specials))])}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def llama_config(shape: str, vocab: int, max_pos: int = 2048, **extra):
    """The Llama of `hidden x layers`: heads of 64, GQA 2:1, MLP hidden·8/3 rounded up to 64, untied head."""
    from transformers import LlamaConfig

    hidden, layers = map(int, shape.split("x"))
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3 / 64 + 1) * 64,
                       num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                       num_key_value_heads=max(1, hidden // 128), max_position_embeddings=max_pos,
                       tie_word_embeddings=False, **extra)


def build_model(out: Path, shape: str, vocab: int, max_pos: int) -> Path:
    """A random Llama of `shape` (llama_config), its word-level tokenizer inside."""
    c = llama_config(shape, vocab)
    return random_llama(out, build_tokenizer(vocab), c.hidden_size, c.num_hidden_layers, c.intermediate_size,
                        c.num_attention_heads, c.num_key_value_heads, max_pos)


def write_rows(path: Path, n: int, seq: int, vocab: int) -> Path:
    """Rows of exactly `seq` tokens: <s> + prompt words + response words + </s>, the response seq/8 long."""
    import random

    rng = random.Random(0)
    resp = max(1, seq // 8)
    word = lambda: WORDS.format(rng.randrange(vocab - 4))  # noqa: E731
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": " ".join(word() for _ in range(seq - resp - 2)),
                                "response": " ".join(word() for _ in range(resp))}) + "\n")
    return path


# ----------------------------------------------------------------------------------------------- one rank

def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class RssPeak:
    """The peak of the process's resident memory (VmRSS) over its value at start, sampled every `interval` s.

    Not VmHWM, which would count the import transients before the start. File-backed pages count: frozen weights
    may stay mmapped from their safetensors file (LoRA's do), and they are memory the run holds. memory_check runs
    its children with a fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves the RSS at once instead of
    lingering in the heap: the RSS then follows the live tensors, the CPU's counterpart of the CUDA allocator's
    max_memory_allocated. Sampling misses nothing that matters: an allocation large enough to count takes far
    longer than `interval` to fault in."""

    def __init__(self, interval: float = 0.002):
        import threading

        self.start = self.peak = _status_kib("VmRSS") * 1024
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(interval,), daemon=True)
        self._thread.start()

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, _status_kib("VmRSS") * 1024)

    def growth(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kib("VmRSS") * 1024)
        return self.peak - self.start


def peak_memory(rss: RssPeak) -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else rss.growth()


def _world_of_one() -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def _samples(cfg):
    from distune.data import load_splits
    from distune.models import load_tokenizer

    tok = load_tokenizer(cfg.model.path)
    return tok, load_splits(cfg.data, tok, cfg.run.seed).train


def hand_ds(cfg, steps: int) -> list[float]:
    """deepspeed.initialize + HF's own loss (labels in, full logits) + backward/step: what a user writes by hand."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    from distune.data import collate
    from distune.engine.ds_config import build_ds_config
    from distune.models import DTYPES

    tok, samples = _samples(cfg)
    accum = cfg.grad_accum_steps()
    micro = cfg.train.micro_batch_size
    batches = [collate(samples[i:i + micro], tok.pad_token_id) for i in range(0, len(samples) - micro + 1, micro)]
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=DTYPES[cfg.model.dtype])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=build_ds_config(cfg, accum))
    dev = engine.device
    times = [time.perf_counter()]
    it = iter(batches * (1 + steps * accum // max(1, len(batches))))
    for _ in range(steps):
        for _ in range(accum):
            b = {k: v.to(dev) for k, v in next(it).items()}
            loss = engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
            engine.backward(loss)
            engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    return times


class _Timer:
    """A TrainerCallback (built lazily: transformers is imported in the child only) stamping every step end."""

    @staticmethod
    def make(times: list[float]):
        from transformers import TrainerCallback

        class Stamp(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                times.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times.append(time.perf_counter())

        return Stamp()


def _training_args(cfg, out: Path, cls=None, **extra):
    from transformers import TrainingArguments

    from distune.engine.ds_config import build_ds_config

    ds = build_ds_config(cfg, cfg.grad_accum_steps())
    ds = {k: v for k, v in ds.items() if k not in ("train_batch_size", "steps_per_print")}
    ds["train_micro_batch_size_per_gpu"] = "auto"
    ds["gradient_accumulation_steps"] = "auto"
    return (cls or TrainingArguments)(
        output_dir=str(out), max_steps=cfg.train.max_steps, per_device_train_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=cfg.grad_accum_steps(), learning_rate=cfg.train.lr, bf16=cfg.model.dtype == "bf16",
        deepspeed=ds, logging_steps=10**6, save_strategy="no", report_to=[], remove_unused_columns=False,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), lr_scheduler_type="constant",
        max_grad_norm=cfg.train.grad_clip or 0.0, **extra)


def hf_trainer(cfg, steps: int) -> list[float]:
    from transformers import AutoModelForCausalLM, Trainer

    from distune.data import collate
    from distune.models import DTYPES

    tok, samples = _samples(cfg)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=DTYPES[cfg.model.dtype])
    times: list[float] = []
    trainer = Trainer(model=model, args=_training_args(cfg, cfg.run_dir), train_dataset=samples,
                      data_collator=lambda rows: dict(collate(rows, tok.pad_token_id)),  # the Trainer wants a dict
                      callbacks=[_Timer.make(times)])
    trainer.train()
    return times


def trl_gkd(cfg, steps: int) -> list[float]:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distune.models import DTYPES

    mc = cfg.method_config()
    rows = [json.loads(line) for line in Path(cfg.data.path).read_text().splitlines()]
    data = Dataset.from_list([{"messages": [{"role": "user", "content": r["prompt"]},
                                            {"role": "assistant", "content": r["response"]}]} for r in rows])
    tok, _ = _samples(cfg)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    student = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=DTYPES[cfg.model.dtype])
    teacher = AutoModelForCausalLM.from_pretrained(mc.teacher.path, dtype=DTYPES[mc.teacher.dtype])
    args = _training_args(cfg, cfg.run_dir, cls=GKDConfig, lmbda=mc.gkd.lmbda, beta=mc.divergence_params.get(
        "beta", 0.5), temperature=mc.gkd.temperature, max_new_tokens=mc.gkd.max_new_tokens,
        max_length=cfg.data.max_length + mc.gkd.max_new_tokens)
    times: list[float] = []
    GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tok,
               callbacks=[_Timer.make(times)]).train()
    return times


def remote_teachers(cfg) -> dict:
    """What `distune run` starts for `signal: remote`: the teacher's Ray actor group (here an embedded cluster)."""
    import ray

    from distune.cluster.teachers import start_remote_signals
    from distune.methods import frozen_models

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    return start_remote_signals(cfg, str(cfg.model.path), torch.cuda.is_available(), frozen_models(cfg))


def child(kind: str, cfg_json: str, out_json: str) -> int:
    """One arm, one round, one process: step timestamps and the peak memory."""
    from distune.config import load_config

    _world_of_one()
    cfg = load_config(json.loads(Path(cfg_json).read_text()))
    # Libraries first: their import (~100 MB of RSS) is not what `distune plan` predicts.
    for module in ("deepspeed", "peft", "transformers", "distune.worker"):
        importlib.import_module(module)
    rss = RssPeak()
    steps = cfg.train.max_steps
    if kind in ("distune", "distune-remote"):
        clock = timed_run(cfg, remote=remote_teachers(cfg) if kind == "distune-remote" else None)
        times = [t for t, _ in clock.times]
    else:
        times = {"hand-ds": hand_ds, "hf-trainer": hf_trainer, "trl-gkd": trl_gkd}[kind](cfg, steps)
    Path(out_json).write_text(json.dumps({"step_s": [b - a for a, b in zip(times, times[1:])],
                                          "peak_bytes": peak_memory(rss), "start_rss": rss.start,
                                          "torch_threads": torch.get_num_threads()}))
    return 0


# ----------------------------------------------------------------------------------------------- the suite

def matmul_peak(dtype: torch.dtype, seconds: float = 4.0) -> float:
    """FLOP/s of the best square matmul (1024^2 .. 4096^2) this process sustains: the practical peak for MFU."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    best = 0.0
    for n in (1024, 2048, 4096):
        a = torch.randn(n, n, dtype=dtype, device=dev)
        end = time.perf_counter() + seconds / 3
        while time.perf_counter() < end:
            t = time.perf_counter()
            a @ a
            if dev == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def peak_flops(dtype: str) -> tuple[float, str]:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, flops in GPU_PEAK.items():
            if key in name:
                return flops, f"{name} dense bf16 datasheet"
        return matmul_peak(torch.bfloat16), f"{name}: best measured bf16 matmul"
    d = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    return matmul_peak(d), f"best measured {dtype} square matmul, {torch.get_num_threads()} thread(s)"


def model_flops_per_token(counts: dict, teacher: dict | None, seq: int, trained: float) -> float:
    """Per token: the body (everything but the embedding lookup and the output head) on every token, the head on
    the `trained` fraction of tokens only (distune runs it there alone), attention scores and values; + a teacher
    forward when the teacher runs on this rank."""
    head = counts["vocab"] * counts["hidden"]
    body = counts["trainable"] + counts["frozen"] - 2 * head  # untied input embedding and output head
    attn = 12 * counts["layers"] * counts["hidden"] * seq
    peft = counts["frozen"] > 0
    # Frozen weights need the forward and the input gradient (4), trained ones the weight gradient too (6).
    flops = (4 * body + 6 * counts["trainable"] + 4 * head * trained + attn) if peft else \
        (6 * body + 6 * head * trained + attn)
    if teacher:
        t_head = teacher["vocab"] * teacher["hidden"]
        flops += 2 * (teacher["params"] - 2 * t_head) + 2 * t_head * trained + \
            4 * teacher["layers"] * teacher["hidden"] * seq
    return flops


def arms_for(args, models: dict, data: dict, tmp: Path, quiet: bool = False) -> dict[str, tuple[str, dict]]:
    """name -> (child kind, run config)."""
    micro, accum = map(int, args.batch.split("x"))
    steps = args.warmup + args.steps

    def config(shape: str, seq: int, **sections) -> dict:
        cfg = {"run": {"output_dir": str(tmp / "runs"), "seed": 0, "name": "x"},
               "model": {"path": str(models[shape]), "dtype": args.dtype},
               "method": {"name": "full"},
               "data": {"path": str(data[seq]), "prompt": "{prompt}", "response": "{response}",
                        "use_chat_template": False, "max_length": seq, "eval_size": 0,
                        "train_on_inputs": args.train_on_inputs, "limit": micro * accum * steps},
               "train": {"max_steps": steps, "global_batch_size": micro * accum, "micro_batch_size": micro,
                         "lr": 1e-4, "warmup_steps": 0, "log_every": 1, "grad_clip": 1.0},
               "eval": {"before_training": False},
               "checkpoint": {"every": None},
               "deepspeed": {"stage": 2}, "cluster": {"num_workers": 1, "use_gpu": "auto"},
               "wandb": {"mode": "disabled"}}
        for section, values in sections.items():
            cfg[section] = {**cfg.get(section, {}), **values}
        return cfg

    shape, seq = args.shapes[0], args.seqs[0]
    lora = {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}
    teacher = {"path": str(models["teacher"]), "dtype": args.dtype}
    kd = {"name": "distill", "student": {"name": "full"}, "teacher": teacher, "kd_weight": 0.5,
          "divergence": "jsd", "divergence_params": {"beta": 0.5}}
    arms = {f"full-z{s}": ("distune", config(shape, seq, deepspeed={"stage": s})) for s in range(4)}
    arms["full-z2-offload"] = ("distune", config(shape, seq, deepspeed={"stage": 2, "offload_optimizer": True}))
    arms["full-z3-offload"] = ("distune", config(shape, seq, deepspeed={"stage": 3, "offload_optimizer": True,
                                                                       "offload_param": True}))
    arms["lora"] = ("distune", config(shape, seq, method=lora))
    arms["kd-online"] = ("distune", config(shape, seq, method=kd))
    arms["kd-cached"] = ("distune", config(shape, seq, method={**kd, "signal": "cached", "top_k": 64,
                                                               "cache_dir": str(tmp / "cache")}))
    # The teacher on its own Ray actor (its own process; on a GPU machine, a GPU of its own), with and without
    # the loop's prefetch: the overlap of the teacher's forward with the student's step.
    remote = {**kd, "signal": "remote", "top_k": 64,
              "remote": {"cpus_per_actor": 1, "gpus_per_actor": 1 if torch.cuda.is_available() else 0}}
    arms["kd-remote"] = ("distune-remote", config(shape, seq, method=remote))
    arms["kd-remote-sync"] = ("distune-remote", config(shape, seq, method={
        **remote, "remote": {**remote["remote"], "prefetch": False}}))
    gkd = {**kd, "gkd": {"lmbda": 1.0, "max_new_tokens": 16}}
    # On-policy samples continue the prompt: a response-only loss leaves a prompt to continue.
    arms["gkd"] = ("distune", config(shape, seq, method=gkd, data={"train_on_inputs": False}))
    arms["hand-ds"] = ("hand-ds", config(shape, seq))
    arms["hf-trainer"] = ("hf-trainer", config(shape, seq))
    arms["trl-gkd"] = ("trl-gkd", config(shape, seq, method=gkd, data={"train_on_inputs": False}))
    for sh in args.shapes:
        for sq in args.seqs:
            if (sh, sq) != (shape, seq):
                arms[f"full-z2 {sh} s{sq}"] = ("distune", config(sh, sq))
                arms[f"lora {sh} s{sq}"] = ("distune", config(sh, sq, method=lora))
    skip = set()
    for name, module in (("hf-trainer", "accelerate"), ("trl-gkd", "trl")):
        if importlib.util.find_spec(module) is None:
            if not quiet:
                print(f"{name}: not measured ({module} is not installed: pip install -e .[bench])")
            skip.add(name)
    return {k: v for k, v in arms.items() if k not in skip and (not args.arms or k in args.arms)}


def predicted(cfg_dict: dict) -> tuple[dict, dict, dict | None]:
    """`distune plan`'s per-rank estimate for the arm's own stage (device + host), and the parameter counts."""
    from distune.config import load_config
    from distune.plan import count_params, estimate
    from distune.validate import validate

    cfg = load_config(cfg_dict)
    summary = validate(cfg, check_cache=False)
    counts = count_params(cfg, summary["model_source"])
    gpu = torch.cuda.is_available()
    plan = estimate(cfg, summary, counts, gpu=gpu)
    row = plan["stages"][cfg.deepspeed.stage]
    signal = plan["teacher"]["signal"] if plan["teacher"] else "device"
    # The measurement: the GPU's allocator on a GPU, the whole process (device and host parts in one RAM) on CPU.
    total = row["total"][signal] if gpu else row["combined"][signal]
    teacher = None
    if "teacher" in counts:
        from distune.models import load_model_config, resolve_model_source

        t = load_model_config(resolve_model_source(cfg.method_config().teacher.path))
        teacher = {**counts["teacher"], "hidden": t.hidden_size, "layers": t.num_hidden_layers}
    return {**row, "total": total}, counts, teacher


def largest_fitting(args, tmp: Path, memory: int, seq: int) -> list[dict]:
    """Per method, the biggest Llama shape of a ladder whose `distune plan` estimate fits `memory` (one rank)."""
    from distune.config import load_config
    from distune.plan import count_params, estimate

    ladder = ["512x8", "1024x16", "2048x16", "2048x24", "3072x28", "4096x32", "5120x40", "8192x48", "8192x80"]
    micro = int(args.batch.split("x")[0])
    methods = {"full z0": ({"name": "full"}, {"stage": 0}), "full z3": ({"name": "full"}, {"stage": 3}),
               "full z3 + offload": ({"name": "full"}, {"stage": 3, "offload_optimizer": True,
                                                         "offload_param": True}),
               "lora z2": ({"name": "lora", "r": 16, "target_modules": "all-linear"}, {"stage": 2})}
    out = []
    for name, (method, ds) in methods.items():
        best = None
        for shape in ladder:
            folder = tmp / "shapes" / shape
            if not (folder / "config.json").is_file():
                build_tokenizer(args.vocab).save_pretrained(folder)
                llama_config(shape, args.vocab, max(seq, 2048)).save_pretrained(folder)
            cfg = load_config({"run": {"name": "fit", "output_dir": str(tmp / "runs")},
                               "model": {"path": str(folder), "dtype": args.dtype,
                                         "gradient_checkpointing": True},
                               "method": method, "data": {"path": "unused.jsonl", "max_length": seq},
                               "train": {"global_batch_size": micro, "micro_batch_size": micro},
                               "deepspeed": ds, "cluster": {"num_workers": 1}})
            counts = count_params(cfg, str(folder))
            gpu = torch.cuda.is_available()
            row = estimate(cfg, {"trained_token_fraction": 1.0}, counts, gpu=gpu)["stages"][ds["stage"]]
            need = row["total"]["device"] if gpu else row["combined"]["device"]
            if need <= memory:
                best = {"method": name, "shape": shape, "params": counts["trainable"] + counts["frozen"],
                        "predicted_bytes": need}
        out.append(best or {"method": name, "shape": None})
    return out


MEMORY_ARMS = ["full-z0", "full-z1", "full-z2", "full-z3", "full-z2-offload", "full-z3-offload", "lora"]


def memory_check(args, tmp: Path) -> list[dict]:
    """`distune plan` against the measured peak, at shapes where the model states dominate the runtime's fixed
    costs: every ZeRO stage and offload arm plus LoRA on the first --memory-shapes shape, LoRA alone on the others
    (a LoRA run's memory is its frozen weights: only a bigger model drowns the fixed costs). One rank, micro-batch 1,
    --memory-seq tokens, warmup + one step (the peak comes at the second step, once Adam's state exists)."""
    env = child_env(args.threads, MALLOC_MMAP_THRESHOLD_="65536")
    out = []
    for i, shape in enumerate(args.memory_shapes):
        folder = build_model(tmp / f"mem-{shape}", shape, args.vocab, args.memory_seq + 64)
        rows = write_rows(tmp / f"mem-rows-{args.memory_seq}.jsonl", 4, args.memory_seq, args.vocab)
        one = argparse.Namespace(**{**vars(args), "batch": "1x1", "warmup": 1, "steps": 1, "shapes": [shape],
                                    "seqs": [args.memory_seq], "arms": MEMORY_ARMS if i == 0 else ["lora"]})
        arms = arms_for(one, {shape: folder, "teacher": folder}, {args.memory_seq: rows}, tmp, quiet=True)
        for arm, (kind, cfg) in arms.items():
            slug = f"mem-{shape}-{arm}"
            measured = run_child(Path(__file__), kind, cfg, slug, tmp, env,
                                 f"memory arm {arm!r} at {shape}")["peak_bytes"]
            plan, counts, _ = predicted(cfg)
            out.append({"arm": arm, "shape": shape, "seq": args.memory_seq,
                        "params": counts["trainable"] + counts["frozen"], "trainable": counts["trainable"],
                        "peak_bytes": measured, "plan_bytes": plan["total"], "plan_ratio": measured / plan["total"],
                        "plan_parts": {k: plan[k] for k in ("weights", "grads", "optimizer", "activations",
                                                            "buffers", "step", "host")}})
            shutil.rmtree(tmp / "runs" / slug, ignore_errors=True)
            print(f"memory {shape} {arm}: measured {gib(measured)}, plan {gib(plan['total'])} "
                  f"({measured / plan['total']:.3f})", flush=True)
    return out


def memory_lines(rows: list[dict]) -> list[str]:
    lines = ["| arm | model | trainable | measured peak | `distune plan` | measured / plan |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['shape']} ({r['params'] / 1e6:.1f}M) | {r['trainable'] / 1e6:.1f}M | "
                     f"{gib(r['peak_bytes'])} | {gib(r['plan_bytes'])} | {r['plan_ratio']:.3f} |")
    within = sum(abs(r["plan_ratio"] - 1) <= 0.10 for r in rows)
    return lines + ["", f"{within} of {len(rows)} within 10 %. Measured: " + (
        "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else
        "the growth of the process's resident memory (sampled every 2 ms, glibc mmap threshold fixed so freed "
        "tensors leave at once) over its value once the libraries are imported") + "; the plan does not count the "
        "runtime's fixed costs (gloo/NCCL, DeepSpeed's communication buffers, allocator slack)."]


def memory_report(args, rows: list[dict], started) -> None:
    header = (f"`distune plan` vs measured peak memory: {device_name()}; {started:%Y-%m-%d %H:%M %Z}; {args.dtype}, "
              f"1 rank, micro-batch 1, seq {args.memory_seq}, warmup + 1 step")
    text = "\n".join([header, "", *memory_lines(rows)]) + "\n"
    print("\n" + text)
    write_results(Path(args.out), {"memory": rows, "args": vars(args), "device": device_name(),
                                   "date": started.isoformat(timespec="seconds"), "torch": torch.__version__}, text)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per round and arm")
    ap.add_argument("--warmup", type=int, default=1, help="steps dropped at the start of every subprocess")
    ap.add_argument("--shapes", type=lambda s: s.split(","), default=["256x4", "512x4"],
                    help="student hidden x layers; the first is the main one, the rest a sweep")
    ap.add_argument("--seqs", type=lambda s: [int(x) for x in s.split(",")], default=[256, 512])
    ap.add_argument("--teacher-shape", default=None, help="default: twice the main student's width, same depth")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", default="4x2", help="micro-batch size x accumulation steps")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on a GPU, fp32 on CPU "
                    "(this CPU has no bf16 units: bf16 matmuls are emulated)")
    ap.add_argument("--train-on-inputs", action="store_true", help="loss on every token (default: responses only)")
    ap.add_argument("--arms", type=lambda s: s.split(","), default=None, help="run only these arms (comma-separated)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (1: a remote teacher's actor gets "
                    "the other core of a 2-core machine)")
    ap.add_argument("--gpu-1b", action="store_true", help="the GPU target run: Llama 2048x16 (~1B), seq 2048")
    ap.add_argument("--memory-shapes", type=lambda s: [x for x in s.split(",") if x], default=["768x12", "1536x16"],
                    help="plan vs measured memory: every ZeRO/offload arm and LoRA at the first shape, LoRA at the "
                    "rest ('' skips the check)")
    ap.add_argument("--memory-seq", type=int, default=64)
    ap.add_argument("--memory-only", action="store_true", help="only the memory check (default --out "
                    "bench/results/perf_memory.json)")
    ap.add_argument("--out", default=None, help="default bench/results/perf.json")
    args = ap.parse_args(argv)
    args.out = args.out or f"bench/results/perf{'_memory' if args.memory_only else ''}.json"
    args.dtype = args.dtype or ("bf16" if torch.cuda.is_available() else "fp32")
    if args.gpu_1b:
        args.shapes, args.seqs, args.batch, args.vocab = ["2048x16"], [2048], "4x4", 32000
        args.teacher_shape = args.teacher_shape or "3072x20"
    h, n = map(int, args.shapes[0].split("x"))
    args.teacher_shape = args.teacher_shape or f"{2 * h}x{n}"
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # --child KIND CFG_JSON OUT_JSON
        return child(*argv[1:4])
    if argv[:1] == ["--rescore"]:  # --rescore RESULTS_JSON: MFU again from the saved step times
        rescore(Path(argv[1]))
        return 0
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start, started = os.getloadavg(), datetime.datetime.now().astimezone()
    tmp = Path(tempfile.mkdtemp(prefix="distune-perf-"))
    if args.memory_only:
        memory_report(args, memory_check(args, tmp), started)
        shutil.rmtree(tmp, ignore_errors=True)
        return 0
    max_pos = max(args.seqs) + 64
    print("building models and data ...", flush=True)
    models = {s: build_model(tmp / f"model-{s}", s, args.vocab, max_pos) for s in args.shapes}
    models["teacher"] = build_model(tmp / "teacher", args.teacher_shape, args.vocab, max_pos)
    micro, accum = map(int, args.batch.split("x"))
    rows = micro * accum * (args.warmup + args.steps)
    data = {s: write_rows(tmp / f"rows-{s}.jsonl", rows, s, args.vocab) for s in args.seqs}
    arms = arms_for(args, models, data, tmp)
    peak, peak_src = peak_flops(args.dtype)
    print(f"peak for MFU: {peak / 1e12:.3f} TFLOP/s ({peak_src})", flush=True)
    if "kd-cached" in arms:
        print("building the teacher's top-64 cache (not timed) ...", flush=True)
        build_cache(arms["kd-cached"][1], tmp, args.threads)
    got = run_rounds(Path(__file__), arms, args.rounds, args.warmup, tmp,
                     child_env(args.threads, TRL_EXPERIMENTAL_SILENCE="1"))

    table = []
    for arm, (kind, cfg) in arms.items():
        plan, counts, teacher = predicted(cfg)
        seq, gbs = cfg["data"]["max_length"], cfg["train"]["global_batch_size"]
        step = statistics.median(got["step_s"][arm])
        on_rank = cfg["method"]["name"] == "distill" and cfg["method"].get("signal", "online") == "online"
        trained = 1.0 if cfg["data"]["train_on_inputs"] else max(1, seq // 8) / seq
        flops = model_flops_per_token(counts, teacher if on_rank else None, seq, trained)
        teacher_row = {"teacher_on_rank": on_rank}
        mem = max(got["peak_bytes"][arm])
        table.append({"arm": arm, "kind": kind, "shape": Path(cfg["model"]["path"]).name.removeprefix("model-"),
                      "seq": seq,
                      "params": counts["trainable"] + counts["frozen"], "trainable": counts["trainable"],
                      "step_s": step, "tokens_per_s": seq * gbs / step, "mfu": flops * seq * gbs / step / peak,
                      "peak_bytes": mem, "plan_bytes": plan["total"], "plan_ratio": mem / plan["total"],
                      **teacher_row})
    base = {r["arm"]: r for r in table}
    for r in table:
        ref = {"hand-ds": "full-z2", "hf-trainer": "full-z2", "trl-gkd": "gkd", "kd-remote-sync": "kd-remote"}.get(
            r["arm"])
        r["vs"] = (ref, base[ref]["step_s"] / r["step_s"]) if ref in base else None
    memory = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else \
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fits = largest_fitting(args, tmp, memory, max(args.seqs))
    mem_rows = memory_check(args, tmp) if args.memory_shapes else []
    report(args, table, fits, got, peak, peak_src, memory, load_start, started, mem_rows)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def table_lines(table: list[dict]) -> list[str]:
    lines = ["| arm | model | seq | step s | tokens/s | MFU | peak mem | plan | mem/plan | baseline speed-up |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in table:
        vs = f"{r['vs'][1]:.2f}x {r['vs'][0]}" if r["vs"] else ""
        lines.append(f"| {r['arm']} | {r['shape']} ({r['params'] / 1e6:.1f}M) | {r['seq']} | {r['step_s']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | {gib(r['peak_bytes'])} | "
                     f"{gib(r['plan_bytes'])} | {r['plan_ratio']:.2f} | {vs} |")
    return lines


ONLINE_TEACHER_ARMS = ("kd-online", "gkd", "trl-gkd")  # results saved before rows said teacher_on_rank


def rescore(path: Path) -> None:
    """MFU of a saved run again, from its step times: the current formula, against a peak measured now on this
    machine (which should be the run's). The first rescore keeps the run's own figures as *_run_formula."""
    from transformers import LlamaForCausalLM

    d = json.loads(path.read_text())
    torch.set_num_threads(d["args"]["threads"])
    peak, src = peak_flops(d["args"]["dtype"])
    vocab = d["args"]["vocab"]

    def counts_of(shape: str) -> dict:
        with torch.device("meta"):
            model = LlamaForCausalLM(llama_config(shape, vocab))
        hidden, layers = map(int, shape.split("x"))
        return {"params": sum(p.numel() for p in model.parameters()), "vocab": vocab, "hidden": hidden,
                "layers": layers}

    teacher = counts_of(d["args"]["teacher_shape"])
    for r in d["rows"]:
        counts = {**counts_of(r["shape"]), "trainable": r["trainable"], "frozen": r["params"] - r["trainable"]}
        on_rank = r.get("teacher_on_rank", r["arm"] in ONLINE_TEACHER_ARMS)
        trained = 1.0 if d["args"]["train_on_inputs"] else max(1, r["seq"] // 8) / r["seq"]
        r.setdefault("mfu_run_formula", r["mfu"])
        r["mfu"] = model_flops_per_token(counts, teacher if on_rank else None, r["seq"], trained) \
            * r["tokens_per_s"] / peak
    d.setdefault("peak_flops_run", d["peak_flops"])
    d["peak_flops"], d["peak_source"] = peak, f"{src}, measured by --rescore"
    d["mfu_note"] = ("MFU recomputed by `bench/perf.py --rescore` (head on the trained fraction only, teacher FLOPs "
                     "only where the teacher runs on the rank) against a peak measured then on the same machine; the "
                     "run's own figures are mfu_run_formula / peak_flops_run")
    path.write_text(json.dumps(d, indent=2))
    md = path.with_suffix(".md").read_text().splitlines()
    header = md[0].split("; MFU against")[0] + f"; MFU against {peak / 1e12:.4f} TFLOP/s ({src}, measured by --rescore)"
    tail = md[md.index("") + 1 + len(d["rows"]) + 2:]  # after the header, blank line and the old table
    path.with_suffix(".md").write_text("\n".join([header, "", *table_lines(d["rows"]), *tail]) + "\n")
    print("\n".join([header, "", *table_lines(d["rows"])]))


def report(args, table, fits, got, peak, peak_src, memory, load_start, started, mem_rows=()) -> None:
    device = device_name()
    load_end = os.getloadavg()
    header = (f"distune performance: {device}; {started:%Y-%m-%d %H:%M %Z}; load avg {load_start[0]:.2f} at start, "
              f"{load_end[0]:.2f} at end; {args.dtype}, 1 rank, {got['torch_threads']} torch thread(s), "
              f"batch {args.batch} (micro x accumulation), median of {args.rounds} rounds x {args.steps} steps; "
              f"loss on {'every token' if args.train_on_inputs else 'the response (1/8 of each row)'}; "
              f"MFU against {peak / 1e12:.3f} TFLOP/s ({peak_src})\n")
    lines = table_lines(table) + ["", "baseline speed-up: the distune arm's step time / the baseline's (< 1: distune is faster).", "",
              f"largest Llama shape that `distune plan` fits in {gib(memory)} (one rank, gradient checkpointing, "
              f"seq {max(args.seqs)}, micro-batch {args.batch.split('x')[0]}):", "",
              "| method | shape | params | predicted |", "|---|---|---:|---:|"]
    for f in fits:
        lines.append(f"| {f['method']} | {f['shape'] or 'none'} | "
                     + (f"{f['params'] / 1e9:.2f}B | {gib(f['predicted_bytes'])} |" if f["shape"] else " | |"))
    if mem_rows:
        lines += ["", f"`distune plan` against the measured peak (1 rank, micro-batch 1, seq {args.memory_seq}, "
                  f"warmup + 1 step):", "", *memory_lines(list(mem_rows))]
    text = header + "\n" + "\n".join(lines) + "\n"
    print("\n" + text)
    out = Path(args.out)
    write_results(out, {"rows": table, "fits": fits, "memory": list(mem_rows), "step_s": got["step_s"],
                        "peak_bytes": got["peak_bytes"], "args": vars(args), "device": device, "peak_flops": peak,
                        "peak_source": peak_src, "date": started.isoformat(timespec="seconds"),
                        "load_avg_start": load_start, "load_avg_end": load_end, "python": sys.version.split()[0],
                        "torch": torch.__version__}, text)
    print(f"saved {out} and {out.with_suffix('.md')}")
    if (plt := pyplot()) is None:
        return
    fig, ax = plt.subplots(1, 2, figsize=(13, 0.35 * len(table) + 1.5))
    names = [r["arm"] for r in table]
    colors = ["tab:blue" if r["kind"].startswith("distune") else "tab:gray" for r in table]
    ax[0].barh(names, [r["tokens_per_s"] for r in table], color=colors)
    ax[0].set_xlabel("tokens/s (grey: baselines)")
    ax[0].invert_yaxis()
    ax[1].barh(names, [r["peak_bytes"] / 2**20 for r in table], label="measured")
    ax[1].scatter([r["plan_bytes"] / 2**20 for r in table], names, color="k", marker="|", s=200, label="distune plan")
    ax[1].set_xlabel("peak memory per rank, MiB")
    ax[1].invert_yaxis()
    ax[1].legend()
    fig.suptitle(header.split(";")[0], fontsize=9)
    save_figure(fig, out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
