"""ZeRO 0/1/2/3 x {full, lora} through Ray on 2 CPU workers: trains, evaluates, exports loadable artifacts."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from distune.training import fit


# Stages 0 and 1 are `slow`: 2 and 3 (sharded gradients / sharded weights) are where exports and checkpoints can
# go wrong, and the default run must stay near 20 minutes on 2 cores.
@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.slow), pytest.param(1, marks=pytest.mark.slow),
                                   pytest.param(2, marks=pytest.mark.slow), 3])  # ZeRO-2: the heads matrix
@pytest.mark.parametrize("method", ["full", pytest.param("lora", marks=pytest.mark.slow)])  # LoRA at ZeRO-3:
# the default run has it in the offload cell below
def test_zero_stage_x_method(ray_cluster, make_config, tiny_model, stage, method):
    lr = 3e-3 if method == "full" else 3e-2
    cfg = make_config(method={"name": method}, deepspeed={"stage": stage}, cluster={"num_workers": 2},
                      train={"max_steps": 6, "lr": lr}, eval={"before_training": True, "choices": ["positive", "negative"]})
    fit(cfg, str(tiny_model), show_progress=False)

    results = json.loads((cfg.run_dir / "results.json").read_text())
    assert results["step"] == 6
    assert results["after"]["eval/loss"] < results["before"]["eval/loss"]
    export = cfg.run_dir / "export"
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    if method == "full":
        trained = AutoModelForCausalLM.from_pretrained(export)
        changed = [n for n, p in trained.named_parameters()
                   if not torch.equal(p, base.get_parameter(n))]
        assert len(changed) == len(list(base.parameters()))  # every weight trained and was exported
    else:
        adapter = load_file(export / "adapter_model.safetensors")
        assert adapter and all(t.numel() > 0 for t in adapter.values())  # never the empty-adapter bug
        lora_b = [t for k, t in adapter.items() if "lora_B" in k]
        assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: non-zero means trained
        merged = PeftModel.from_pretrained(base, export)
        ids = torch.tensor([[5, 6, 7, 8]])
        assert not torch.allclose(merged(ids).logits, AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits)


@pytest.mark.parametrize("variant", [
    pytest.param({"method": {"name": "full"}, "deepspeed": {"stage": 2, "offload_optimizer": True}},
                 marks=pytest.mark.slow),
    {"method": {"name": "lora"}, "deepspeed": {"stage": 3, "offload_optimizer": True, "offload_param": True},
     "model": {"dtype": "bf16"}},
    pytest.param({"method": {"name": "lora", "use_dora": True}, "deepspeed": {"stage": 2},
                  "model": {"gradient_checkpointing": True}, "train": {"global_batch_size": 8}},
                 marks=pytest.mark.slow),  # 33 s; accumulation is in the default run via the multi-adapter test
], ids=["full-z2-offload", "lora-z3-offload-bf16", "dora-z2-gradckpt-accum2"])
def test_offload_bf16_checkpointing_accumulation(ray_cluster, make_config, tiny_model, variant):
    sections = {"cluster": {"num_workers": 2}, "train": {"max_steps": 4, "lr": 1e-2},
                "eval": {"before_training": True}}
    for key, value in variant.items():
        sections[key] = {**sections.get(key, {}), **value}
    cfg = make_config(**sections)
    fit(cfg, str(tiny_model), show_progress=False)
    results = json.loads((cfg.run_dir / "results.json").read_text())
    assert results["step"] == 4 and results["after"]["eval/loss"] < results["before"]["eval/loss"]
    assert any((cfg.run_dir / "export").glob("*.safetensors"))
