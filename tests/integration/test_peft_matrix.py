"""PEFT method x ZeRO stage through Ray: trains, exports an adapter that PeftModel.from_pretrained loads and
that scores exactly like the trained model (under ZeRO-3 too, where the live weights are partitioned);
prompt learning resumes exactly and works as a distillation student."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import wandb_records
from distune.cluster.trainer import fit
from distune.data import load_splits
from distune.evaluation import evaluate
from distune.models import load_model, load_tokenizer

METHODS = {
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": 4, "init": "text", "init_text": "Sentiment"},
    "p_tuning": {"name": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 32},
    "prefix_tuning": {"name": "prefix_tuning", "num_virtual_tokens": 4, "projection": True,
                      "encoder_hidden_size": 32},
    "ia3": {"name": "ia3"},
    "lora_plus_rslora": {"name": "lora", "use_rslora": True, "lr_ratio": 8.0},
}
CELLS = [(m, s) for m in METHODS for s in (2, 3) if not (m == "lora_plus_rslora" and s == 2)]  # LoRA: z2 elsewhere


def _eval_export(cfg, export, world_of_one):
    """The exported artifact's eval loss, computed here in one process through distune's own loader."""
    tok = load_tokenizer(str(export))
    splits = load_splits(cfg.data, tok, cfg.run.seed, None, cfg.model.task)
    model = load_model(str(export))
    return evaluate(model, splits.eval, cfg.eval.micro_batch_size, tok.pad_token_id, torch.device("cpu"), 0, 1)


@pytest.mark.parametrize(("method", "stage"), CELLS, ids=[f"{m}-z{s}" for m, s in CELLS])
def test_peft_method_x_zero_stage(ray_cluster, world_of_one, make_config, tiny_model, method, stage):
    cfg = make_config(method=METHODS[method], deepspeed={"stage": stage}, cluster={"num_workers": 2},
                      train={"max_steps": 4, "lr": 3e-2}, eval={"before_training": True})
    fit(cfg, str(tiny_model), show_progress=False)
    results = json.loads((cfg.run_dir / "results.json").read_text())
    assert results["step"] == 4
    assert results["after"]["eval/loss"] < results["before"]["eval/loss"]

    export = cfg.run_dir / "export"
    tensors = load_file(export / "adapter_model.safetensors")
    assert tensors and all(t.numel() > 0 and t.abs().sum() > 0 for t in tensors.values())  # gathered, not empty
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), export)  # loads as PEFT does
    # The artifact is the trained model: same held-out loss as the workers measured at the end.
    assert _eval_export(cfg, export, world_of_one)["eval/loss"] == pytest.approx(results["after"]["eval/loss"],
                                                                                 rel=1e-4)


def test_prompt_learning_resumes_exactly_under_zero3(ray_cluster, make_config, tiny_model):
    def cfg(name, extra=()):
        return make_config(list(extra), run={"name": name}, method=METHODS["p_tuning"] | {"encoder_dropout": 0.1},
                           deepspeed={"stage": 3}, cluster={"num_workers": 2}, checkpoint={"every": 2},
                           train={"max_steps": 4, "lr": 3e-2, "warmup_steps": 1})

    straight = cfg("straight")
    fit(straight, str(tiny_model), show_progress=False)
    fit(cfg("resumed", ["train.stop_after_steps=2"]), str(tiny_model), show_progress=False)
    resumed = cfg("resumed")
    fit(resumed, str(tiny_model), show_progress=False)
    a = load_file(straight.run_dir / "export" / "adapter_model.safetensors")
    b = load_file(resumed.run_dir / "export" / "adapter_model.safetensors")
    assert a.keys() == b.keys() == {"prompt_embeddings"}
    assert (a["prompt_embeddings"] - b["prompt_embeddings"]).abs().max() < 1e-6


def test_prompt_tuned_student_distils_from_an_online_teacher(ray_cluster, make_config, tiny_model, tiny_teacher):
    """Also on-policy (GKD): PEFT's generate with virtual tokens, synced across the ZeRO-3 ranks."""
    cfg = make_config(method={"name": "distill", "student": METHODS["prompt_tuning"], "kd_weight": 1.0,
                              "teacher": {"path": str(tiny_teacher), "dtype": "fp32"}, "temperature": 2.0,
                              "gkd": {"lmbda": 0.5, "max_new_tokens": 4}},
                      deepspeed={"stage": 3}, cluster={"num_workers": 2}, train={"max_steps": 6, "lr": 5e-2},
                      wandb={"mode": "offline"})
    fit(cfg, str(tiny_model), show_progress=False)
    assert json.loads((cfg.run_dir / "results.json").read_text())["step"] == 6
    kd = [row["train/kd"] for row in wandb_records.logged(cfg.run_dir)["history"] if "train/kd" in row]
    assert len(kd) == 6 and kd[-1] < kd[0]  # the virtual tokens moved the student towards the teacher
    assert set(load_file(cfg.run_dir / "export" / "adapter_model.safetensors")) == {"prompt_embeddings"}
