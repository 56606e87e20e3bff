"""`distune plan CFG`: the memory each rank needs, per ZeRO stage and teacher placement, before any worker starts.

Counts parameters on the meta device (no weights are read), prints the estimate (distune.memory, which documents
its model of DeepSpeed's allocations) as a table, and the verdict against this machine (or, with --gpu, a cluster
on paper: distune.scale). A method that cannot be built on the meta device falls back on its own count
(`Method.meta_counts`; LoRA's: r·(in+out) per targeted linear, +out with DoRA). Imports neither ray nor deepspeed; torch and transformers load inside functions only.
"""

from __future__ import annotations

import json
from pathlib import Path

from distune.memory import BYTES, estimate, human, signal_classes  # noqa: F401  (public here too: tests, benches)


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


def count_params(cfg, source: str) -> dict:
    """Student trainable/frozen counts and shapes, and the teacher's (a method with one), from configs alone."""
    from distune.methods import RunSettings, build_method
    from distune.models import resolve_model_source

    method = build_method(cfg.method.name, cfg.method.model_extra or {}, RunSettings.of(cfg))
    out = {}
    t = method.frozen_models().get("teacher")
    if t is not None:
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
    except Exception:  # an adapter that needs real tensors: the method's own formula, where it has one
        counts = method.meta_counts(_meta_model(source, cfg.model.trust_remote_code, cfg.model.layers))
        if counts is None:
            raise
        trainable, frozen = counts
    return {"trainable": trainable, "frozen": frozen, **shape, **out}


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
        elsewhere = [s for s in signal_classes() if not s.runs_here]  # the student alone on the training ranks
        student = row["total" if uses_gpu else "combined"][elsewhere[0].table]
        if student + t["replicated"] <= per_rank:
            rec = "replicated (it fits whole on every rank: no gathers)"
        elif student + t["partitioned"] <= per_rank:
            rec = "partitioned (whole it does not fit next to the student)"
        else:
            rec = (f"{' or '.join(s.name for s in elsewhere)} (it does not fit next to the student either way)")
        text += f"\nteacher placement: recommended {rec}; configured method.teacher.placement: {t['placement']}"
    return {"fits": fits, "near": near, "need": need, "limit": limit, "text": text, "advice": tips}


def show_samples(cfg, summary: dict, n: int) -> str:
    """The first n training samples as the model sees them (template, design, chat template), as their task shows
    them: trained tokens «marked» for a causal LM, the class, the tags or the answer span for a head."""
    from distune.data.prepare import splits_for
    from distune.models import load_tokenizer
    from distune.tasks import get_task

    tokenizer = load_tokenizer(summary["model_source"], cfg.model.trust_remote_code)
    splits = splits_for(cfg, tokenizer)
    task = get_task(cfg.model.task)
    lines = []
    for i, s in enumerate(splits.train[:n]):
        details, text = task.show(tokenizer, s, splits.labels, cfg.data.max_length)
        lines += [f"--- sample {i + 1} (data #{s.line}, {details})", text]
    total = len(splits.train) + len(splits.eval)
    lines.append(f"--- {splits.truncated} of {total} samples truncated at data.max_length={cfg.data.max_length}")
    return "\n".join(lines)


def command(cfg, summary: dict, args) -> int:
    from distune.hardware import uses_gpu

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
        gpu = uses_gpu(cfg.cluster.use_gpu)
        plan = estimate(cfg, summary, counts, gpu=gpu)
        print(render(plan))
        print(verdict(plan, cfg, summary, counts, gpu)["text"])
        out = plan
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
