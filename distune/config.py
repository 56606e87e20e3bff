"""The run config: YAML -> typed pydantic models, strict.

Owns: the schema of every YAML key, `a.b.c=value` overrides, and error messages that name the key path
(and, for unknown keys, the closest valid one). Checks that need the filesystem or the model live in
`validate.py`. Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_serializer,
                      model_validator)


class ConfigError(ValueError):
    """A config problem, phrased for the user: names the key path or the file."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Strict):
    name: str = Field("run", description="Run name; the run directory is output_dir/name.")
    output_dir: str = Field("runs", description="Parent of run directories (checkpoints, export, results, the "
                            "recorded config): a folder every node can reach, or an object-store URI (s3://bucket/"
                            "runs, gs://bucket/runs, any URI pyarrow opens; credentials from the nodes' environment).")
    seed: int = Field(0, description="Seeds model init, data order, dropout; restored exactly on resume.")

    @field_validator("output_dir")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if "://" in v:  # object storage: opened (and checked) by distune.storage
            base, sep, query = v.partition("?")
            return base.rstrip("/") + sep + query
        # Resolved where the config is loaded (the driver): Ray workers run in another working directory.
        return str(Path(v).expanduser().absolute())

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("must be a plain folder name (no '/', not starting with '.')")
        return v


class ModelSection(Strict):
    path: str = Field(..., description="Hub id, local folder, or .gguf file (pkg:<package>/<file> is allowed).")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "fp32", description="Training precision (fp16 needs a GPU). auto: bf16 where the hardware computes it "
        "natively on the workers' hardware (a CUDA GPU with bf16, a CPU with AVX512-BF16/AMX/ARM BF16), else fp32; "
        "resolved where the job runs (on the cluster's workers for --address / submit / k8s) and recorded resolved "
        "in run_dir/config.yaml.")
    trust_remote_code: bool = Field(False, description="Passed to transformers: run the model repository's own "
                                    "Python code (only for repositories you trust).")
    tf32: bool = Field(True, description="On CUDA GPUs from Ampere on (A100, H100), fp32 matmuls and convolutions "
                       "use TF32 tensor cores (inputs rounded to a 10-bit mantissa, fp32 accumulation), as HF "
                       "Trainer's --tf32: an fp32 run several times faster. false: exact fp32. No effect on CPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute each block's activations in backward "
                                         "(activation memory ~ one block instead of all; ~1/3 more compute).")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = Field(
        None, description="Attention kernel (transformers' attn_implementation). None: the model's default (SDPA "
        "where the architecture supports it). flash_attention_2 needs a CUDA GPU and `pip install flash-attn`.")
    compile: bool = Field(False, description="torch.compile the training model (DeepSpeed's engine.compile, "
                          "inductor backend): the first steps pay the compilation (tens of seconds to minutes), "
                          "later ones run fused kernels. On CPU it needs a C++ compiler.")
    task: Literal["causal_lm", "sequence_classification", "token_classification", "question_answering"] = Field(
        "causal_lm", description="What the head predicts (any method trains it; encoders such as BERT/MiniLM or "
        "decoders). causal_lm: next-token loss on the response; sequence_classification: a class over data.labels "
        "from data.prompt's text; token_classification: a tag per word (e.g. BIO NER) from list columns 'tokens' "
        "and 'tags', tag set data.labels (default: every tag in the data, sorted; integer tags index it), scored by "
        "token accuracy and entity F1; question_answering: an extractive answer span from columns 'question', 'context' and SQuAD's "
        "'answers' {text, answer_start} (or flat 'answer' + 'answer_start'), scored by exact match and F1. "
        "data.columns renames your columns to these names.")
    quantization: Literal["4bit", "8bit"] | None = Field(
        None, description="QLoRA: load the frozen base through bitsandbytes (4bit = NF4 with double quantisation, "
        "compute in model.dtype; 8bit = LLM.int8) and train a PEFT method on top. CUDA GPUs only, ZeRO stage 0-2, "
        "needs `pip install 'distune[qlora]'`.")
    layers: int | list[int] | None = Field(
        None, description="Keep only these decoder blocks: k = every k-th (0, k, 2k, ...) or a list. With "
        "model.path set to the teacher, this initialises a student from the teacher's layers.")
    load: Literal["auto", "partitioned", "whole"] = Field(
        "auto", description="How the weights reach the ranks. partitioned (deepspeed.stage 3, safetensors "
        "checkpoints): the model is built already partitioned and each rank reads only its own slices of the "
        "checkpoint, so no rank ever holds a whole copy (private memory at load ~ the model / ranks); a LoRA "
        "adapter folder is merged slice by slice. whole: every rank loads the full model, then DeepSpeed "
        "partitions it. auto: partitioned under stage 3 (whole with model.quantization), else whole.")

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: int | list[int] | None) -> int | list[int] | None:
        if isinstance(v, int) and v <= 0:
            raise ValueError("every k-th layer needs k >= 1")
        if isinstance(v, list) and (not v or sorted(set(v)) != v or v[0] < 0):
            raise ValueError("must be a non-empty increasing list of block indices")
        return v


