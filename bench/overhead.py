"""distune's training step against a hand-written DeepSpeed loop: same model, ds config and data.

    python bench/overhead.py [--rounds 8] [--steps 10] [--stage 2] [--out bench/results/overhead.json]

Both run in this one process (world of one, gloo on CPU / nccl on GPU), interleaved round by round
(ours, baseline, ours, ...) so machine noise hits both alike. "ours" is `distune.loop.train` with the
engine, optimizer and schedule distune builds (collation from samples included); the baseline is the
loop a user would write by hand: pre-collated batches, forward, engine.backward, engine.step.
Reports the ratio of median step times (target: <= 1.05) and saves JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_model_dir(root: Path, hidden: int, layers: int, vocab: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                      max_position_embeddings=1024, tie_word_embeddings=False)
    out = root / "model"
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def make_samples(n: int, seq: int, vocab: int, prompt: int):
    from distune.data import IGNORE, Sample

    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
        out.append(Sample(ids, [IGNORE] * prompt + ids[prompt:], i))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per round and contender")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--stage", type=int, default=2, choices=[0, 1, 2, 3])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--out", default="bench/results/overhead.json")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    from distune.config import load_config
    from distune.data import ShardedBatches, collate
    from distune.engine.ds_config import build_ds_config
    from distune.engine.runtime import build_training_engine, device, init_distributed
    from distune.loop import Cadence, TrainState, train
    from distune.methods import build_method
    from distune.models import load_model

    import deepspeed

    init_distributed()
    dev = device()
    tmp = Path(tempfile.mkdtemp(prefix="distune-bench-"))
    model_dir = build_model_dir(tmp, args.hidden, args.layers, args.vocab)
    data_file = tmp / "unused.jsonl"
    data_file.write_text('{"prompt": "a", "response": "b"}\n')
    cfg = load_config({
        "model": {"path": str(model_dir), "dtype": args.dtype},
        "data": {"path": str(data_file)},
        "train": {"global_batch_size": args.micro * args.accum, "micro_batch_size": args.micro, "lr": 1e-4,
                  "warmup_steps": 0, "log_every": args.log_every},
        "deepspeed": {"stage": args.stage},
        "cluster": {"num_workers": 1, "use_gpu": torch.cuda.is_available()},
    })
    total = args.rounds * args.steps + args.warmup + 1
    ds_config = build_ds_config(cfg, args.accum)
    samples = make_samples(args.micro * args.accum * total, args.seq, args.vocab, prompt=args.seq // 4)

    # ours: distune's method, engine, loop and data path
    method = build_method("full", {})
    ours_engine = build_training_engine(method.adapt(load_model(str(model_dir), args.dtype)), ds_config, cfg.train,
                                        total)
    batches = ShardedBatches(samples, args.micro, 0, 1, seed=0, pad_id=0)
    ours_iter = batches.iterate(0, 0)
    state = TrainState()

    def run_ours(steps: int) -> float:
        cadence = Cadence(total, state.step + steps, args.accum, args.log_every, None, None)
        t = time.perf_counter()
        train(ours_engine, method, {}, ours_iter, batches.per_epoch, state, cadence, dev,
              evaluate=dict, save=lambda s: None, log=lambda m, s: None, emit=lambda e: None)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / steps

    # baseline: the hand-written DeepSpeed loop
    base_model = load_model(str(model_dir), args.dtype)
    opt = torch.optim.AdamW(base_model.parameters(), lr=1e-4)
    base_engine, _, _, _ = deepspeed.initialize(model=base_model, optimizer=opt, config=ds_config,
                                                dist_init_required=False)
    pre = [{k: v.to(dev) for k, v in collate(samples[i:i + args.micro], 0).items()}
           for i in range(0, len(samples), args.micro)]
    base_pos = [0]

    def run_base(steps: int) -> float:
        t = time.perf_counter()
        for step in range(steps):
            for _ in range(args.accum):
                b = pre[base_pos[0] % len(pre)]
                base_pos[0] += 1
                logits = base_engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(), ignore_index=-100)
                base_engine.backward(loss)
                base_engine.step()
            if (step + 1) % args.log_every == 0:
                loss.item()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / steps

    run_ours(args.warmup)
    run_base(args.warmup)
    ours, base = [], []
    for r in range(args.rounds):
        pair = [("ours", run_ours), ("base", run_base)] if r % 2 == 0 else [("base", run_base), ("ours", run_ours)]
        for name, fn in pair:
            (ours if name == "ours" else base).append(fn(args.steps))
        print(f"round {r + 1}/{args.rounds}: ours {ours[-1] * 1e3:8.1f} ms/step   baseline {base[-1] * 1e3:8.1f} ms/step",
              flush=True)

    ratio = statistics.median(ours) / statistics.median(base)
    tokens_per_step = args.micro * args.accum * args.seq
    print()
    print(f"{'':10} {'median ms/step':>15} {'tokens/s':>10}")
    print(f"{'distune':10} {statistics.median(ours) * 1e3:15.1f} {tokens_per_step / statistics.median(ours):10.0f}")
    print(f"{'baseline':10} {statistics.median(base) * 1e3:15.1f} {tokens_per_step / statistics.median(base):10.0f}")
    print(f"ratio distune/baseline: {ratio:.3f}  (target <= 1.05)")
    result = {
        "ratio": ratio, "ours_s_per_step": ours, "baseline_s_per_step": base, "args": vars(args),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0], "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
