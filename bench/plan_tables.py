"""`distune plan` at cluster scale, on paper: Llama-3.1-8B and -70B shapes x 8 and 64 H100 (nodes of 8), for full
fine-tuning, LoRA, and 70B -> 8B distillation with an online (colocated) and a cached teacher. Every figure comes from
`distune plan CFG --gpu h100 --nodes N --gpus-per-node 8 --json`; the model-state figures are checked against
DeepSpeed's own estimators (`estimate_zero3_model_states_mem_needs_all_cold`, and the stage-1/2 one).

    python bench/plan_tables.py            # ~2 min: bench/results/plan_tables.{json,md}

The shapes are config.json files with the published Llama-3.1 widths (no weights: plan builds models on the meta
device); the tokenizer is SmolLM2's (from the offline demo package), which only sets the data's trained-token
fraction. Rows are 4096 tokens (data.max_length), bf16, gradient checkpointing on.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from harness import ROOT, SMOLLM2, TWEETS, arm_config, run_cli, write_results

TOKENIZER = SMOLLM2  # its tokenizer files go with each shape: they only set the data's trained-token fraction
DATA = {"path": TWEETS, "encoding_errors": "replace",
        "prompt": "Is the sentiment of this tweet negative, neutral or positive?\n\nTweet: {text}",
        "response": "{sentiment}", "max_length": 4096, "limit": 2000, "eval_size": 100}
SHAPES = {  # config.json of meta-llama/Llama-3.1-8B and -70B (the widths that set memory)
    "llama-3.1-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8},
    "llama-3.1-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "num_key_value_heads": 8},
}
COMMON = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "head_dim": 128,
          "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
          "rope_theta": 500000.0, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
LORA = {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}
CELLS = [  # (name, student shape, method, stage)
    ("8B full FT", "llama-3.1-8b", {"name": "full"}, 3),
    ("8B full FT, ZeRO-2", "llama-3.1-8b", {"name": "full"}, 2),
    ("8B LoRA r=16", "llama-3.1-8b", LORA, 2),
    ("70B full FT", "llama-3.1-70b", {"name": "full"}, 3),
    ("70B LoRA r=16", "llama-3.1-70b", LORA, 3),
    ("70B -> 8B online", "llama-3.1-8b", {"name": "distill", "student": {"name": "full"}, "signal": "online",
                                          "teacher": {"path": "TEACHER", "dtype": "bf16"}}, 3),
    ("70B -> 8B cached", "llama-3.1-8b", {"name": "distill", "student": {"name": "full"}, "signal": "cached",
                                          "top_k": 64, "cache_dir": "CACHE",
                                          "teacher": {"path": "TEACHER", "dtype": "bf16"}}, 3),
]


def write_shapes(work: Path) -> dict[str, Path]:
    from distune.models import resolve_model_source

    tok = Path(resolve_model_source(TOKENIZER))
    out = {}
    for name, widths in SHAPES.items():
        d = work / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps({**COMMON, **widths}, indent=2))
        for f in tok.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(f, d / f.name)
        out[name] = d
    return out


def config(work: Path, shapes: dict, student: str, method: dict, stage: int) -> Path:
    method = json.loads(json.dumps(method).replace('"TEACHER"', json.dumps(str(shapes["llama-3.1-70b"])))
                        .replace('"CACHE"', json.dumps(str(work / "cache"))))
    signal = f"-{method['signal']}" if "signal" in method else ""
    return arm_config({}, f"{student}-{method['name']}{signal}-{stage}", work, output_dir=work / "runs",
                      model={"path": str(shapes[student]), "dtype": "bf16", "gradient_checkpointing": True},
                      method=method, data=DATA,
                      train={"max_steps": 100, "micro_batch_size": 1, "global_batch_size": 64, "lr": 1e-5},
                      deepspeed={"stage": stage}, cluster={"num_workers": 8, "use_gpu": True},
                      wandb={"mode": "disabled"})


def deepspeed_model_states(counts: dict, stage: int, nodes: int, gpus: int) -> int:
    """DeepSpeed's estimator, no offload: bytes per GPU for params, gradients and optimizer states."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total = counts["trainable"] + counts["frozen"]
    if stage == 3:
        largest = counts["vocab"] * counts["hidden"]  # the embedding / output matrix
        _, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=False,
                                                          cpu_offload_params=False)
        return gpu
    _, gpu = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=False)
    return gpu


