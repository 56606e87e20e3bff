"""`distune plan CFG`: the memory each rank needs, per ZeRO stage and teacher placement, before any worker starts.

Owns the estimate and its table; counts parameters on the meta device (no weights are read). The model follows what
DeepSpeed (0.19) and torch's AdamW allocate, phase by phase, because the peak is the larger of two moments that
never overlap: the backward (activations, gradients, reduction buffers) and the optimizer step (fp32 gradients and
Adam's temporaries). Per rank, with N = cluster.num_workers, b = bytes per weight (bf16/fp16 2, fp32 4), Ψt
trainable, Ψf frozen student params, /N where the stage partitions:
  weights      b·(Ψt+Ψf)                                         /N at stage 3
  optimizer    fp32 master 4·Ψt (stage >= 1: DeepSpeed clones one even of fp32 weights; stage 0: 16-bit only)
               + Adam m, v 8·Ψt                                  /N at stage >= 1
  grads        b·Ψt                                              /N at stage >= 2 (stage 3: a persistent buffer)
  activations  micro·seq·h·L·34·b/2 (Korthikanti et al. 2022; a GPU's SDPA/flash kernels keep no attention
               scores) + on CPU workers L·micro·a·seq²·2b (torch's math SDPA under an attention mask keeps the
               scores and probabilities of a heads; measured: bench/runtime_memory.py);
               with gradient checkpointing micro·seq·h·L·b (block inputs) + one block's share (recomputed)
               + logits r·V·(b + 4 + 4): the head's output, its fp32 upcast and that one's gradient, where
               r = micro·seq·f rows are read by a loss (f: the trained-token fraction, 1 with kd_positions all;
               the head runs on those rows only, distune.logits), or train.loss_chunk rows when smaller
  buffers      the backward's reduction memory: stage 0 the flat copy of the gradients DeepSpeed all-reduces,
               b·min(Ψt, 5e8); stage 1-2 the reduction bucket, stage 3 the bucket (persistent) + the parameters
               gathered for the forward/backward, b·max(min(Ψt+Ψf, stage3_max_live_parameters), V·h) (a module is
               gathered whole while it computes: the embedding or output matrix, V·h, for a language model). A bucket is
               torch.empty(reduce_bucket_size): a GPU allocates all of it, CPU pages only what the gradients fill
               (min with Ψt). Sizes come from deepspeed.extra.zero_optimization when set there.
  step         the optimizer step: the fp32 gradient partition 4·Ψt + Adam's temporaries on the flat fp32
               partition (sqrt and divide: 8·Ψt on CPU, where AdamW runs tensor by tensor; 4·Ψt on a GPU, where
               it runs foreach)                                  /N at stage >= 1 (stage 0: per tensor, ~0)
  peak         weights + optimizer (+ grads and bucket at stage 3) + max(activations + grads + buffers, step)
  teacher      colocated: b_T·Ψ_T, /N when partitioned (method.teacher.placement; auto: at stage 3) plus the
               parameters its forward gathers, b_T·min(Ψ_T, 1e8) (distune's max live parameters), + r·V_T·(b_T + 4);
               cached: 0 on the GPU, disk ≈ trained tokens·k·(id 2 or 4 bytes + 2 bytes fp16 log-prob);
               remote: 0 on training ranks, each actor b_T·Ψ_T + micro·seq·V_T·4
loading      private memory while the model loads: whole, every rank holds b·(Ψt+Ψf) before DeepSpeed partitions it;
               partitioned (model.load, stage 3), b·(Ψt+Ψf)/N plus one tensor at a time (measured: bench/sharded_load.py)
offload_optimizer (stage >= 1) moves master, Adam state and the step to host memory, with a b·Ψt/N staging copy of
the weights (stage 1-2); offload_param (stage 3) the weights, the colocated teacher's included. CPU workers hold
device and host parts in one RAM: `combined` is their joint peak. Not counted: the runtime's fixed cost (CUDA
context, NCCL/gloo and allocator slack; ~25-80 MiB on CPU). Measured against real runs by bench/perf.py
(--memory). seq = data.max_length: an upper bound on a micro-batch's padded length.
LoRA that cannot be built on the meta device falls back to r·(in+out) per targeted linear (+out with DoRA).
Imports neither ray nor deepspeed; torch and transformers load inside functions only.
"""

from __future__ import annotations

import json
from pathlib import Path

from distune.engine.ds_config import ZERO3_GATHER  # plain data (that module imports no deepspeed)

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
PLACEMENTS = {"online": "colocated", "cached": "cached", "remote": "remote"}  # config signal -> table name


