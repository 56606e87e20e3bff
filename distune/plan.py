"""`distune plan CFG`: the memory each rank needs, per ZeRO stage and teacher placement, before any worker starts.

Owns the estimate and its table; counts parameters on the meta device (no weights are read). Per rank, with
N = cluster.num_workers, b = bytes per weight (bf16/fp16 2, fp32 4), Ψt trainable, Ψf frozen student params:
  weights      b·(Ψt+Ψf)                          /N at stage 3
  grads        b·Ψt                               /N at stage >= 2
  optimizer    Adam: 12·Ψt mixed precision (fp32 master + m + v), 8·Ψt fp32 (m + v)   /N at stage >= 1
  activations  micro·seq·h·L·34·b/2 (Korthikanti et al. 2022, no attention-score term: SDPA/flash keep none);
               with gradient checkpointing micro·seq·h·L·b (block inputs) + one block's 34·b/2 (recomputed)
               + logits r·V·(b + 4 + 4): the head's output, its fp32 upcast and that one's gradient, where
               r = micro·seq·f rows are read by a loss (f: the trained-token fraction, 1 with kd_positions all;
               the head runs on those rows only, distune.logits), or train.loss_chunk rows when smaller
  teacher      colocated: b_T·Ψ_T (/N at stage 3, where it is a ZeRO-3 inference engine) + r·V_T·(b_T + 4);
               cached: 0 on the GPU, disk ≈ trained tokens·k·(id 2 or 4 bytes + 2 bytes fp16 log-prob);
               remote: 0 on training ranks, each actor b_T·Ψ_T + micro·seq·V_T·4
offload_optimizer (stage >= 1) moves the optimizer to host memory, offload_param (stage 3) the weights, the
colocated teacher's included. seq = data.max_length: an upper bound on a micro-batch's padded length.
LoRA that cannot be built on the meta device falls back to r·(in+out) per targeted linear (+out with DoRA).
Imports neither ray nor deepspeed; torch and transformers load inside functions only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
PLACEMENTS = {"online": "colocated", "cached": "cached", "remote": "remote"}  # config signal -> table name


def add_arguments(parser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the figures (bytes) as JSON")
    parser.add_argument("--show-samples", type=int, default=0, metavar="N",
                        help="print the first N training samples as the model sees them, trained tokens «marked», "
                             "and the truncation count")


def _meta_model(source: str, trust_remote_code: bool, layers=None):
    from distune.models import load_model_config, meta_model

    return meta_model(load_model_config(source, trust_remote_code), trust_remote_code, layers=layers)


def lora_formula(model, method) -> tuple[int, int]:
    """(trainable, frozen) for LoRA without building adapters: r·(in+out) per targeted linear (+out: DoRA)."""
    from torch import nn

    c = method.config
    head = model.get_output_embeddings()
    trainable = 0
    for name, m in model.named_modules():
        hit = c.target_modules == "all-linear" or name.split(".")[-1] in c.target_modules
        if isinstance(m, nn.Linear) and m is not head and hit:
            trainable += c.r * (m.in_features + m.out_features) + (m.out_features if c.use_dora else 0)
    return trainable, sum(p.numel() for p in model.parameters())


def count_params(cfg, source: str) -> dict:
    """Student trainable/frozen counts and shapes, and the teacher's (distill only), from configs alone."""
    from distune.methods import build_method
    from distune.models import resolve_model_source

    method = build_method(cfg.method.name, cfg.method.model_extra or {})
    out = {}
    if cfg.method.name == "distill":
        t = cfg.method_config().teacher
        teacher = _meta_model(resolve_model_source(t.path), t.trust_remote_code)
        method.see_frozen_configs({"teacher": teacher.config})
        out["teacher"] = {"params": sum(p.numel() for p in teacher.parameters()), "dtype": t.dtype,
                          "vocab": teacher.config.vocab_size}
    model = _meta_model(source, cfg.model.trust_remote_code, cfg.model.layers)
    shape = {"hidden": model.config.hidden_size, "layers": model.config.num_hidden_layers,
             "vocab": model.config.vocab_size}
    try:
        adapted = method.adapt(model)
        trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in adapted.parameters()) - trainable
    except Exception:  # an adapter that needs real tensors; only LoRA has a formula to fall back on
        lora = getattr(method, "student", method)  # distill wraps its student method
        if lora.name != "lora":
            raise
        trainable, everything = lora_formula(_meta_model(source, cfg.model.trust_remote_code, cfg.model.layers), lora)
        frozen = everything  # LoRA freezes every base weight
    return {"trainable": trainable, "frozen": frozen, **shape, **out}


