"""`distill`: a student method (full, lora, ...) trained towards a frozen teacher.

loss = (1 - kd_weight) * CE(labels) + kd_weight * D(student || teacher) [+ hidden.weight * hidden-state distance]

The wrapped student method decides what trains and what is exported; this class only adds the teacher
terms. The teacher arrives in `frozen["teacher"]` as a signal (distune.signals): the method does
not know whether it runs on the same ranks, comes from a cache, or from a remote actor group.
On-policy (GKD): with probability `gkd.lmbda` the student samples the continuation of the prompt, and the
loss is computed on the student's own tokens (CE then has no labels: only the KD term is used).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field, field_validator, model_validator
from torch import nn

from distune.distill.divergences import DIVERGENCES, distill_loss, params_of
from distune.logits import head_at
from distune.methods.base import Method, MethodConfig, RunSettings, build_method, nested_method, register_method
from distune.paths import anchor
from distune.signals import DEFAULT_SIGNAL, SIGNALS, TeacherSpec, get_signal, kd_positions, known_signals
from distune.tasks import Batch, LossOutput, model_inputs
from distune.tasks.choices import left_padded

PROJECTION = "distill_projection"  # submodule name of the learned hidden-state projections


class TeacherOptions(MethodConfig):
    path: str = Field(..., description="Hub id, local folder, .gguf, or a PEFT adapter folder (merged on load).")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the hardware computes it natively, else fp32 (as model.dtype).")
    trust_remote_code: bool = Field(False, description="Passed to transformers when the teacher is loaded.")
    prompt: str | None = Field(None, description="Cross-architecture: the teacher's own prompt template (default "
                                                 "data.prompt), e.g. with the instruction the student does not need.")
    system: str | None = Field(None, description="Cross-architecture: the teacher's system message (default "
                                                 "data.system).")
    placement: Literal["auto", "partitioned", "replicated"] = Field(
        "auto", description="Where an online teacher's weights live, whatever the student's ZeRO stage. partitioned: "
        "ZeRO-3 across the job's ranks, built partitioned from its safetensors slices (no rank holds it whole; "
        "every rank runs its forward each step, gathering a layer at a time); replicated: a whole copy on every "
        "rank (fastest when it fits). auto: partitioned when deepspeed.stage is 3, else replicated. "
        "`distune plan` shows both.")

    @field_validator("path")
    @classmethod
    def _anchor(cls, v: str) -> str:
        return anchor(v, hub_ids=True)


class HiddenOptions(MethodConfig):
    weight: float = Field(0.0, ge=0, description="Weight of the hidden-state term (0: off).")
    loss: Literal["cosine", "mse"] = Field(
        "cosine", description="cosine: 1 - cos(projected student, teacher) per token (DistilBERT's cosine "
                              "embedding loss; blind to scale, so Llama-style massive activations, measured at "
                              "~24,000 in SmolLM2's residual stream, do not swamp it); mse: plain MSE (TinyBERT).")
    layers: dict[int, int] | None = Field(
        None, description="student hidden-state index -> teacher index (0 = embeddings); default: evenly spaced.")


class GkdOptions(MethodConfig):
    lmbda: float = Field(0.0, ge=0, le=1, description="Probability a batch is the student's own samples.")
    max_new_tokens: int = Field(16, gt=0, description="The longest continuation the student samples.")
    temperature: float = Field(1.0, gt=0, description="Student sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Student sampling nucleus (top-p; 1: off).")


class RemoteOptions(MethodConfig):
    actors: int = Field(1, gt=0, description="Teacher actors (each holds a full teacher replica).")
    cpus_per_actor: float = Field(1, gt=0, description="CPUs Ray reserves per teacher actor.")
    gpus_per_actor: float = Field(0, ge=0, description="GPUs per actor; above 1 (a whole number), the teacher "
                                  "is spread over them, a layer range on each (one too big for one GPU).")
    prefetch: bool = Field(True, description="Send each micro-batch to the teacher before its turn, so the "
                                             "teacher's forward overlaps the student's step (train/teacher_wait_s "
                                             "shows the wait left).")

    @field_validator("gpus_per_actor")
    @classmethod
    def _whole_gpus(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"more than one GPU per actor must be a whole number (got {v})")
        return v


class DistillOptions(MethodConfig):
    student: dict = Field(default_factory=lambda: {"name": "full"},
                          description="The wrapped student method: {name: lora, r: 16, ...}.")
    teacher: TeacherOptions = Field(..., description="The frozen teacher.")
    signal: str = Field(
        DEFAULT_SIGNAL, description="Where the teacher's distributions come from (a signal registered in "
        "distune/signals/). online: the teacher runs on the training ranks (method.teacher.placement); cached: read "
        "from cache_dir, written by `distune cache-teacher`; remote: a Ray actor group of its own (method.remote).")
    top_k: int | None = Field(None, gt=0, description="Teacher top-k (None: dense, where the signal gives dense "
                                                      "logits (online); otherwise default 64).")
    cache_dir: str | None = Field(None, description="Where `distune cache-teacher` writes / training reads.")
    cache_compress: bool = Field(False, description="`distune cache-teacher` writes zip-compressed .npz shards "
                                 "(smaller to move; every rank then decompresses the whole cache into memory) "
                                 "instead of raw memory-mapped ones, which each rank reads in place, only its "
                                 "samples' rows. Training reads either.")
    divergence: str = Field("forward_kl", description="The KD divergence D(student || teacher): a name registered "
                            "in distune/distill/divergences.py, e.g. reverse_kl, jsd, tvd.")
    divergence_params: dict[str, float] = Field(default_factory=dict, description="e.g. {beta: 0.5} for jsd.")
    temperature: float = Field(1.0, gt=0, description="Divides the student's and the teacher's logits; the KD term "
                               "is multiplied by T^2, so the gradient scale does not shrink with T.")
    kd_weight: float = Field(0.5, ge=0, le=1, description="w in the loss (1 - w) x CE + w x KD.")
    kd_positions: Literal["response", "all"] = Field(
        "response", description="Where the KD term applies: the trained (response) positions, or every position "
                                "of the row, prompt included (heals a student pruned from a bigger model).")
    hidden: HiddenOptions = Field(default_factory=HiddenOptions, description="Hidden-state distillation through a "
                                  "learned projection (signal online only).")
    gkd: GkdOptions = Field(default_factory=GkdOptions, description="On-policy distillation (GKD): batches of the "
                            "student's own continuations, scored by the teacher.")
    remote: RemoteOptions = Field(default_factory=RemoteOptions, description="The remote teacher's Ray actor group "
                                  "(signal remote).")

    @field_validator("cache_dir")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        return anchor(v)

    @field_validator("signal")
    @classmethod
    def _known_signal(cls, v: str) -> str:
        return SIGNALS.check(v)

    @field_validator("divergence")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in DIVERGENCES:
            raise ValueError(f"unknown divergence {v!r}; known: {', '.join(sorted(DIVERGENCES))}")
        return v

    @field_validator("student")
    @classmethod
    def _student(cls, v: dict) -> dict:
        name = v.get("name", "full")
        if name in ("distill", "adapters"):
            raise ValueError(f"method.student.name: a distillation student cannot itself be {name!r}")
        nested_method(v, ("method", "student"), "full")  # errors name method.student.<key>
        return {"name": name, **v}

    @model_validator(mode="after")
    def _divergence_params(self) -> DistillOptions:
        # Checked here: a wrong name would otherwise be a TypeError inside the first loss, on every worker.
        from distune.errors import closest_key

        accepted = params_of(self.divergence)
        for key in self.divergence_params:
            if accepted is not None and key not in accepted:
                if not accepted:
                    raise ValueError(f"method.divergence_params.{key}: divergence {self.divergence!r} takes no "
                                     f"parameters; remove method.divergence_params")
                close = closest_key(key, accepted)
                hint = f"did you mean {close!r}? " if close else ""
                raise ValueError(f"method.divergence_params.{key}: unknown parameter of divergence "
                                 f"{self.divergence!r}; {hint}accepted: {', '.join(accepted)}")
        return self

    @model_validator(mode="after")
    def _combinations(self) -> DistillOptions:
        """The options against what the signal declares it serves (distune.signals.base.Signal)."""
        signal = get_signal(self.signal)

        def able(what: str) -> str:
            return " or ".join(n for n in known_signals() if getattr(get_signal(n), what))

        if not signal.dense and self.top_k is None:
            self.top_k = 64
        if not signal.runs_here and self.teacher.placement != "auto":
            raise ValueError(f"method.teacher.placement: applies to a teacher on the training ranks (signal "
                             f"{able('runs_here')}; signal is {self.signal!r}, whose teacher runs elsewhere or not "
                             f"at all)")
        if signal.reads_cache and not self.cache_dir:
            raise ValueError(f"method.cache_dir: signal {self.signal!r} needs it (written by `distune cache-teacher`)")
        if not signal.on_policy and self.gkd.lmbda > 0:
            raise ValueError(f"method.gkd.lmbda: > 0 scores the student's own samples, which needs signal "
                             f"{able('on_policy')}, not {self.signal}")
        if not signal.hidden_states and self.hidden.weight > 0:
            named = " or ".join(repr(n) for n in able("hidden_states").split(" or "))
            raise ValueError(f"method.hidden.weight: hidden-state distillation needs signal {named} (signal "
                             f"{self.signal!r} gives no hidden states)")
        return self


@register_method("distill")
class Distill(Method):
    Config = DistillOptions

    def __init__(self, config: DistillOptions, settings: RunSettings | None = None, key: str = "method"):
        super().__init__(config, settings, key)
        student = dict(config.student)
        self.student = build_method(student.pop("name"), student, self.settings, f"{key}.student")
        self.supports_packing, self.quantizable = self.student.supports_packing, self.student.quantizable
        self.teacher_width = self.teacher_layers = None  # from see_frozen_configs (hidden distillation)

    @classmethod
    def resolve_dtypes(cls, options: dict, resolved) -> dict:
        teacher = options.get("teacher")
        if isinstance(teacher, dict) and teacher.get("dtype", "auto") == "auto":
            return {**options, "teacher": {**teacher, "dtype": resolved()}}
        return options

    def check(self, cfg) -> None:
        c = self.config
        if c.kd_positions == "all":
            if self.task.distills != "tokens":
                raise ValueError(f"method.kd_positions: 'all' distils every token's next-token distribution; a "
                                 f"{self.task.name} student has none (it matches the teacher's classes)")
            if cfg.data.packing:
                raise ValueError("method.kd_positions: 'all' would distil across the joins of packed samples; set "
                                 "data.packing false")
        if c.gkd.lmbda > 0 and cfg.data.train_on_inputs:
            raise ValueError("method.gkd.lmbda: on-policy samples continue each prompt, and the prompt ends at the "
                             "first trained token; with data.train_on_inputs: true there is none. Set it false")
        if c.gkd.lmbda > 0 and cfg.data.packing:
            raise ValueError("data.packing: on-policy samples continue each prompt separately (method.gkd); set it "
                             "false")
        self.student.check(cfg)

    def check_model(self, model: nn.Module) -> None:
        self.student.check_model(model)  # the wrapped student decides what the model sees

    def meta_counts(self, model: nn.Module) -> tuple[int, int] | None:
        return self.student.meta_counts(model)

    def frozen_models(self) -> dict[str, TeacherSpec]:
        c = self.config
        return {"teacher": TeacherSpec(path=c.teacher.path, dtype=c.teacher.dtype,
                                       trust_remote_code=c.teacher.trust_remote_code, signal=c.signal,
                                       top_k=c.top_k, temperature=c.temperature, hidden_states=c.hidden.weight > 0,
                                       cache_dir=c.cache_dir, cache_compress=c.cache_compress,
                                       remote=c.remote.model_dump(),
                                       prompt=c.teacher.prompt, system=c.teacher.system,
                                       positions=c.kd_positions, placement=c.teacher.placement)}

    def see_frozen_configs(self, configs) -> None:
        teacher = configs["teacher"]
        self.teacher_width, self.teacher_layers = teacher.hidden_size, teacher.num_hidden_layers

    # -- what trains: the student's method, plus projections for hidden-state distillation ---------

    def adapt(self, model: nn.Module) -> nn.Module:
        model = self.student.adapt(model)
        if self.config.hidden.weight > 0:
            if self.teacher_width is None:
                raise ValueError("hidden-state distillation: the runner did not give the teacher's width")
            width = model.config.hidden_size
            layers = self.layer_map(model.config.num_hidden_layers, self.teacher_layers)
            proj = nn.ModuleDict({str(s): nn.Linear(width, self.teacher_width, bias=False) for s in layers})
            if width == self.teacher_width:
                # Same width (e.g. a student made of the teacher's own layers): start from the identity, so the
                # term compares the two residual streams directly from step 0 instead of through a random map.
                for linear in proj.values():
                    nn.init.eye_(linear.weight)
            model.add_module(PROJECTION, proj)
        return model

    def layer_map(self, student_layers: int, teacher_layers: int) -> dict[int, int]:
        """Hidden-state indices (0 = embeddings, i = after block i): configured, or evenly spaced."""
        if self.config.hidden.layers:
            for s, t in self.config.hidden.layers.items():
                if not (0 <= s <= student_layers and 0 <= t <= teacher_layers):
                    raise ValueError(f"method.hidden.layers: {s}->{t} is outside the student's 0..{student_layers} "
                                     f"or the teacher's 0..{teacher_layers} hidden states")
            return dict(self.config.hidden.layers)
        return {s: round(s * teacher_layers / student_layers) for s in range(1, student_layers + 1)}

    def export_keys(self, model: nn.Module) -> set[str]:
        keys = self.student.export_keys(model)
        if keys is None:
            keys = {n for n, _ in model.named_parameters()}
        return {k for k in keys if PROJECTION not in k}

    def export(self, model, state_dict, out_dir: Path) -> None:
        self.student.export(model, {k: v for k, v in state_dict.items() if PROJECTION not in k}, out_dir)

    # -- the objective ------------------------------------------------------------------------------

    def loss(self, model, batch, frozen) -> LossOutput:
        c = self.config
        teacher = frozen["teacher"]
        if getattr(batch, "task", self.task).distills == "classes":
            return self._classifier_loss(model, batch, teacher)
        on_policy = c.gkd.lmbda > 0 and self._coin(batch) < c.gkd.lmbda
        if on_policy:
            batch = self._student_samples(model, batch)
        hidden = c.hidden.weight > 0
        positions = kd_positions(batch, c.kd_positions)  # ⊇ the trained positions: CE reads a subset of its rows
        labels = batch["labels"][:, 1:][positions]
        ce_rows = labels != -100
        t = teacher(batch, positions)
        # The student's head runs on the KD positions only, in chunks with train.loss_chunk (distune.logits).
        with head_at(model, positions, self.settings.loss_chunk) as sel:
            out = model(**model_inputs(batch), output_hidden_states=hidden)
        vocab = getattr(teacher, "vocab_size", None)
        top1: dict[int, torch.Tensor] = {}  # the student's argmax, per chunk (the agreement metric)

        def sums(logits: torch.Tensor, rows: slice) -> torch.Tensor:
            """[KD sum, CE sum] over `rows` of the KD positions, both from the same student logits."""
            student = logits[:, :vocab]  # padded embedding rows cut, as the teacher's are
            top1[rows.start] = student.detach().argmax(-1)
            teacher_rows = {"teacher_logits": t.logits[rows]} if t.logits is not None else {
                "teacher_topk": (t.topk_ids[rows], t.topk_logp[rows])}
            kd = distill_loss(c.divergence, student, temperature=c.temperature, **teacher_rows,
                              **c.divergence_params) * (rows.stop - rows.start)
            keep = ce_rows[rows]
            ce = nn.functional.cross_entropy(logits[keep].float(), labels[rows][keep], reduction="sum")
            return torch.stack([kd, ce])

        everything = slice(0, labels.numel())
        kd_sum, ce_sum = sel.reduce(sums) if sel.chunked else sums(sel.pick(out.logits), everything)
        kd = kd_sum / labels.numel()
        n_tokens = ce_rows.sum()
        if on_policy:
            # No gold labels on own samples.
            ce, total = torch.zeros((), device=kd.device), kd
        else:
            ce = ce_sum / n_tokens.clamp(min=1)
            total = (1 - c.kd_weight) * ce + c.kd_weight * kd
        metrics = {"ce": ce.detach(), "kd": kd.detach(), "trained_tokens": n_tokens.detach(),
                   "on_policy": torch.tensor(float(on_policy), device=kd.device)}
        if hidden:
            h = self._hidden_loss(model, out.hidden_states, t.hidden, batch["attention_mask"])
            total = total + c.hidden.weight * h
            metrics[f"hidden_{c.hidden.loss}"] = h.detach()
        student_top1 = torch.cat([top1[k] for k in sorted(top1)])
        metrics.update(teacher_metrics(student_top1, t, c.temperature))
        return LossOutput(total, metrics)

    def _classifier_loss(self, model, batch, teacher) -> LossOutput:
        """Cross-architecture: a classifier student matches the teacher's distribution over the classes
        (its verbalizer probabilities, from the cache); tokenizers never meet."""
        c = self.config
        logits = model(**model_inputs(batch)).logits
        t = teacher(batch, None)
        ce = nn.functional.cross_entropy(logits.float(), batch["class_labels"])
        kd = distill_loss(c.divergence, logits, teacher_logits=t.logits, temperature=c.temperature,
                          **c.divergence_params)
        metrics = {"ce": ce.detach(), "kd": kd.detach(),
                   **teacher_metrics(logits.detach().argmax(-1), t, c.temperature)}
        return LossOutput((1 - c.kd_weight) * ce + c.kd_weight * kd, metrics)

    def _hidden_loss(self, model, student_h, teacher_h, attention_mask) -> torch.Tensor:
        proj = _find(model, PROJECTION)
        keep = attention_mask.bool()
        losses = []
        for s, t in self.layer_map(len(student_h) - 1, len(teacher_h) - 1).items():
            mapped = proj[str(s)](student_h[s][keep].to(proj[str(s)].weight.dtype)).float()
            target = teacher_h[t][keep].float()
            if self.config.hidden.loss == "cosine":
                losses.append((1 - nn.functional.cosine_similarity(mapped, target, dim=-1)).mean())
            else:
                losses.append(nn.functional.mse_loss(mapped, target))
        return torch.stack(losses).mean()

    # -- on-policy samples ---------------------------------------------------------------------------

    def _coin(self, batch) -> float:
        """One draw per micro-batch, equal on every rank (so all ranks generate together, which ZeRO-3's
        collective gathers require) and a function of the data alone (so a resumed run draws the same)."""
        key = batch["input_ids"].sum().to(torch.float64).reshape(1)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(key)
        return random.Random(int(key.item()) * 7919 + self.settings.seed).random()

    @torch.no_grad()
    def _student_samples(self, model, batch) -> dict[str, torch.Tensor]:
        """Prompts of the batch (tokens before the first trained one), continued by the student's sampling."""
        g = self.config.gkd
        labels, ids = batch["labels"], batch["input_ids"]
        starts = [(row != -100).nonzero()[0].item() if (row != -100).any() else int(m.sum())
                  for row, m in zip(labels, batch["attention_mask"])]
        width = max(starts)
        pad = _pad_id(model)
        # Left padding: generation continues from the last column.
        prompts, prompt_mask = (t.to(ids.device) for t in left_padded([row[:n] for row, n in zip(ids, starts)], pad))
        module = getattr(model, "module", model)
        was_training = module.training
        module.eval()
        try:
            seqs = module.generate(input_ids=prompts, attention_mask=prompt_mask, do_sample=True,
                                   temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens,
                                   min_new_tokens=1, pad_token_id=pad,
                                   # On-policy means the student's own distribution: no default top-50 cut,
                                   # nor a checkpoint's generation_config settings, on top of T and top_p.
                                   top_k=0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                                   synced_gpus=dist.is_initialized() and dist.get_world_size() > 1)
        finally:
            module.train(was_training)
        new = seqs[:, width:]
        eos = _eos_ids(module)
        # Tokens after the first end-of-sequence are padding, not part of the sample.
        done = torch.zeros_like(new, dtype=torch.bool)
        if eos:
            is_eos = torch.isin(new, torch.tensor(eos, device=new.device))
            done = (is_eos.cumsum(1) - is_eos.long()) > 0
        new_mask = (~done).long()
        input_ids = torch.cat([prompts, new.masked_fill(done, pad)], 1)
        attention = torch.cat([prompt_mask, new_mask], 1)
        new_labels = torch.cat([torch.full_like(prompts, -100), new.masked_fill(done, -100)], 1)
        return Batch(batch.task, {"input_ids": input_ids, "attention_mask": attention, "labels": new_labels}) \
            if isinstance(batch, Batch) else {"input_ids": input_ids, "attention_mask": attention, "labels": new_labels}


