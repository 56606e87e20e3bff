"""`distune plan --gpu TYPE --nodes N --gpus-per-node G`: a run at cluster scale, on paper.

From the per-rank estimate (distune.plan) of a cluster that is not here: per rank the GPU memory with what shares
the GPU (CUDA context, NCCL buffers); per node the host RAM at load and at checkpoint time (every rank of a node
at once, plus the Ray runtime); the checkpoint's size; the bytes each rank sends and receives per optimizer step.
A fit verdict that counts what shares the machine, and when a config does not fit or sits within 10 % of the
limit, the cheapest settings that make it fit, each with its predicted peak (`advice`).

Communication per rank per optimizer step (ring collectives: a rank moves (N-1)/N of the buffer; b bytes per
weight, Ψ all parameters, Ψt trainable; one micro-batch per step, more multiply the gathers):
  stage 0      all-reduce of the gradients            2·b·Ψt·(N-1)/N
  stage 1-2    reduce-scatter of the gradients         b·Ψt·(N-1)/N, all-gather of the updated weights  b·Ψt·(N-1)/N
  stage 3      all-gather of the weights, forward and backward (and once more to recompute with gradient
               checkpointing)  2-3 · b·Ψ·(N-1)/N, reduce-scatter of the gradients  b·Ψt·(N-1)/N.
               With hpZ (zero_hpz_partition_size = G) the backward gathers within a node only.
  teacher      an online teacher partitioned across the ranks: an all-gather of its weights per forward,
               b_T·Ψ_T·(N-1)/N
Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import os

from distune.memory import BYTES, estimate, human

# GPU memory as nvidia-smi reports it (MiB): what a process can see before the CUDA context.
GPU_MIB = {"h100": 81559, "h200": 143771, "a100-80": 81920, "a100-40": 40960, "l40s": 46068}
# What shares each GPU with the estimate: the CUDA context with torch's kernels (~0.5 GiB on an H100) and NCCL's
# buffers and communicators (~0.5 GiB with default NCCL_BUFFSIZE and 8 GPUs a node). Not measured here (no GPU).
GPU_RUNTIME = 1.0 * 2**30
# Host memory of the processes beside the ranks, measured on a 2-core CPU machine (bench/runtime_memory.py) at the
# instant the run's processes together peaked: a Ray node's own processes (raylet, GCS, dashboard and agents; the
# head's), Ray Train's controller actor and distune's progress actor, while the workers train (0.95 GiB is their
# own peak, at start-up, before any model is loaded); the driver (`distune run`); and a training worker's process
# before its model (python, torch, DeepSpeed, transformers, Ray's worker runtime).
RAY_NODE = 0.60 * 2**30
DRIVER = 0.37 * 2**30
WORKER_PROCESS = 0.40 * 2**30
NEAR = 0.10  # within this fraction of the limit, a verdict names what would make room
KILL_THRESHOLD = float(os.environ.get("RAY_memory_usage_threshold", 0.95))  # Ray's memory monitor kills above it


def communication(cfg, counts: dict, n: int, gpus_per_node: int | None = None) -> dict:
    """Bytes a rank moves per optimizer step, by collective (see the module docstring)."""
    b = BYTES[cfg.model.dtype]
    pt, everything = counts["trainable"], counts["trainable"] + counts["frozen"]
    ring = (n - 1) / n if n > 1 else 0.0
    stage = cfg.deepspeed.stage
    out = _teacher_gathers(cfg, counts, stage, ring)
    if stage == 0:
        return {"all_reduce": round(2 * b * pt * ring)} | out
    if stage < 3:
        return {"reduce_scatter": round(b * pt * ring), "all_gather": round(b * pt * ring)} | out
    passes = 3 if cfg.model.gradient_checkpointing else 2
    zero = cfg.deepspeed.extra.get("zero_optimization", {})
    hpz = int(zero.get("zero_hpz_partition_size", 1))
    out = {"all_gather": round(passes * b * everything * ring), "reduce_scatter": round(b * pt * ring)} | out
    if hpz > 1:  # the backward's gathers stay inside the node's hpZ group
        out["all_gather"] = round(b * everything * ring)
        out["all_gather_in_node"] = round((passes - 1) * b * everything * (hpz - 1) / hpz)
    return out


def _teacher_gathers(cfg, counts: dict, stage: int, ring: float) -> dict:
    """A teacher on the training ranks, partitioned across them, gathers its weights for every forward (once a micro-batch)."""
    from distune.memory import teacher_spec
    from distune.signals import get_signal

    t = counts.get("teacher")
    if not t or not get_signal(teacher_spec(cfg).signal).runs_here:
        return {}
    if not (t["placement"] == "partitioned" or (t["placement"] == "auto" and stage == 3)):
        return {}
    return {"teacher_all_gather": round(BYTES[t["dtype"]] * t["params"] * ring)}


def checkpoint_bytes(cfg, counts: dict) -> int:
    """One checkpoint, all ranks: the weights in the training dtype, the fp32 master copy (16-bit training) and
    Adam's two moments of the trainable parameters."""
    b = BYTES[cfg.model.dtype]
    pt, everything = counts["trainable"], counts["trainable"] + counts["frozen"]
    return round(b * everything + (4 * (b == 2) + 8) * pt)


