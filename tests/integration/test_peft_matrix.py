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
from distune.training import fit
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
# Every cell is `slow` (~30-40 s each) to keep the default run short, except prefix tuning at ZeRO-3 (the hardest
# prompt-learning case: past key values under partitioned weights). IA3 and P-tuning run by default in the task-head
# cells below; LoRA+'s optimizer groups and rsLoRA are unit-tested in tests/unit/test_peft_methods.py.
DEFAULT_CELLS = {("prefix_tuning", 3)}
CELLS = [pytest.param(m, s, marks=[] if (m, s) in DEFAULT_CELLS else [pytest.mark.slow], id=f"{m}-z{s}")
         for m in METHODS for s in (2, 3) if not (m == "lora_plus_rslora" and s == 2)]


def _eval_export(cfg, export, world_of_one):
    """The exported artifact's eval loss, computed here in one process through distune's own loader."""
    tok = load_tokenizer(str(export))
    splits = load_splits(cfg.data, tok, cfg.run.seed, None, cfg.model.task)
    model = load_model(str(export))
    return evaluate(model, splits.eval, cfg.eval.micro_batch_size, tok.pad_token_id, torch.device("cpu"), 0, 1)


@pytest.mark.parametrize(("method", "stage"), CELLS)
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


@pytest.mark.slow  # 60 s; resume exactness is in the default run through tests/integration/test_resume.py
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


@pytest.mark.slow  # 31 s; distillation through Ray is in the default run via test_distill_on_ray.py
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


HEAD_CELLS = [  # method, head, model, stage
    ("p_tuning", "token_classification", "encoder", 3),
    pytest.param("prefix_tuning", "question_answering", "decoder", 2, marks=pytest.mark.slow),
    ("ia3", "sequence_classification", "decoder", 3),
    pytest.param("prompt_tuning", "sequence_classification", "encoder", 2, marks=pytest.mark.slow),
]
HEAD_LR = {"ia3": 5e-3}  # the new head trains in full next to the scales: 2e-2 overshoots it
HEAD_SCORE = {"token_classification": "eval/entity_f1", "question_answering": "eval/f1",
              "sequence_classification": "eval/accuracy"}


@pytest.mark.parametrize(("method", "head", "kind", "stage"), HEAD_CELLS,
                         ids=[f"{m}-{h[:3]}-{k[:3]}-z{s}" for m, h, k, s in
                              (c.values if hasattr(c, "values") else c for c in HEAD_CELLS)])
def test_peft_method_x_task_head(ray_cluster, world_of_one, tiny_model, tiny_encoder, tiny_data, tmp_path,
                                 method, head, kind, stage):
    """The heads' own matrix (test_heads_matrix.py) covers full and LoRA; these cells put the other PEFT methods on
    every head, so prompt learning's virtual tokens meet tag, span and class outputs under Ray."""
    import tiny
    from distune.config import load_config
    from distune.models import align_virtual_tokens

    model_dir = tiny_encoder if kind == "encoder" else tiny_model
    data = {"token_classification": lambda: tiny.write_jsonl(tmp_path / "ner.jsonl", tiny.ner_rows(48)),
            "question_answering": lambda: tiny.write_jsonl(tmp_path / "qa.jsonl", tiny.qa_rows(48)),
            "sequence_classification": lambda: tiny_data}[head]()
    columns = {"tokens": "words", "tags": "ner"} if head == "token_classification" else {}
    options = {k: v for k, v in METHODS[method].items() if k not in ("init", "init_text")}
    steps = 3
    cfg = load_config(tiny.base_config(
        model_dir, data, tmp_path / "runs", model={"task": head}, method=options, data={"columns": columns,
        **({"prompt": "{text}"} if head == "sequence_classification" else {})}, deepspeed={"stage": stage},
        cluster={"num_workers": 2}, train={"max_steps": steps, "lr": HEAD_LR.get(method, 2e-2)},
        eval={"before_training": True}))
    fit(cfg, str(model_dir), show_progress=False)
    results = json.loads((cfg.run_dir / "results.json").read_text())
    assert results["step"] == steps and results["after"]["eval/loss"] != results["before"]["eval/loss"]
    if head != "sequence_classification":  # a fresh 2-class head on 8 held-out rows is noise over 3 steps
        assert results["after"]["eval/loss"] < results["before"]["eval/loss"]

    export = cfg.run_dir / "export"
    tok = load_tokenizer(str(export))
    splits = load_splits(cfg.data, tok, cfg.run.seed, task=head)
    base = load_model(str(model_dir), labels=splits.labels, task=head, pad_token_id=tok.pad_token_id)
    trained = PeftModel.from_pretrained(base, export)
    trained = align_virtual_tokens(trained) if trained.active_peft_config.is_prompt_learning else trained
    again = evaluate(trained.eval(), splits.eval, 4, tok.pad_token_id, torch.device("cpu"), 0, 1, labels=splits.labels)
    assert again["eval/loss"] == pytest.approx(results["after"]["eval/loss"], rel=1e-4)
    assert again[HEAD_SCORE[head]] == pytest.approx(results["after"][HEAD_SCORE[head]], abs=1e-6)