def estimate(cfg, summary: dict, counts: dict) -> dict:
    """Bytes per rank for every ZeRO stage (device and host separately), and the teacher's placements."""
    n, b, micro, seq = cfg.cluster.num_workers, BYTES[cfg.model.dtype], cfg.train.micro_batch_size, cfg.data.max_length
    pt, pf, h, layers = counts["trainable"], counts["frozen"], counts["hidden"], counts["layers"]
    per_layer = 34 * b / 2  # bytes per token per hidden unit inside one transformer block
    if cfg.model.gradient_checkpointing:
        acts = micro * seq * h * (layers * b + per_layer)
    else:
        acts = micro * seq * h * layers * per_layer
    mc = cfg.method_config()
    fraction = 1.0 if getattr(mc, "kd_positions", "response") == "all" else summary.get("trained_token_fraction", 1.0)
    rows = micro * seq * fraction  # the positions a loss reads: the only ones the output head computes
    head_rows = min(rows, cfg.train.loss_chunk) if cfg.train.loss_chunk else rows
    acts += head_rows * counts["vocab"] * (b + 4 + 4)
    plan = {"num_workers": n, "dtype": cfg.model.dtype, "stage": cfg.deepspeed.stage, "params": counts,
            "stages": {}, "teacher": None}
    t = counts.get("teacher")
    if t:
        t_weights = BYTES[t["dtype"]] * t["params"]
        t_logits = rows * t["vocab"] * (BYTES[t["dtype"]] + 4)
        tokens = summary["train_rows"] * summary["mean_tokens"] * summary["trained_token_fraction"]
        vocab = summary.get("teacher_vocab", t["vocab"])
        k = mc.top_k or 64  # cached/remote default to 64 when top_k is unset
        plan["teacher"] = {"signal": PLACEMENTS[mc.signal], "trained_tokens": round(tokens), "top_k": k,
                           "cache_disk": round(tokens * k * ((2 if vocab <= 65536 else 4) + 2)),
                           "remote_actor": t_weights + t_logits, "actors": mc.remote.actors}
    ds = cfg.deepspeed
    for stage in range(4):
        # DeepSpeed offloads the optimizer from stage 1 on, and parameters under stage 3 only.
        offload_opt, offload_param = ds.offload_optimizer and stage >= 1, ds.offload_param and stage == 3
        weights = b * (pt + pf) / (n if stage == 3 else 1)
        optimizer = (12 if b == 2 else 8) * pt / (n if stage >= 1 else 1)
        row = {"weights": 0 if offload_param else weights, "grads": b * pt / (n if stage >= 2 else 1),
               "optimizer": 0 if offload_opt else optimizer, "activations": acts,
               "host": optimizer * offload_opt + weights * offload_param}
        device = row["weights"] + row["grads"] + row["optimizer"] + acts
        if t:
            coloc = t_weights / (n if stage == 3 else 1)
            row["teacher_host"] = coloc * offload_param  # the teacher's ZeRO-3 engine offloads like the student
            row["teacher_colocated"] = coloc * (not offload_param) + t_logits
            row["total"] = {"colocated": device + row["teacher_colocated"], "cached": device, "remote": device}
        else:
            row["total"] = {"device": device}
        plan["stages"][stage] = {k: ({p: round(x) for p, x in v.items()} if isinstance(v, dict) else round(v))
                                 for k, v in row.items()}
    return plan


def human(x: float) -> str:
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.2f} MiB"


def render(plan: dict) -> str:
    t = plan["teacher"]
    totals = list(plan["stages"][0]["total"])
    head = ["stage", "weights", "grads", "optimizer", "activations"] + (["teacher (coloc.)"] if t else [])
    head += [f"{p}{'*' if t and p == t['signal'] else ''}" for p in totals] + ["host"]
    rows = [head]
    for stage, r in plan["stages"].items():
        cells = [r["weights"], r["grads"], r["optimizer"], r["activations"]] + ([r["teacher_colocated"]] if t else [])
        cells += [r["total"][p] for p in totals] + [r["host"] + r.get("teacher_host", 0)]
        rows.append([f"{stage}{'*' if stage == plan['stage'] else ''}"] + [human(c) for c in cells])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    p = plan["params"]
    lines.insert(0, f"memory per rank (N={plan['num_workers']}, {plan['dtype']}): {p['trainable']:,} trainable, "
                    f"{p['frozen']:,} frozen params" + (f"; teacher {p['teacher']['params']:,} "
                                                        f"({p['teacher']['dtype']})" if t else ""))
    lines += ["* = configured. weights b(Ψt+Ψf) [/N stage 3]; grads bΨt [/N stage>=2]; Adam 12Ψt mixed, 8Ψt fp32 "
              "[/N stage>=1]",
              "activations micro·seq·h·L·34b/2 (checkpointing: b per layer + one block) + logits micro·seq·V·4·2",
              "host = bytes offloaded to CPU memory (offload_optimizer / offload_param; a colocated teacher's "
              "weights included); formulas: distune/plan.py"]
    if t:
        lines += ["teacher colocated: b_T·Ψ_T [/N stage 3] + logits micro·seq·V_T·4",
                  f"teacher cached: 0 on the GPU; disk ≈ {t['trained_tokens']:,} trained tokens × top-{t['top_k']} "
                  f"= {human(t['cache_disk'])}",
                  f"teacher remote: 0 on training ranks; each of {t['actors']} actor(s) needs "
                  f"{human(t['remote_actor'])}"]
    return "\n".join(lines)