class DesignSection(Strict):
    """Sample design (SDE): how a sample's prompt and target are written. Exact renderings: distune/data/design.py."""

    instruction: str | list[str] | None = Field(
        None, description="Task instruction added to data.prompt; a list = several phrasings, one drawn per "
        "training row (seeded), the first used for eval rows.")
    instruction_position: Literal["first", "last"] = Field(
        "first", description="Instruction before the input (first) or after it (last).")
    aspects: list[str] | None = Field(
        None, description="Multi-aspect target: these columns (a value, a list, or empty) make up the "
        "response instead of data.response.")
    output_format: Literal["natural", "lines", "json"] = Field(
        "lines", description="How aspects are written: natural sentences, one 'aspect: value' per line, or JSON.")
    unmentioned: Literal["omit", "placeholder"] = Field(
        "omit", description="An aspect with an empty value: left out, or written with the placeholder.")
    placeholder: str = Field("none", description="Text written for an unmentioned aspect.")
    label_format: Literal["text", "numeric"] = Field(
        "text", description="Labels as their names, or as their index in data.labels.")
    reasoning: Literal["none", "cot"] = Field(
        "none", description="cot: the rationale first, then 'Answer: ...' (the loss covers both).")
    rationale: str = Field("{rationale}", description="Template for the rationale column(s) when reasoning: cot.")

    @field_validator("instruction")
    @classmethod
    def _phrasings(cls, v):
        if isinstance(v, list) and (not v or not all(isinstance(x, str) and x.strip() for x in v)):
            raise ValueError("must be a non-empty list of non-empty phrasings")
        return v

    @field_validator("aspects")
    @classmethod
    def _aspects(cls, v):
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("must be a non-empty list of distinct column names")
        return v


def _anchor_path(v: str | None) -> str | None:
    # Resolved where the config is loaded (the driver): Ray workers run in another working directory.
    return v if v is None or v.startswith(("pkg:", "hf:")) else str(Path(v).expanduser().absolute())


# Keys that shape the whole mixture (batches, tokens, the label set), so a task cannot set its own.
GLOBAL_DATA_KEYS = ("tasks", "mixture_temperature", "packing", "group_by_length", "max_length", "use_chat_template",
                    "train_on_inputs", "labels")