def ours_model_states(cp: dict) -> int:
    """The same quantity from distune's estimate: weights + 16-bit gradients + fp32 master and Adam moments + the
    fp32 gradient partition of the optimizer step, and at stage 3 the parameters gathered for the forward/backward
    (distune: its max-live budget in the training dtype; DeepSpeed: the largest layer in fp32)."""
    row = cp["plan"]["stages"][str(cp["stage"])]
    p = cp["plan"]["params"]
    fp32_grads = 4 * p["trainable"] / cp["num_workers"]
    gathered = row["buffers"] if cp["stage"] == 3 else 0
    return round(row["weights"] + row["grads"] + row["optimizer"] + fp32_grads + gathered)


def main(argv=None) -> int:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--work", default="runs/bench-plan-tables")
    a.add_argument("--out", default="bench/results/plan_tables.json")
    args = a.parse_args(argv)
    import os

    os.environ.setdefault("DISTUNE_CACHE", str(ROOT / ".cache" / "distune"))
    work = (ROOT / args.work).resolve()
    shapes = write_shapes(work)
    rows = []
    for name, student, method, stage in CELLS:
        cfg = config(work, shapes, student, method, stage)
        for nodes in (1, 8):
            out = work / f"{cfg.stem}-{nodes}.json"
            run_cli(["plan", str(cfg), "--gpu", "h100", "--nodes", str(nodes), "--gpus-per-node", "8", "--json",
                     str(out)], out.with_suffix(".log"))
            cp = json.loads(out.read_text())
            row = {"cell": name, "nodes": nodes, "gpus": nodes * 8, "stage": stage, "gpu_need": cp["gpu_need"],
                   "gpu_memory": cp["gpu_memory"], "fits": cp["fits"], "near": cp["near"],
                   "host_load_node": cp["host_per_node"]["load"], "host_ckpt_node": cp["host_per_node"]["checkpoint"],
                   "checkpoint": cp["checkpoint_bytes"], "communication": cp["communication"],
                   "params": cp["plan"]["params"]["trainable"] + cp["plan"]["params"]["frozen"],
                   "command": f"distune plan {cfg.relative_to(ROOT) if cfg.is_relative_to(ROOT) else cfg} "
                              f"--gpu h100 --nodes {nodes} --gpus-per-node 8"}
            if method["name"] == "full":
                row["ours_model_states"] = ours_model_states(cp)
                row["deepspeed_model_states"] = deepspeed_model_states(cp["plan"]["params"], stage, nodes, 8)
                row["ratio"] = round(row["ours_model_states"] / row["deepspeed_model_states"], 4)
            rows.append(row)
            print(f"{name:18s} {nodes * 8:3d} H100: {row['gpu_need'] / 2**30:7.1f} GiB/GPU "
                  f"{'fits' if row['fits'] else 'DOES NOT FIT'}" +
                  (f"  model states ours/DeepSpeed {row['ratio']:.3f}" if "ratio" in row else ""), flush=True)
    path = ROOT / args.out
    write_results(path, rows, table(rows))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


def gib(x: float) -> str:
    return f"{x / 2**30:,.1f}"


def table(rows: list[dict]) -> str:
    out = ["| run | H100s | GPU per rank (GiB, of 79.6) | verdict | host per node at load / checkpoint (GiB) | "
           "checkpoint (GiB) | per rank per step (GiB) | model states: distune / DeepSpeed (GiB) |",
           "|---|---:|---:|---|---:|---:|---|---:|"]
    for r in rows:
        comm = ", ".join(f"{k.replace('_', '-')} {gib(v)}" for k, v in r["communication"].items())
        verdict = "fits" if r["fits"] and not r["near"] else "fits (within 10 %)" if r["fits"] else "**does not fit**"
        states = (f"{gib(r['ours_model_states'])} / {gib(r['deepspeed_model_states'])} = {r['ratio']:.3f}"
                  if "ratio" in r else "—")
        out.append(f"| {r['cell']} | {r['gpus']} | {gib(r['gpu_need'])} | {verdict} | {gib(r['host_load_node'])} / "
                   f"{gib(r['host_ckpt_node'])} | {gib(r['checkpoint'])} | {comm} | {states} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
