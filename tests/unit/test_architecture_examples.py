"""The ten-line examples of docs/architecture.md (a method, a task, a teacher signal) register and work: run as
written, then trained for a step or scored on the tiny model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny
from distune.config import DataSection
from distune.data import collate, load_splits
from distune.methods import build_method, get_method
from distune.methods.base import METHODS
from distune.models import load_model, load_tokenizer
from distune.signals import get_signal, kd_positions
from distune.signals.base import SIGNALS
from distune.tasks import get_task
from distune.tasks.base import TASKS

PAGE = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


@pytest.fixture(scope="module")
def examples():
    """The page's three python blocks, executed; their registrations undone afterwards (the same names belong to
    the throwaway plugins other tests install)."""
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
    assert len(blocks) == 3, "the page shows one method, one task and one signal"
    before = (dict(METHODS.entries), dict(TASKS.entries), dict(SIGNALS.entries))
    for registry, name in ((METHODS, "norm_tuning"), (TASKS, "score_regression"), (SIGNALS, "smoothed_gold")):
        registry.entries.pop(name, None)  # a throwaway plugin of that name, loaded by an earlier test
    for block in blocks:
        exec(compile(block, str(PAGE), "exec", dont_inherit=True), {"__name__": "architecture_example"})
    yield
    for registry, kept in zip((METHODS, TASKS, SIGNALS), before):
        registry.entries.clear()
        registry.entries.update(kept)


def test_the_method_trains_only_norms_and_exports_them(examples, tiny_model, tmp_path):
    method = build_method("norm_tuning", {})
    model = method.adapt(AutoModelForCausalLM.from_pretrained(tiny_model))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("norm" in n for n in trained)
    method.export(model, model.state_dict(), tmp_path)
    assert (tmp_path / "norms.safetensors").stat().st_size > 0
    assert get_method("norm_tuning").__module__ != "throwaway_norm_method"


def test_the_task_renders_collates_and_trains(examples, tiny_model, tmp_path):
    rows = [{"text": f"{'good ' * (i % 3)}day", "score": float(i % 3)} for i in range(12)]
    data = DataSection(path=str(tiny.write_jsonl(tmp_path / "scores.jsonl", rows)), prompt="{text}",
                       response="{score}", eval_size=4)
    tok = load_tokenizer(str(tiny_model))
    splits = load_splits(data, tok, 0, task="score_regression")
    assert sorted(s.target for s in splits.train + splits.eval) == sorted(r["score"] for r in rows)
    model = load_model(str(tiny_model), task="score_regression", pad_token_id=tok.pad_token_id)
    assert model.config.problem_type == "regression" and model.score.out_features == 1
    batch = collate(splits.train[:4], tok.pad_token_id)
    out = build_method("full", {}).loss(model, batch, {})  # the default objective is the batch's task's
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.score.weight.grad.abs().sum() > 0
    assert get_task("score_regression").head_class().__name__ == "AutoModelForSequenceClassification"


def test_the_signal_is_label_smoothing_as_distillation(examples, tiny_model, tiny_data):
    tok = load_tokenizer(str(tiny_model))
    data = DataSection(path=str(tiny_data), prompt="Sentiment: {text}", response="{label}", eval_size=4, limit=12)
    batch = collate(load_splits(data, tok, 0).train[:4], tok.pad_token_id)
    signal = get_signal("smoothed_gold").build("teacher", None, None)
    positions = kd_positions(batch, "response")
    out = signal(batch, positions)
    assert out.topk_ids.shape == (int(positions.sum()), 1)
    assert torch.equal(out.topk_ids[:, 0], batch["labels"][:, 1:][positions])
    method = build_method("distill", {"teacher": {"path": str(tiny_model), "dtype": "fp32"}, "signal": "smoothed_gold"})
    assert method.config.top_k == 64  # no dense logits: the signal's default top-k
    student = AutoModelForCausalLM.from_pretrained(tiny_model)
    loss = method.loss(student, batch, {"teacher": signal})
    assert torch.isfinite(loss.loss) and loss.metrics["kd"] > 0