def add_arguments(parser) -> None:
    from distune.scale import GPU_MIB

    parser.add_argument("--json", metavar="PATH", help="also write the figures (bytes) as JSON")
    parser.add_argument("--gpu", choices=sorted(GPU_MIB), help="plan for a cluster of these GPUs, on paper (with "
                        "--nodes and --gpus-per-node): GPU memory per rank, host RAM per node at load and checkpoint, "
                        "checkpoint size, communication per rank")
    parser.add_argument("--nodes", type=int, default=1, help="nodes of that cluster (with --gpu)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (with --gpu)")
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
                          "vocab": teacher.config.vocab_size, "placement": t.placement}
    model = _meta_model(source, cfg.model.trust_remote_code, cfg.model.layers)
    shape = {"hidden": model.config.hidden_size, "layers": model.config.num_hidden_layers,
             "heads": getattr(model.config, "num_attention_heads", 0) or 0,
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


# The defaults of the buffers the estimate counts (deepspeed/runtime/zero/config.py, engine.py; distune.engine.ds_config).
DS_DEFAULTS = {"reduce_bucket_size": 5e8, "stage3_max_live_parameters": ZERO3_GATHER["stage3_max_live_parameters"]}
TEACHER_GATHER = ZERO3_GATHER["stage3_max_live_parameters"]  # a partitioned teacher's engine: the same budget
ALLREDUCE_BUCKET = 5e8  # stage 0: the engine all-reduces gradients flattened into buffers of this many elements


def _zero_sizes(cfg) -> dict:
    zero = cfg.deepspeed.extra.get("zero_optimization", {})
    return {k: float(zero.get(k, v)) for k, v in DS_DEFAULTS.items()}


def estimate(cfg, summary: dict, counts: dict, gpu: bool = False) -> dict:
    """Bytes per rank for every ZeRO stage (device, host and, for CPU workers, both in one RAM), and the teacher's
    placements. `gpu`: the workers' device is a GPU (buffers DeepSpeed allocates empty count in full there)."""
    n, b, micro, seq = cfg.cluster.num_workers, BYTES[cfg.model.dtype], cfg.train.micro_batch_size, cfg.data.max_length
    pt, pf, h, layers = counts["trainable"], counts["frozen"], counts["hidden"], counts["layers"]
    per_layer = 34 * b / 2  # bytes per token per hidden unit inside one transformer block
    # CPU workers: torch's SDPA takes its math path under the attention mask a batch carries and keeps the scores
    # and probabilities of every head for backward (2 x heads x seq^2 per layer and row); a GPU's kernels keep none.
    scores = 0 if gpu else micro * counts.get("heads", 0) * seq * seq * 2 * b
    if cfg.model.gradient_checkpointing:
        acts = micro * seq * h * (layers * b + per_layer) + scores
    else:
        acts = micro * seq * h * layers * per_layer + layers * scores
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
                           "remote_actor": t_weights + t_logits, "actors": mc.remote.actors,
                           "placement": t["placement"],
                           # per rank, either way (the colocated columns follow the configured placement)
                           "partitioned": round(t_weights / n + BYTES[t["dtype"]] * min(t["params"], TEACHER_GATHER) + t_logits),
                           "replicated": round(t_weights + t_logits)}
    whole = b * (pt + pf)
    plan["load"] = {"whole": round(whole), "partitioned": round(whole / n)}
    ds, sizes = cfg.deepspeed, _zero_sizes(cfg)
    # ZeRO-3 gathers a module's parameters whole while it computes, whatever the live budget: the embedding or the
    # output matrix (vocab x hidden) is the largest for a language model.
    largest = counts["vocab"] * counts["hidden"]
    bucket = b * (sizes["reduce_bucket_size"] if gpu else min(sizes["reduce_bucket_size"], pt))
    for stage in range(4):
        # DeepSpeed offloads the optimizer from stage 1 on, and parameters under stage 3 only.
        offload_opt, offload_param = ds.offload_optimizer and stage >= 1, ds.offload_param and stage == 3
        shard = n if stage >= 1 else 1  # optimizer-state partitioning
        weights = b * (pt + pf) / (n if stage == 3 else 1)
        optimizer = (4 * (stage >= 1 or b == 2) + 8) * pt / shard
        grads = b * pt / (n if stage >= 2 else 1)
        # Stage 0: the flat copy of the gradients it all-reduces; 1-2: the reduction bucket; 3: the parameters
        # gathered for the forward/backward (its bucket and gradient partition stay allocated: `kept`).
        buffers = (b * min(ALLREDUCE_BUCKET, pt) if stage == 0 else bucket if stage < 3
                   else b * max(min(pt + pf, sizes["stage3_max_live_parameters"]), largest))
        kept = grads + bucket if stage == 3 else 0.0
        # Stage 0's AdamW works tensor by tensor (temporaries of one tensor); ZeRO's on the flat fp32 partition.
        step = (4 + (4 if gpu else 8)) * pt / shard if stage >= 1 else 0.0
        staging = b * pt / shard if offload_opt and stage < 3 else 0.0
        backward = acts + (0 if stage == 3 else grads) + buffers
        host = (optimizer + staging + step + grads * (stage == 3)) * offload_opt + weights * offload_param
        device = (weights * (not offload_param) + optimizer * (not offload_opt)
                  + kept - grads * (stage == 3) * offload_opt  # offloaded, the gradient partition sits in host memory
                  + max(backward, 0 if offload_opt else step))
        combined = weights + optimizer + staging + kept + max(backward, step)
        row = {"weights": 0 if offload_param else weights, "grads": grads, "optimizer": 0 if offload_opt else optimizer,
               "activations": acts, "buffers": buffers, "step": step, "host": host}
        if t:
            partitioned = t["placement"] == "partitioned" or (t["placement"] == "auto" and stage == 3)
            coloc = t_weights / (n if partitioned else 1)
            gathered = BYTES[t["dtype"]] * min(t["params"], TEACHER_GATHER) if partitioned else 0
            row["teacher_host"] = coloc * offload_param  # the teacher's ZeRO-3 engine offloads like the student
            row["teacher_colocated"] = coloc * (not offload_param) + gathered + t_logits
            row["total"] = {"colocated": device + row["teacher_colocated"], "cached": device, "remote": device}
            row["combined"] = {"colocated": combined + coloc + gathered + t_logits, "cached": combined,
                               "remote": combined}
        else:
            row["total"], row["combined"] = {"device": device}, {"device": combined}
        plan["stages"][stage] = {k: ({p: round(x) for p, x in v.items()} if isinstance(v, dict) else round(v))
                                 for k, v in row.items()}
    return plan