def cluster_plan(cfg, summary: dict, counts: dict, gpu: str, nodes: int, gpus_per_node: int) -> dict:
    """The per-rank estimate for nodes × gpus_per_node GPUs of type `gpu`, with the node-level figures."""
    n = nodes * gpus_per_node
    sized = cfg.model_copy(deep=True)
    sized.cluster.num_workers = n
    plan = estimate(sized, summary, counts, gpu=True)
    stage, b = cfg.deepspeed.stage, BYTES[cfg.model.dtype]
    row = plan["stages"][stage]
    signal = plan["teacher"]["signal"] if plan["teacher"] else "device"
    gpu_have = GPU_MIB[gpu] * 2**20
    gpu_need = row["total"][signal] + GPU_RUNTIME
    pt = counts["trainable"]
    load = plan["load"]["partitioned" if cfg.loads_partitioned() else "whole"]
    offloaded = row["host"] + row.get("teacher_host", 0)
    t = counts.get("teacher")
    if t and plan["teacher"]["signal"] == "colocated":  # the online teacher loads on every rank too
        partitioned = t["placement"] == "partitioned" or (t["placement"] == "auto" and stage == 3)
        load += BYTES[t["dtype"]] * t["params"] / (n if partitioned else 1)
    # A save copies one tensor at a time to the host: the largest is a flat fp32 partition (stage >= 1), or a
    # whole 16-bit weight of the largest layer (the embedding) at stage 0.
    largest = max(4 * pt / (n if stage >= 1 else 1), b * counts["vocab"] * counts["hidden"])
    per_node = {
        "load": round(gpus_per_node * (load + WORKER_PROCESS + offloaded) + RAY_NODE),
        "checkpoint": round(gpus_per_node * (largest + WORKER_PROCESS + offloaded) + RAY_NODE),
    }
    fits, near = gpu_need <= gpu_have, gpu_have * (1 - NEAR) < gpu_need <= gpu_have
    tips = []
    if not fits or near:
        def need_of(p, c):
            return p["stages"][c.deepspeed.stage]["total"][signal] + GPU_RUNTIME

        tips = advice(sized, summary, counts, True, need_of, gpu_have * (1 - NEAR))
    return {"gpu": gpu, "nodes": nodes, "gpus_per_node": gpus_per_node, "num_workers": n, "stage": stage,
            "signal": signal, "plan": plan, "gpu_memory": gpu_have, "gpu_need": round(gpu_need),
            "gpu_runtime": round(GPU_RUNTIME), "host_per_node": per_node,
            "checkpoint_bytes": checkpoint_bytes(cfg, counts), "communication": communication(cfg, counts, n),
            "fits": fits, "near": near, "advice": tips}