class DataSection(Strict):
    path: str | None = Field(None, description="JSONL / CSV / TSV / parquet file, a datasets folder (save_to_disk), "
                             "or hf:<hub id>[:config] (pkg:<package>/<file> is allowed). Required unless every "
                             "data.tasks entry gives its own.")

    @field_validator("path", "eval_path")
    @classmethod
    def _anchor(cls, v: str | None) -> str | None:
        return _anchor_path(v)
    split: str = Field("train", description="Split of a datasets folder or hub dataset.")
    format: Literal["prompt_response", "alpaca", "sharegpt", "messages"] = Field(
        "prompt_response", description="prompt_response: the prompt/response templates; alpaca: instruction, "
        "input, output columns; sharegpt: a 'conversations' list of {from, value}; messages: a 'messages' list "
        "of {role, content}. Multi-turn formats train on assistant turns only.")
    columns: dict[str, str] = Field(
        {}, description="Rename columns before anything reads them: {name the format expects: column in the file}.")
    bad_rows: Literal["fail", "skip"] = Field(
        "fail", description="A malformed row stops validation (naming file and line), or is skipped and counted.")
    prompt: str = Field("{prompt}", description="Template over the row's columns, e.g. 'Review: {text}'.")
    response: str = Field("{response}", description="Template over the row's columns for the target.")
    system: str | None = Field(None, description="Optional system message when the chat template is used.")
    use_chat_template: bool = Field(True, description="Render with the tokenizer's chat template if it has one.")
    train_on_inputs: bool = Field(False, description="Also train on prompt tokens (SDE's input modelling; "
                                  "default: response only).")
    design: DesignSection = Field(default_factory=DesignSection, description="Sample design: how a row becomes a "
                                  "sample (keys below).")
    max_length: int = Field(512, gt=1, description="Samples longer than this are truncated (from the right).")
    limit: int | None = Field(None, gt=0, description="Use only this many rows (after a seeded shuffle).")
    skip: int = Field(0, ge=0, description="Rows of the seeded order passed over before data.limit applies: with "
                      "the same run.seed, `skip: N` takes rows no run with `limit: N` saw (a disjoint sample of "
                      "the same file, e.g. unlabelled inputs for a teacher to label).")
    # None, not 0.1, as the default: a dumped config (what the workers load) must not look as if it set both.
    eval_size: int | float | None = Field(None, description="Held-out rows: a count, or a fraction in (0, 1); "
                                          "default 0.1. Not used with data.eval_path.")
    eval_path: str | None = Field(
        None, description="A separate held-out file (same format, columns and templates as data.path): every row is "
        "an eval row, and data.path's rows all train (data.limit cuts those only). Lets every arm of a comparison "
        "score the same fixed rows while the training file changes. Local files and datasets folders.")
    labels: list[str] | None = Field(
        None, description="The label set: class names for model.task sequence_classification (default: the "
        "distinct responses in the data, sorted), tag names for token_classification (default: every tag in "
        "the data, sorted), the order for design.label_format numeric, and the valid values when eval parses "
        "answers.")
    packing: bool = Field(False, description="Pack short training samples into rows of max_length; each keeps "
                          "its own positions and attends only to itself.")
    group_by_length: bool = Field(False, description="Batch training samples of similar length together "
                                  "(less padding; ignored with packing).")
    encoding: str = Field("utf-8", description="Text encoding of JSONL / CSV / TSV files.")
    encoding_errors: Literal["strict", "replace"] = Field(
        "strict", description="replace: undecodable bytes become U+FFFD instead of an error.")
    tasks: list[TaskSection] | None = Field(
        None, description="A multi-task mixture: each entry has a name, a weight and data.* keys that replace the "
        "top-level ones for that task (its own file, templates, design, limit, eval split).")
    mixture_temperature: float = Field(
        1.0, gt=0, description="Task i is drawn in proportion to (weight_i x rows_i) ** (1 / T): 1 = by size, "
        "large = uniform over tasks (small tasks upsampled).")

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_entries(cls, v):
        # Validated entry by entry so that every message names data.tasks.<i>.<key>.
        if v is None:
            return v
        if not isinstance(v, list) or not v:
            raise ValueError("must be a non-empty list of task mappings")
        out, seen = [], {}
        for i, item in enumerate(v):
            if not isinstance(item, (dict, TaskSection)):
                raise ValueError(f"data.tasks.{i}: must be a mapping with a name, a weight and data.* keys")
            if isinstance(item, dict):
                for key in item:
                    if key in GLOBAL_DATA_KEYS:
                        raise ValueError(f"data.tasks.{i}.{key}: applies to the whole mixture; set data.{key} "
                                         f"instead")
                try:
                    item = TaskSection.model_validate(item)
                except ValidationError as e:
                    raise ValueError(describe_error(e, TaskSection, prefix=("data", "tasks", str(i)))) from None
            if item.name in seen:
                raise ValueError(f"data.tasks.{i}.name: {item.name!r} is already data.tasks.{seen[item.name]}'s name")
            seen[item.name] = i
            out.append(item)
        return out

    @model_validator(mode="after")
    def _path_or_tasks(self) -> DataSection:
        if self.tasks:
            self.task_sections()  # every task's merged section must validate now, not on the workers
        elif self.path is None:
            raise ValueError("data.path: required key is missing (or give data.tasks)")
        return self

    def task_sections(self) -> list[tuple[str, float, DataSection]]:
        """(name, weight, effective data section) per task: the top-level keys, replaced by the task's own."""
        base = self.model_dump(exclude={"tasks", "mixture_temperature"})
        out = []
        for i, task in enumerate(self.tasks or ()):
            merged = {**base, **task.model_dump(include=task.model_fields_set - {"name", "weight"})}
            if merged["path"] is None:
                raise ValueError(f"data.tasks.{i}.path: required key is missing (no data.path to default to)")
            try:
                # model_validate, not model_copy: a task's format must still suit the design it ends up with.
                out.append((task.name, task.weight, DataSection.model_validate(merged)))
            except ValidationError as e:
                at = f"data.tasks.{i}"
                # The section's own checks name `data.<key>`: say which task's key it is.
                raise ValueError(describe_error(e, DataSection, prefix=tuple(at.split(".")))
                                 .replace(f"{at}: data.", f"{at}.", 1)) from None
        return out

    @model_validator(mode="after")
    def _design_fits(self) -> DataSection:
        d = self.design
        if d.label_format == "numeric" and not self.labels:
            raise ValueError("data.design.label_format: numeric writes a label's index in data.labels; set "
                             "data.labels")
        if self.format in ("sharegpt", "messages"):
            changed = [k for k in ("instruction", "aspects") if getattr(d, k) is not None]
            changed += ["reasoning"] if d.reasoning != "none" else []
            if changed:
                raise ValueError(f"data.design.{changed[0]}: applies to single-turn formats "
                                 f"(prompt_response, alpaca), not data.format: {self.format}")
        return self

    @model_validator(mode="after")
    def _one_eval_split(self) -> DataSection:
        if self.eval_path is not None and self.eval_size is not None:
            raise ValueError("data.eval_size: not used with data.eval_path (every row of that file is an eval row); "
                             "remove one of them")
        if self.eval_path is not None and self.eval_path.startswith("hf:"):
            raise ValueError("data.eval_path: a hub id is not read here; save the split with "
                             "datasets' save_to_disk and give that folder")
        return self

    @field_validator("eval_size")
    @classmethod
    def _eval_size(cls, v: int | float | None) -> int | float | None:
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError("a fraction must lie in (0, 1); give an int for a row count")
        if isinstance(v, int) and v < 0:
            raise ValueError("must be >= 0")
        return v


