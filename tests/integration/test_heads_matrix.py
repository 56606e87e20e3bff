"""Task heads x methods x ZeRO stages on real Ray, on the encoder (BERT) and the decoder (Llama).

Pairwise cover of head x method x stage x model in 8 cells (every pair of values meets at least once; the full
product is 16 cells at ~20 s each on 2 cores): each trains a few steps, and its export, loaded the Hugging Face
way, scores what the trained model scored."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer

import tiny
from distune.training import fit
from distune.config import load_config
from distune.data import load_splits
from distune.evaluation import evaluate
from distune.models import head_class, load_model

_slow = pytest.mark.slow  # ~27 s a cell: the default run keeps one cell per head, both with 2 workers
CELLS = [  # head, method, stage, model, workers
    ("token_classification", "full", 2, "encoder", 2),
    pytest.param("token_classification", "full", 3, "decoder", 1, marks=_slow),
    pytest.param("token_classification", "lora", 2, "decoder", 1, marks=_slow),
    pytest.param("token_classification", "lora", 3, "encoder", 1, marks=_slow),
    pytest.param("question_answering", "full", 2, "decoder", 1, marks=_slow),
    pytest.param("question_answering", "full", 3, "encoder", 1, marks=_slow),
    pytest.param("question_answering", "lora", 2, "encoder", 1, marks=_slow),
    ("question_answering", "lora", 3, "decoder", 2),
]
SCORE = {"token_classification": "eval/entity_f1", "question_answering": "eval/f1"}


@pytest.fixture(scope="module")
def head_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("heads")
    return {"token_classification": tiny.write_jsonl(folder / "ner.jsonl", tiny.ner_rows(48)),
            "question_answering": tiny.write_jsonl(folder / "qa.jsonl", tiny.qa_rows(48))}


@pytest.mark.parametrize("head, method, stage, kind, workers", CELLS,
                         ids=[f"{h[:3]}-{m}-z{s}-{k[:3]}-w{w}" for h, m, s, k, w in
                              (c.values if hasattr(c, "values") else c for c in CELLS)])
def test_head_x_method_x_stage(ray_cluster, world_of_one, tiny_model, tiny_encoder, head_data, tmp_path,
                               head, method, stage, kind, workers):
    model_dir = tiny_encoder if kind == "encoder" else tiny_model
    columns = {"tokens": "words", "tags": "ner"} if head == "token_classification" else {}
    cfg = load_config(tiny.base_config(
        model_dir, head_data[head], tmp_path, model={"task": head}, method={"name": method},
        data={"columns": columns}, deepspeed={"stage": stage}, cluster={"num_workers": workers},
        train={"max_steps": 3, "lr": 5e-3}, eval={"before_training": True}))
    fit(cfg, str(model_dir), show_progress=False)

    results = json.loads((cfg.run_dir / "results.json").read_text())
    assert results["step"] == 3
    assert results["after"]["eval/loss"] < results["before"]["eval/loss"]
    assert SCORE[head] in results["after"]

    export = cfg.run_dir / "export"
    tok = AutoTokenizer.from_pretrained(export)
    splits = load_splits(cfg.data, tok, cfg.run.seed, task=head)
    labels = {"num_labels": len(splits.labels)} if splits.labels else {}
    if method == "full":
        trained = head_class(head).from_pretrained(export)
    else:
        assert json.loads((export / "adapter_config.json").read_text())["modules_to_save"]  # the new head
        if head == "question_answering" and kind == "decoder":
            # LlamaForQuestionAnswering names its base `transformer`: a plain from_pretrained of the Llama
            # checkpoint would leave it random; load_model maps the checkpoint's `model.*` weights onto it.
            base = load_model(str(model_dir), task=head)
        else:
            base = head_class(head).from_pretrained(model_dir, **labels)
        trained = PeftModel.from_pretrained(base, export)
    again = evaluate(trained.eval(), splits.eval, 4, tok.pad_token_id, torch.device("cpu"), 0, 1,
                     labels=splits.labels)
    assert again["eval/loss"] == pytest.approx(results["after"]["eval/loss"], rel=1e-4)
    assert again[SCORE[head]] == pytest.approx(results["after"][SCORE[head]], abs=1e-6)