def teacher_metrics(student_top1: torch.Tensor, t, temperature: float) -> dict[str, torch.Tensor]:
    """Teacher entropy (at T), top-k mass covered, student-teacher top-1 agreement, at the trained positions."""
    if t.logits is not None:
        t_logp = torch.log_softmax(t.logits.float() / temperature, -1)
        entropy = -(t_logp.exp() * t_logp.clamp(min=-1e4)).sum(-1)
        top1 = t.logits.argmax(-1)
        out = {}
    else:
        p = t.topk_logp.float().exp()
        tail = (1 - p.sum(-1)).clamp(min=0)
        # Entropy of the k kept tokens plus one tail bin: a lower bound on the full teacher entropy.
        entropy = -(p * t.topk_logp.float()).sum(-1) - tail * torch.log(tail.clamp(min=1e-12))
        top1 = t.topk_ids[:, 0]
        out = {"teacher_topk_mass": p.sum(-1).mean()}
    out["teacher_entropy"] = entropy.mean()
    out["top1_agreement"] = (student_top1 == top1).float().mean()
    if t.wait_s is not None:  # a remote teacher: how long this rank waited for it, and whether it was prefetched
        dev = student_top1.device
        out["teacher_wait_s"] = torch.tensor(t.wait_s, device=dev)
        out["teacher_prefetched"] = torch.tensor(float(t.prefetched), device=dev)
    return out


def _find(model: nn.Module, name: str) -> nn.Module:
    for n, m in model.named_modules():
        if n == name or n.endswith("." + name):
            return m
    raise KeyError(name)


def _pad_id(module) -> int:
    cfg = getattr(module, "module", module).config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    return int(pad[0] if isinstance(pad, list) else pad or 0)


def _eos_ids(module) -> list[int]:
    eos = module.config.eos_token_id
    return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