def human(x: float) -> str:
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.2f} MiB"


def render(plan: dict) -> str:
    t = plan["teacher"]
    totals = list(plan["stages"][0]["total"])
    head = ["stage", "weights", "grads", "optimizer", "activations", "buffers", "step"]
    head += (["teacher (coloc.)"] if t else [])
    head += [f"{p}{'*' if t and p == t['signal'] else ''}" for p in totals] + ["host"]
    rows = [head]
    for stage, r in plan["stages"].items():
        cells = [r["weights"], r["grads"], r["optimizer"], r["activations"], r["buffers"], r["step"]]
        cells += ([r["teacher_colocated"]] if t else [])
        cells += [r["total"][p] for p in totals] + [r["host"] + r.get("teacher_host", 0)]
        rows.append([f"{stage}{'*' if stage == plan['stage'] else ''}"] + [human(c) for c in cells])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    p = plan["params"]
    lines.insert(0, f"memory per rank (N={plan['num_workers']}, {plan['dtype']}): {p['trainable']:,} trainable, "
                    f"{p['frozen']:,} frozen params" + (f"; teacher {p['teacher']['params']:,} "
                                                        f"({p['teacher']['dtype']})" if t else ""))
    lines += ["* = configured. weights b(Ψt+Ψf) [/N stage 3]; grads bΨt [/N stage>=2]; optimizer fp32 master + "
              "Adam 12Ψt (stage 0: 8Ψt unless 16-bit) [/N stage>=1]",
              "activations micro·seq·h·L·34b/2 (checkpointing: b per layer + one block) + logits of the rows a loss "
              "reads; buffers: DeepSpeed's reduction bucket / flat gradients / gathered ZeRO-3 parameters",
              "step: fp32 gradients + Adam temporaries at the optimizer step; peak = weights + optimizer "
              "+ max(activations + grads + buffers, step) (stage 3 keeps grads and a bucket throughout)",
              "host = bytes offloaded to CPU memory (offload_optimizer / offload_param; a colocated teacher's "
              "weights included); runtime fixed costs not counted; formulas: distune/plan.py"]
    load = plan.get("load")
    if load:
        lines.append(f"loading, private memory per rank: whole {human(load['whole'])} (every rank holds the model "
                     f"before DeepSpeed partitions it); partitioned {human(load['partitioned'])} (model.load, stage 3)")
    if t:
        lines += [f"teacher colocated ({t['placement']}): partitioned {human(t['partitioned'])} per rank (ZeRO-3: "
                  f"its share + the layers its forward gathers + logits), replicated {human(t['replicated'])} "
                  "(a whole copy + logits; no gathers, faster)",
                  f"teacher cached: 0 on the GPU; disk ≈ {t['trained_tokens']:,} trained tokens × top-{t['top_k']} "
                  f"= {human(t['cache_disk'])}",
                  f"teacher remote: 0 on training ranks; each of {t['actors']} actor(s) needs "
                  f"{human(t['remote_actor'])}"]
    return "\n".join(lines)