class _TaskKeys(Strict):
    """One task of data.tasks. Its other keys are the per-task data.* keys (TaskSection below): a key given
    here replaces the top-level value whole (design included), a key left out inherits it."""

    name: str = Field(..., description="Task name (a plain word, unique): tags its samples, warnings and stats.")
    weight: float = Field(1.0, gt=0, description="Multiplies the task's row count in the mixture.")

    @field_validator("name")
    @classmethod
    def _plain_word(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", v):
            raise ValueError("must be a plain word (letters, digits, '_' or '-')")
        return v

    @field_validator("path", check_fields=False)
    @classmethod
    def _anchor(cls, v: str | None) -> str | None:
        return _anchor_path(v)

    @model_serializer(mode="wrap")
    def _given_keys_only(self, handler):
        # Unset keys inherit; dumped as nulls they would come back as overrides when workers re-read the config.
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set or k in ("name", "weight")}


TaskSection = create_model(
    "TaskSection", __base__=_TaskKeys, __module__=__name__,
    **{k: (f.annotation, Field(None, description=f.description))
       for k, f in DataSection.model_fields.items() if k not in GLOBAL_DATA_KEYS})
DataSection.model_rebuild()


class TrainSection(Strict):
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; default: epochs over the data.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training split; used when max_steps is not set.")
    global_batch_size: int = Field(8, gt=0, description="Samples per optimizer step, all workers together.")
    micro_batch_size: int = Field(1, gt=0, description="Samples per forward pass per worker.")
    lr: float = Field(2e-5, gt=0, description="AdamW peak learning rate (after warmup_steps).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (never on biases and norms).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps, then cosine decay to lr x min_lr_ratio.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine decays to lr * min_lr_ratio.")
    grad_clip: float | None = Field(1.0, gt=0, description="Global gradient-norm clipping; null disables it "
                                    "(DeepSpeed is told gradient_clipping: 0, since its own default clips at 1.0).")
    log_every: int = Field(1, gt=0, description="Steps between logged metrics (one cross-rank sync per interval).")
    loss_chunk: int | None = Field(
        None, gt=0, description="Causal LMs: run the output head and the loss (CE and KD) over at most this many "
        "trained positions at a time, recomputing each chunk in backward, so [positions x vocab] logits never "
        "exist for more than one chunk (costs one more head matmul). None: all trained positions at once. The head "
        "only ever runs on the positions a loss reads, with or without it.")
    stop_after_steps: int | None = Field(
        None, gt=0, description="End this invocation after N total steps with a checkpoint (schedule still "
        "spans max_steps); run again to continue. For time-boxed allocations.")


