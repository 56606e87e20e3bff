"""Memory per rank, on paper: the estimate `distune plan` prints and distune.scale extends to clusters.

The model follows what DeepSpeed (0.19) and torch's AdamW allocate, phase by phase, because the peak is the larger
of two moments that never overlap: the backward (activations, gradients, reduction buffers) and the optimizer step
(fp32 gradients and Adam's temporaries). Per rank, with N = cluster.num_workers, b = bytes per weight (bf16/fp16 2, fp32 4), Ψt
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
Imports neither ray nor deepspeed.
"""

from __future__ import annotations

from distune.engine.ds_config import ZERO3_GATHER  # plain data (that module imports no deepspeed)

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def teacher_spec(cfg):
    """The teacher the run's method asks for (distune.signals.TeacherSpec), or None."""
    from distune.methods import frozen_models

    return frozen_models(cfg).get("teacher")


def signal_classes() -> list:
    """The registered teacher signals, in the order of the plan's columns."""
    from distune.signals import get_signal, known_signals

    return sorted((get_signal(n) for n in known_signals()), key=lambda s: s.column)


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
    spec = teacher_spec(cfg)
    fraction = 1.0 if spec is not None and spec.positions == "all" else summary.get("trained_token_fraction", 1.0)
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
        k = spec.top_k or 64  # signals without dense logits default to 64 when top_k is unset
        table = next(s.table for s in signal_classes() if s.name == spec.signal)
        plan["teacher"] = {"signal": table, "trained_tokens": round(tokens), "top_k": k,
                           "cache_disk": round(tokens * k * ((2 if vocab <= 65536 else 4) + 2)),
                           "remote_actor": t_weights + t_logits, "actors": spec.remote.get("actors", 1),
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
            # A column per teacher signal: one whose teacher runs on the training ranks adds it there.
            here = coloc + gathered + t_logits
            row["total"] = {s.table: device + row["teacher_colocated"] * s.runs_here for s in signal_classes()}
            row["combined"] = {s.table: combined + here * s.runs_here for s in signal_classes()}
        else:
            row["total"], row["combined"] = {"device": device}, {"device": combined}
        plan["stages"][stage] = {k: ({p: round(x) for p, x in v.items()} if isinstance(v, dict) else round(v))
                                 for k, v in row.items()}
    return plan


def human(x: float) -> str:
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.2f} MiB"
