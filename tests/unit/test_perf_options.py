"""The speed options change the speed, not the result: a run with train.loss_chunk, model.compile (torch.compile
through DeepSpeed) or another attention kernel ends with the weights of the plain run."""

import os

import pytest
import torch

import tiny
from distune.config import load_config
from distune.reporting import LocalReporter


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(next((run_dir / "export").glob("*.safetensors")))


def train(tmp_path, name, tiny_model, tiny_data, **changes):
    from distune.worker import run

    sections = {"run": {"name": name}, "train": {"max_steps": 3, "global_batch_size": 4, "micro_batch_size": 2,
                                                 "lr": 1e-3, "log_every": 1}, "checkpoint": {"every": None}}
    for key, value in changes.items():
        section, field = key.split("__")
        sections.setdefault(section, {})[field] = value
    cfg = load_config(tiny.base_config(tiny_model, tiny_data, tmp_path, **sections))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    run(cfg, LocalReporter(cfg.run_dir, 1, 0, show_progress=False))
    return final_weights(cfg.run_dir)


@pytest.fixture(scope="module")
def plain(world_of_one, tiny_model, tiny_data, tmp_path_factory):
    return train(tmp_path_factory.mktemp("plain"), "plain", tiny_model, tiny_data)


@pytest.mark.parametrize("changes", [{"train__loss_chunk": 3}, {"model__attn_implementation": "eager"},
                                     pytest.param({"model__compile": True}, marks=pytest.mark.slow)],
                         ids=["loss_chunk", "eager", "compile"])  # compile: 65 s of dynamo tracing
def test_speed_options_keep_the_weights(world_of_one, plain, tiny_model, tiny_data, tmp_path, changes):
    from torch._dynamo.utils import counters

    counters.clear()
    got = train(tmp_path, "opt", tiny_model, tiny_data, **changes)
    if changes.get("model__compile"):  # dynamo really traced the model (no silent eager fallback)
        assert counters["stats"]["unique_graphs"] > 0, dict(counters["stats"])
    assert got.keys() == plain.keys()
    worst = max((got[k].float() - plain[k].float()).abs().max().item() for k in plain)
    assert worst < 1e-5, f"{changes}: largest weight difference {worst:.2e}"


def test_steps_run_in_training_mode_and_checkpoint_their_blocks(world_of_one, tiny_model, tiny_data, tmp_path):
    """from_pretrained hands back a model in eval mode. The loop trains in training mode (dropout acts) and, with
    gradient checkpointing, each block runs twice per micro-batch: forward, then again in backward (transformers
    checkpoints only in training mode: an eval-mode run stored every activation)."""
    from torch.nn.modules.module import register_module_forward_pre_hook
    from transformers.models.llama import modeling_llama

    calls, first = [], []

    def watch(module, args):  # every module call, recomputes included (transformers checkpoints `forward`)
        if isinstance(module, modeling_llama.LlamaMLP):
            first[:] = first or [module]  # block 0's
            if module is first[0]:
                calls.append(module.training)

    handle = register_module_forward_pre_hook(watch)
    # 2 steps x 2 micro-batches of 2 (one rank, global batch 4), then the final evaluation in eval mode.
    try:
        train(tmp_path, "gc", tiny_model, tiny_data, model__gradient_checkpointing=True, train__max_steps=2)
    finally:
        handle.remove()
    assert calls[:8] == [True] * 8, calls  # 4 micro-batches x (forward + recompute)
    assert sum(calls) == 8 and not any(calls[8:]), calls