class EvalSection(Strict):
    every: int | None = Field(None, gt=0, description="Evaluate every N steps (and always at the end).")
    before_training: bool = Field(True, description="Also evaluate once before the first step.")
    choices: list[str] | None = Field(
        None, description="Candidate responses; enables accuracy = the choice the model scores highest.")
    micro_batch_size: int = Field(8, gt=0, description="Samples per evaluation forward pass per worker.")
    max_answer_tokens: int = Field(30, gt=0, description="model.task question_answering: the longest answer span "
                                   "(in tokens) a prediction may be.")


class CheckpointSection(Strict):
    every: int | None = Field(None, gt=0, description="Checkpoint every N steps (and at the end).")
    keep: int = Field(2, gt=0, description="How many recent checkpoints to keep.")


class DeepSpeedSection(Strict):
    stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage: 0 data parallel; 1 partitions optimizer states; "
                                       "2 also gradients; 3 also parameters.")
    offload_optimizer: bool = Field(False, description="Optimizer states (and, at stage 3, the gradient partition) in "
                                    "host memory; on GPU workers pinned, stepped by DeepSpeedCPUAdam.")
    offload_param: bool = Field(False, description="ZeRO-3 only.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Raw DeepSpeed keys, merged last.")

    @model_validator(mode="after")
    def _offload_param_needs_stage3(self) -> DeepSpeedSection:
        if self.offload_param and self.stage != 3:
            raise ValueError("offload_param needs stage: 3")
        return self


class ClusterSection(Strict):
    num_workers: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        1, description="Training workers (ranks), one GPU each on GPUs. auto: one per GPU where the job runs (this "
        "machine's GPUs for a local run, the Ray cluster's for --address / submit), 2 on CPUs; where the global "
        "batch is not a multiple of micro_batch_size x workers, auto lowers the micro-batch to the largest that "
        "divides it. Recorded resolved in run_dir/config.yaml.")
    use_gpu: bool | Literal["auto"] = Field(
        "auto", description="auto: GPUs if the cluster the job runs on has them (a local run: this machine sees CUDA; "
        "--address / submit / k8s render: the Ray cluster advertises GPU resources). Resolved before any worker "
        "starts, and recorded resolved in run_dir/config.yaml.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs Ray reserves for each training worker.")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts from the last checkpoint (-1: forever).")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement of the workers: PACK fills a node before the next (fewest nodes); SPREAD "
        "prefers distinct nodes; STRICT_PACK one node or nothing; STRICT_SPREAD one worker per node or nothing "
        "(needs --address of a cluster with a node per worker; Ray Train also places an empty coordinator bundle, "
        "so keep one node more than workers).")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for workers.")

    @field_validator("env")
    @classmethod
    def _no_secrets(cls, v: dict[str, str]) -> dict[str, str]:
        # Configs get copied into run folders, W&B and manifests: secrets must never live in them.
        for key in v:
            if looks_secret(key):
                raise ValueError(f"{key} looks like a secret; set it in the environment (on Kubernetes: from a "
                                 f"Secret, see k8s/README.md), not in the config")
        return v


def looks_secret(name: str) -> bool:
    """Whether an environment variable's name says it holds a credential (WANDB_API_KEY, HF_TOKEN, ...)."""
    return any(word in name.upper() for word in ("KEY", "TOKEN", "SECRET", "PASSWORD"))