def render_cluster(cp: dict) -> str:
    comm = ", ".join(f"{k.replace('_', '-')} {human(v)}" for k, v in cp["communication"].items())
    host = cp["host_per_node"]
    verdict = "fits" if cp["fits"] and not cp["near"] else "fits, within 10 % of the limit" if cp["fits"] \
        else "DOES NOT FIT"
    return "\n".join([
        f"cluster: {cp['nodes']} node(s) x {cp['gpus_per_node']} {cp['gpu'].upper()} = {cp['num_workers']} ranks, "
        f"stage {cp['stage']} ({cp['signal']})",
        f"  GPU per rank: {human(cp['gpu_need'])} of {human(cp['gpu_memory'])} (the estimate + "
        f"{human(cp['gpu_runtime'])} CUDA context and NCCL buffers): {verdict}",
        f"  host RAM per node: {human(host['load'])} at load, {human(host['checkpoint'])} at checkpoint (every rank "
        f"of the node, the Ray runtime, offloaded state)",
        f"  checkpoint: {human(cp['checkpoint_bytes'])}; per rank per step: {comm}",
    ] + ([("  to make room: " + "; ".join(
        f"{label} -> {human(p)} per GPU" + (f" and {human(h * cp['gpus_per_node'])} of host RAM per node offloaded"
                                            if h else "") for label, p, h in cp["advice"]))
          if cp["advice"] else "  no single setting makes room: more GPUs, or a smaller model"]
         if not cp["fits"] or cp["near"] else []))


def advice(cfg, summary: dict, counts: dict, gpu: bool, need_of, limit: float) -> list[tuple[str, float]]:
    """The settings that bring the peak under `limit`, cheapest first, each with its predicted peak.
    `need_of(plan, cfg)` -> bytes for a plan (the same quantity the verdict compares).
    Cost order: a chunked loss head (no extra compute), a smaller micro-batch (same global batch, more
    accumulation steps), gradient checkpointing (~1/3 more compute), a higher ZeRO stage (more communication),
    offloading (host<->device copies every step). Single changes first; if none fits alone, all of them together.
    Returns [(setting, predicted peak, host bytes per rank it offloads)]."""
    micro = cfg.train.micro_batch_size
    options = []
    if not cfg.train.loss_chunk:
        options.append(("train.loss_chunk=512", lambda c: setattr(c.train, "loss_chunk", 512)))
    if micro > 1:
        options.append((f"train.micro_batch_size={max(1, micro // 2)}",
                        lambda c: setattr(c.train, "micro_batch_size", max(1, micro // 2))))
    if not cfg.model.gradient_checkpointing:
        options.append(("model.gradient_checkpointing=true",
                        lambda c: setattr(c.model, "gradient_checkpointing", True)))
    if cfg.deepspeed.stage < 3:
        options.append((f"deepspeed.stage={cfg.deepspeed.stage + 1}",
                        lambda c: setattr(c.deepspeed, "stage", cfg.deepspeed.stage + 1)))
    if not cfg.deepspeed.offload_optimizer and cfg.deepspeed.stage >= 1:
        options.append(("deepspeed.offload_optimizer=true",
                        lambda c: setattr(c.deepspeed, "offload_optimizer", True)))

    def peak(changes) -> tuple[float, float]:
        c = cfg.model_copy(deep=True)
        for _, change in changes:
            change(c)
        p = estimate(c, summary, counts, gpu=gpu)
        row = p["stages"][c.deepspeed.stage]
        return need_of(p, c), row["host"] + row.get("teacher_host", 0)

    fitting = [(label, *peak([(label, change)])) for label, change in options]
    alone = [(label, need, host) for label, need, host in fitting if need <= limit]
    if alone:
        return alone
    if options:
        need, host = peak(options)
        if need <= limit:
            return [(" ".join(label for label, _ in options), need, host)]
    return []
