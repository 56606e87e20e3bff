"""model.task: sequence_classification — label map from the data, class rows, collation, eval, a real run."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import tiny
from distune.config import DataSection, load_config
from distune.tasks.sequence_classification import ClassSample
from distune.data import DataError, collate, load_splits
from distune.evaluation import evaluate


@pytest.fixture(scope="module")
def enc_tok(tiny_encoder):
    return AutoTokenizer.from_pretrained(tiny_encoder)


def _data_cfg(path, **kw):
    return DataSection(**{"path": str(path), "prompt": "{text}", "response": "{label}", "eval_size": 8, **kw})


def test_labels_come_from_the_whole_file_sorted(enc_tok, tiny_data):
    splits = load_splits(_data_cfg(tiny_data, limit=20), enc_tok, 0, task="sequence_classification")
    assert splits.labels == ["negative", "positive"]
    s = splits.train[0]
    assert isinstance(s, ClassSample) and splits.labels[s.label] == s.response  # no token labels: its own type
    assert s.input_ids[0] == enc_tok.cls_token_id and s.input_ids[-1] == enc_tok.sep_token_id  # no chat template


def test_a_class_outside_data_labels_names_the_line(enc_tok, tmp_path):
    rows = tiny.sentiment_rows(10)
    rows[6]["label"] = "neutral"
    path = tiny.write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"line 7: class 'neutral' is not one of data.labels"):
        load_splits(_data_cfg(path, labels=["negative", "positive"], eval_size=2), enc_tok, 0,
                    task="sequence_classification")


def test_collate_gives_one_class_per_sample(enc_tok, tiny_data):
    splits = load_splits(_data_cfg(tiny_data), enc_tok, 0, task="sequence_classification")
    batch = collate(splits.train[:3], enc_tok.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "class_labels"}
    assert batch["class_labels"].tolist() == [s.label for s in splits.train[:3]]
    assert batch["attention_mask"].sum(1).tolist() == [len(s.input_ids) for s in splits.train[:3]]


def test_classifier_eval_matches_hand_computation(world_of_one, enc_tok, tiny_encoder, tiny_data):
    splits = load_splits(_data_cfg(tiny_data), enc_tok, 0, task="sequence_classification")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_encoder, num_labels=2).eval()
    got = evaluate(model, splits.eval, 3, enc_tok.pad_token_id, torch.device("cpu"), 0, 1)
    losses, correct = [], []
    with torch.no_grad():
        for s in splits.eval:
            logits = model(input_ids=torch.tensor([s.input_ids])).logits[0]
            losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor(s.label)).item())
            correct.append(float(logits.argmax().item() == s.label))
    assert got["eval/loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert got["eval/accuracy"] == pytest.approx(sum(correct) / len(correct))


def test_lora_classifier_trains_and_exports_head_and_adapters(world_of_one, tiny_encoder, tiny_data, tmp_path):
    import os

    from distune.reporting import LocalReporter
    from distune.worker import run

    cfg = load_config(tiny.base_config(tiny_encoder, tiny_data, tmp_path, model={"task": "sequence_classification"},
                                       method={"name": "lora", "r": 4}, train={"max_steps": 40, "lr": 1e-2},
                                       eval={"before_training": True}))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    results = run(cfg, LocalReporter(cfg.run_dir, 1, 0, show_progress=False))
    assert results["after"]["eval/loss"] < results["before"]["eval/loss"]
    export = cfg.run_dir / "export"
    adapter_cfg = json.loads((export / "adapter_config.json").read_text())
    assert adapter_cfg["task_type"] == "SEQ_CLS" and "classifier" in adapter_cfg["modules_to_save"]
    # The export alone (adapters + the trained head) reproduces the final evaluation.
    base = AutoModelForSequenceClassification.from_pretrained(tiny_encoder, num_labels=2)
    trained = PeftModel.from_pretrained(base, export).eval()
    tok = AutoTokenizer.from_pretrained(export)
    splits = load_splits(cfg.data, tok, cfg.run.seed, task="sequence_classification")
    again = evaluate(trained, splits.eval, 4, tok.pad_token_id, torch.device("cpu"), 0, 1)
    assert again["eval/loss"] == pytest.approx(results["after"]["eval/loss"], rel=1e-4)