class WandbSection(Strict):
    mode: Literal["online", "offline", "disabled"] = Field(
        "offline", description="online needs W&B credentials (WANDB_API_KEY in the environment, or `wandb login`); "
        "offline writes run_dir/wandb for `wandb sync`; disabled logs nothing.")
    project: str = Field("distune", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user); your default one when null.")
    tags: list[str] = Field(default_factory=list, description="W&B run tags.")
    group: str | None = Field(None, description="W&B group the run joins (a pipeline's stages share one: by "
                              "default the pipeline file's name).")
    job_type: str | None = Field(None, description="W&B job_type (a pipeline stage's name by default).")


class MethodSection(BaseModel):
    """`name` picks the plugin; the other keys are validated by that plugin's own Config."""

    model_config = ConfigDict(extra="allow")
    name: str = Field("full", description="A registered method (full, lora, ia3, prompt_tuning, p_tuning, "
                      "prefix_tuning, distill, the adapter family, or a plugin's name); the other method keys are "
                      "its own (see Methods below).")


class RunConfig(Strict):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection
    method: MethodSection = Field(default_factory=MethodSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    wandb: WandbSection = Field(default_factory=WandbSection)

    def method_config(self) -> BaseModel:
        """The plugin's typed config (validated when the RunConfig was loaded)."""
        from distune.methods import get_method

        plugin = get_method(self.method.name)
        return plugin.Config(**(self.method.model_extra or {}))

    @property
    def run_location(self) -> str:
        """The run directory where its durable files go: a local path, or a URI under an object-store output_dir."""
        from distune.storage import join

        return join(self.run.output_dir, self.run.name)

    def store(self):
        """The run directory as a distune.storage.RunStore (local or object storage)."""
        from distune.storage import RunStore

        return RunStore(self.run_location)

    @property
    def run_dir(self) -> Path:
        """A local folder for the run: the run directory itself, or, when output_dir is an object store, this
        machine's working folder for the run (W&B's files, evaluation outputs)."""
        from distune.storage import is_uri

        if is_uri(self.run.output_dir):
            import hashlib

            from distune.paths import cache_root

            key = hashlib.sha256(self.run.output_dir.encode()).hexdigest()[:12]
            return cache_root() / "runs" / key / self.run.name
        return Path(self.run.output_dir) / self.run.name

    @model_validator(mode="after")
    def _partitioned_load(self) -> RunConfig:
        if self.model.load == "partitioned" and self.deepspeed.stage != 3:
            raise ValueError(f"model.load: partitioned needs deepspeed.stage: 3 (stage is {self.deepspeed.stage}); "
                             "below stage 3 every rank holds the whole model anyway")
        if self.model.load == "partitioned" and self.model.quantization:
            raise ValueError("model.load: partitioned does not apply to a quantized base (model.quantization)")
        return self

    def loads_partitioned(self) -> bool:
        """Whether the student is built partitioned across the ranks (model.load, resolved)."""
        if self.model.load == "auto":
            return self.deepspeed.stage == 3 and not self.model.quantization
        return self.model.load == "partitioned"

    def grad_accum_steps(self) -> int:
        per_step = self.train.micro_batch_size * self.cluster.num_workers
        if self.train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"train.micro_batch_size x cluster.num_workers = {self.train.micro_batch_size} x "
                f"{self.cluster.num_workers} = {per_step}")
        return self.train.global_batch_size // per_step


# ---------------------------------------------------------------------------------------------- loading


def load_config(source: str | Path | dict, overrides: list[str] = (), resolve: bool = True,
                base_dir: Path | None = None) -> RunConfig:
    """Read YAML (or a dict), merge its `base:` files under it, apply `a.b.c=value` overrides, validate; raise
    ConfigError on any problem. `resolve`: turn `use_gpu: auto` / `dtype: auto` into this machine's choice (off
    where the config runs elsewhere: `--address`, submit and k8s render resolve them from the cluster).
    `base_dir`: where a dict's `base:` names are found (a file's are beside it)."""
    if isinstance(source, dict):
        raw, where = with_bases(source, Path(base_dir or "."), "config"), "config"
    else:
        path = Path(source)
        raw, where = with_bases(read_yaml(path), path.parent, str(path), (path.resolve(),)), str(path)
    raw = apply_overrides(raw, overrides)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{where}: {describe_error(e, RunConfig)}") from None
    _validate_method(cfg, where)
    if resolve:
        resolve_for_hardware(cfg)
    return cfg


