"""The `model:` section: which weights, in what precision, with which head (model.task) and how they are loaded.

Imports only distune.config.strict.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from distune.config.strict import Strict


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
    task: str = Field(
        "causal_lm", description="What the head predicts: a task registered in distune/tasks/ (or by a package in the "
        "`distune.tasks` entry-point group). Any method trains it; encoders such as BERT/MiniLM or "
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

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        from distune.tasks import TASKS

        return TASKS.check(v)

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: int | list[int] | None) -> int | list[int] | None:
        if isinstance(v, int) and v <= 0:
            raise ValueError("every k-th layer needs k >= 1")
        if isinstance(v, list) and (not v or sorted(set(v)) != v or v[0] < 0):
            raise ValueError("must be a non-empty increasing list of block indices")
        return v