def _meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0]) * 1024
    return out


def _own_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def need_on_this_machine(plan: dict, cfg, uses_gpu: bool) -> float:
    """What the configured run takes of the machine's limited resource: a GPU's memory per rank (the estimate + the
    CUDA context and NCCL), or, for CPU workers, this machine's RAM: every rank with its process, Ray's own
    processes and the driver (distune.scale's measured constants)."""
    from distune.scale import DRIVER, GPU_RUNTIME, RAY_NODE, WORKER_PROCESS

    row = plan["stages"][cfg.deepspeed.stage]
    signal = plan["teacher"]["signal"] if plan["teacher"] else "device"
    if uses_gpu:
        return row["total"][signal] + GPU_RUNTIME
    return plan["num_workers"] * (row["combined"][signal] + WORKER_PROCESS) + RAY_NODE + DRIVER


def verdict(plan: dict, cfg, summary: dict, counts: dict, uses_gpu: bool) -> dict:
    """The configured run against this machine: {fits, near, need, limit, text, advice}. CPU workers' limit is Ray's
    memory-monitor kill threshold (RAY_memory_usage_threshold x RAM) less what other processes use now."""
    from distune.scale import KILL_THRESHOLD, NEAR, advice

    stage = cfg.deepspeed.stage
    signal = plan["teacher"]["signal"] if plan["teacher"] else "device"
    need = need_on_this_machine(plan, cfg, uses_gpu)
    if uses_gpu:
        import torch

        if not torch.cuda.is_available():
            return {"fits": None, "near": False, "need": need, "limit": None, "advice": [],
                    "text": f"GPU workers, but this machine has no CUDA device to compare {human(need)} per rank with"}
        limit = torch.cuda.get_device_properties(0).total_memory
        where = (f"GPU 0 has {human(limit)}; stage {stage} {signal} needs {human(need)} a rank (the estimate + "
                 f"CUDA context and NCCL buffers)")
    else:
        mem = _meminfo()
        others = max(0, mem["MemTotal"] - mem["MemAvailable"] - _own_rss())
        limit = KILL_THRESHOLD * mem["MemTotal"] - others
        where = (f"CPU workers: {plan['num_workers']} rank(s) at stage {stage} {signal} with their processes, Ray's "
                 f"and the driver need {human(need)}; Ray kills workers above {KILL_THRESHOLD:.0%} of this machine's "
                 f"{human(mem['MemTotal'])} RAM, and other processes use {human(others)} now: "
                 f"{human(max(limit, 0))} for this run")
    fits, near = need <= limit, limit * (1 - NEAR) < need <= limit
    state = "fits" if fits and not near else "fits, within 10 % of the limit" if fits else "DOES NOT FIT"
    text = f"{where} ({state}, activations estimated)"
    tips = []
    if not fits or near:
        tips = advice(cfg, summary, counts, uses_gpu,
                      lambda p, c: need_on_this_machine(p, c, uses_gpu), limit * (1 - NEAR))
        text += "\n" + ("to make room: " + "; ".join(f"{label} -> {human(p)}" for label, p, _ in tips) if tips else
                        "no single setting makes room: a smaller model, more workers or more memory")
    t = plan["teacher"]
    if t and signal == "colocated":
        row = plan["stages"][stage]
        per_rank = limit if uses_gpu else limit / plan["num_workers"]
        student = row["total"]["cached"] if uses_gpu else row["combined"]["cached"]
        if student + t["replicated"] <= per_rank:
            rec = "replicated (it fits whole on every rank: no gathers)"
        elif student + t["partitioned"] <= per_rank:
            rec = "partitioned (whole it does not fit next to the student)"
        else:
            rec = "remote or cached (it does not fit next to the student either way)"
        text += f"\nteacher placement: recommended {rec}; configured method.teacher.placement: {t['placement']}"
    return {"fits": fits, "near": near, "need": need, "limit": limit, "text": text, "advice": tips}


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
    counts = count_params(cfg, summary["model_source"])
    if args.gpu:
        from distune.scale import cluster_plan, render_cluster

        cp = cluster_plan(cfg, summary, counts, args.gpu, args.nodes, args.gpus_per_node)
        print(render(cp["plan"]))
        print(render_cluster(cp))
        out = cp
    else:
        gpu = target_uses_gpu(cfg)
        plan = estimate(cfg, summary, counts, gpu=gpu)
        print(render(plan))
        print(verdict(plan, cfg, summary, counts, gpu)["text"])
        out = plan
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