def read_yaml(path: Path) -> dict:
    """A config file's top-level mapping; ConfigError naming the file (and line) otherwise."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{at}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:
        raise ConfigError(f"{path}: the file is empty (a config needs at least model.path and data.path)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def with_bases(raw: dict, here: Path, where: str, chain: tuple[Path, ...] = ()) -> dict:
    """`raw` over the files its `base:` names (one, or a list merged in order; each may have bases of its own;
    names are relative to `here`, the including file's folder). Mappings merge key by key and the including side
    wins; lists and scalars are replaced whole; a section whose `name` differs from its base's (another method)
    replaces the base's section."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections")
    raw = dict(raw)
    names = raw.pop("base", None)
    if names is None:
        return raw
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{where}: base: expected a config file name or a list of them, got {names!r}")
    merged: dict = {}
    for name in names:
        path = (here / Path(name).expanduser()).resolve()
        if path in chain:
            loop = " -> ".join(str(p) for p in chain + (path,))
            raise ConfigError(f"{where}: base: {name} includes itself ({loop})")
        if not path.is_file():
            raise ConfigError(f"{where}: base: {name}: file not found ({path})")
        merged = merge(merged, with_bases(read_yaml(path), path.parent, str(path), chain + (path,)))
    return merge(merged, raw)


def merge(base: dict, over: dict) -> dict:
    """`over` merged onto `base` (see with_bases)."""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict) and old.get("name", value.get("name")) == value.get(
                "name", old.get("name")):
            out[key] = merge(old, value)
        else:
            out[key] = value
    return out


def resolve_for_hardware(cfg: RunConfig, seen=None, gpu: bool | None = None, gpus: int | None = None) -> None:
    """`cluster.use_gpu: auto`, `cluster.num_workers: auto` and `dtype: auto` (the student's and a teacher's) ->
    concrete values for the hardware the workers use, once: the workers get the resolved config, so every rank
    agrees.

    `gpu`, `gpus` (how many) and `seen` (hardware.Facts from a worker's machine) come from the cluster for a run on
    one (distune.cluster.target); by default this machine decides, right for a local run, where it is the cluster."""
    from distune.hardware import auto_dtype, gpu_count, uses_gpu

    if cfg.cluster.use_gpu == "auto":
        cfg.cluster.use_gpu = uses_gpu("auto") if gpu is None else gpu
    if cfg.cluster.num_workers == "auto":
        n = (gpu_count() if gpus is None else gpus) if cfg.cluster.use_gpu else CPU_WORKERS
        fit_workers(cfg, max(1, n))
    teacher = getattr(cfg.method_config(), "teacher", None)
    if cfg.model.dtype != "auto" and getattr(teacher, "dtype", None) != "auto":
        return
    resolved = auto_dtype(cfg.cluster.use_gpu, seen)
    if cfg.model.dtype == "auto":
        cfg.model.dtype = resolved
    if getattr(teacher, "dtype", None) == "auto":
        cfg.method.model_extra["teacher"] = {**cfg.method.model_extra["teacher"], "dtype": resolved}


CPU_WORKERS = 2  # `num_workers: auto` on CPUs: two ranks show every distributed path (ZeRO partitions, all-reduce)