def capacity(plan: dict, uses_gpu: bool) -> str:
    """The configured row against the memory the ranks will have (this machine's GPU 0, or its RAM)."""
    row = plan["stages"][plan["stage"]]
    signal = plan["teacher"]["signal"] if plan["teacher"] else "device"
    need = row["total"][signal]
    if uses_gpu:
        import torch

        if not torch.cuda.is_available():
            return f"GPU workers, but this machine has no CUDA device to compare {human(need)} per rank with"
        have = torch.cuda.get_device_properties(0).total_memory
        where = f"GPU 0 has {human(have)}; stage {plan['stage']} {signal} needs {human(need)} a rank"
    else:  # CPU workers: device and host parts share RAM, and a local cluster puts every rank on this box
        need = plan["num_workers"] * (need + row["host"] + (row["teacher_host"] if signal == "colocated" else 0))
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        where = (f"CPU workers: figures are host memory; {plan['num_workers']} rank(s) at stage {plan['stage']} "
                 f"{signal} need {human(need)} of this machine's {human(have)} RAM")
    return f"{where} ({'fits' if need <= have else 'DOES NOT FIT'}, activations estimated)"


def show_samples(cfg, summary: dict, n: int) -> str:
    """The first n training samples rendered (template, design, chat template), trained tokens marked."""
    from distune.data import IGNORE, Sample, load_splits
    from distune.data.render import mark_trained
    from distune.models import load_tokenizer

    tokenizer = load_tokenizer(summary["model_source"], cfg.model.trust_remote_code)
    splits = load_splits(cfg.data, tokenizer, cfg.run.seed, cfg.eval.choices, cfg.model.task)
    lines = []
    for i, s in enumerate(splits.train[:n]):
        if s.label is not None:  # a classifier: the input text and its class
            lines += [f"--- sample {i + 1} (data #{s.line}, {len(s.input_ids)} tokens, class {s.response!r})",
                      tokenizer.decode(s.input_ids)]
            continue
        if s.tags is not None:  # a token classifier: each tagged (first) sub-token with its tag
            tags = " ".join(f"{tokenizer.convert_ids_to_tokens(t)}/{splits.labels[g]}"
                            for t, g in zip(s.input_ids, s.tags) if g != IGNORE)
            lines += [f"--- sample {i + 1} (data #{s.line}, {len(s.input_ids)} tokens)", tags]
            continue
        if s.span is not None:  # extractive QA: the gold answer span «marked» in question + context
            span = [t if s.span.start <= k <= s.span.end else IGNORE for k, t in enumerate(s.input_ids)]
            lines += [f"--- sample {i + 1} (data #{s.line}, {len(s.input_ids)} tokens, answer «marked»)",
                      mark_trained(tokenizer, Sample(s.input_ids, span, s.line))]
            continue
        trained = sum(t != IGNORE for t in s.labels)
        cut = " TRUNCATED" if len(s.input_ids) >= cfg.data.max_length else ""
        lines += [f"--- sample {i + 1} (data #{s.line}, {len(s.input_ids)} tokens, {trained} trained «marked»{cut})",
                  mark_trained(tokenizer, s)]
    total = len(splits.train) + len(splits.eval)
    lines.append(f"--- {splits.truncated} of {total} samples truncated at data.max_length={cfg.data.max_length}")
    return "\n".join(lines)


def command(cfg, summary: dict, args) -> int:
    from distune.validate import target_uses_gpu

    if args.show_samples:
        print(show_samples(cfg, summary, args.show_samples))
    plan = estimate(cfg, summary, count_params(cfg, summary["model_source"]))
    print(render(plan))
    print(capacity(plan, target_uses_gpu(cfg)))
    if args.json:
        Path(args.json).write_text(json.dumps(plan, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