def fit_workers(cfg: RunConfig, n: int) -> None:
    """`n` workers (at most one per row of the global batch), and the largest micro-batch up to the configured one
    that splits the global batch evenly over them."""
    t = cfg.train
    n = min(n, t.global_batch_size)
    micro = min(t.micro_batch_size, t.global_batch_size // n)
    while t.global_batch_size % (micro * n):
        micro -= 1
    cfg.cluster.num_workers, t.micro_batch_size = n, micro


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: PyYAML would silently keep
    the last one, and a second `train:` section would quietly drop the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}, first given on line {seen[key] + 1}", key_node.start_mark)
                seen[key] = key_node.start_mark.line
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                pass
        return super().construct_mapping(node, deep)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`train.lr=1e-4` sets raw['train']['lr'] = 1e-4; values are parsed as YAML (numbers, lists, bools)."""
    import copy

    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected key.path=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.load(value, Loader=UniqueKeyLoader) if value != "" else ""
        except yaml.YAMLError:
            node[parts[-1]] = value
    return raw


def _validate_method(cfg: RunConfig, where: str) -> None:
    from distune.methods import get_method, known_methods

    try:
        plugin = get_method(cfg.method.name)
    except KeyError:
        names = known_methods()
        close = difflib.get_close_matches(cfg.method.name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: method.name: unknown method {cfg.method.name!r}{hint}; "
                          f"known: {', '.join(names)}") from None
    try:
        options = plugin.Config(**(cfg.method.model_extra or {}))
    except ValidationError as e:
        raise ConfigError(f"{where}: {describe_error(e, plugin.Config, prefix=('method',))}") from None
    # Keep the plugin's normalised values (absolute local paths, filled defaults): the config is dumped and
    # re-read by Ray workers, which run in another working directory.
    cfg.method = MethodSection(name=cfg.method.name, **options.model_dump(mode="json"))


# Names other frameworks use for our keys: spelling is not the only way to miss a key.
_SYNONYMS = {
    "learning_rate": "lr", "batch_size": "global_batch_size", "train_batch_size": "global_batch_size",
    "per_device_train_batch_size": "micro_batch_size", "gradient_accumulation_steps": "global_batch_size",
    "num_train_epochs": "epochs", "num_epochs": "epochs", "steps": "max_steps", "zero_stage": "stage",
    "num_gpus": "num_workers", "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "max_seq_length": "max_length", "seq_len": "max_length", "warmup": "warmup_steps",
    "max_grad_norm": "grad_clip", "gradient_clipping": "grad_clip", "init": "layers", "teacher_layers": "layers",
    "alpha_kd": "kd_weight", "kd_alpha": "kd_weight", "kd_ratio": "kd_weight", "distillation_weight": "kd_weight",
    "loss_type": "divergence", "kd_temperature": "temperature", "teacher_model": "teacher", "student_method": "student",
}


def closest_key(key: str, valid: list[str]) -> str | None:
    if _SYNONYMS.get(key) in valid:
        return _SYNONYMS[key]
    close = difflib.get_close_matches(key, valid, n=1)
    return close[0] if close else None


def describe_error(err: ValidationError, root: type[BaseModel], prefix: tuple = ()) -> str:
    """First error as one line: `train.lr: Input should be greater than 0 (got -1)`."""
    first = err.errors()[0]
    loc = tuple(str(p) for p in first["loc"])
    # Union members show up as extra loc entries ("int", "float"); keep only real field names.
    loc = _field_path(root, loc)
    path = ".".join(prefix + loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        parent = _model_at(root, loc[:-1])
        valid = sorted(parent.model_fields) if parent else []
        close = closest_key(loc[-1], valid)
        hint = f"did you mean {'.'.join(prefix + loc[:-1] + (close,))!r}? " if close else ""
        return f"{path}: unknown key; {hint}valid keys here: {', '.join(valid)}"
    if first["type"] == "missing":
        return f"{path}: required key is missing"
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    if isinstance(got, bool) and first["type"] == "string_type":
        # YAML 1.1 reads unquoted yes/no/on/off as booleans: `choices: [yes, no]` is [True, False].
        shown = f" (got {got!r}: YAML reads unquoted yes/no/on/off/true/false as booleans; quote the value)"
    msg = first["msg"].removeprefix("Value error, ")
    if msg.startswith(path + ".") or not (loc or prefix):  # the message names its keys (a plugin, a cross-section check)
        return msg
    return f"{path}: {msg}{shown}"


def _field_path(root: type[BaseModel], loc: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    model: type[BaseModel] | None = root
    for part in loc:
        if model is not None and part in model.model_fields:
            out.append(part)
            ann = model.model_fields[part].annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        elif model is not None and not model.model_fields.get(part) and (model.model_config.get("extra") == "forbid"):
            out.append(part)  # an unknown key: keep it so the message names it
            model = None
        elif model is None and part.isdigit():
            out.append(part)  # list index
    return tuple(out)


def _model_at(root: type[BaseModel], loc: tuple[str, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = root
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def dump_config(cfg: RunConfig) -> dict:
    """Plain dict of the resolved config (for W&B and the run directory). Holds no secrets by construction:
    keys are read from the environment, never from the config."""
    return cfg.model_dump(mode="json")
