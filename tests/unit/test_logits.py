"""Logits only where the loss reads them (distune.logits): same loss and gradients as the full-logits path, while
the output head sees only the trained positions, or one chunk of them at a time."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distune.config import DataSection
from distune.data import collate, load_splits
from distune.distill.divergences import distill_loss
from distune.signals import OnlineSignal, kd_positions
from distune.logits import head_at, output_head
from distune.methods import RunSettings, build_method
from distune.tasks.causal_lm import causal_lm_loss


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def batch(tok, tiny_data):
    samples = load_splits(DataSection(path=str(tiny_data), prompt="Sentiment: {text}", response="{label}",
                                      eval_size=2, max_length=64), tok, seed=0).train[:4]
    return collate(samples, tok.pad_token_id)


def fresh(path):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


class HeadRows:
    """Records how many rows each call of the output head computed."""

    def __init__(self, model):
        self.rows = []
        self.handle = output_head(model).register_forward_hook(
            lambda m, i, out: self.rows.append(out.reshape(-1, out.shape[-1]).shape[0]))


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("student", [{"name": "full"}, {"name": "lora", "r": 4, "target_modules": "all-linear"}])
@pytest.mark.parametrize("chunk", [None, 3])
def test_ce_and_grads_equal_the_full_logits_path(tiny_model, batch, student, chunk):
    name = student["name"]
    opts = {k: v for k, v in student.items() if k != "name"}
    reference = build_method(name, opts).adapt(fresh(tiny_model))
    out = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    want, n_want = causal_lm_loss(out.logits, batch["labels"])
    want.backward()
    assert out.logits.shape[:2] == batch["input_ids"].shape  # the old path: every position's logits

    method = build_method(name, opts, RunSettings(loss_chunk=chunk))
    model = method.adapt(fresh(tiny_model))
    rows = HeadRows(model)
    got = method.loss(model, batch, {})
    got.loss.backward()
    trained = int((batch["labels"][:, 1:] != -100).sum())
    assert got.metrics["trained_tokens"].item() == n_want.item() == trained
    assert got.loss.item() == pytest.approx(want.item(), rel=1e-6)
    for n, g in grads(reference).items():
        torch.testing.assert_close(grads(model)[n], g, rtol=1e-5, atol=1e-7)
    # The head never computed a position nobody reads; chunked, never more than one chunk at once.
    if chunk is None:
        assert rows.rows == [trained]
    else:
        assert max(rows.rows) <= chunk and sum(rows.rows) == 2 * trained  # forward + backward recompute


@pytest.mark.parametrize("signal", ["dense", "topk"])
@pytest.mark.parametrize("kd_where", ["response", "all"])
@pytest.mark.parametrize("chunk", [None, 5])
def test_distill_loss_equals_hand_composition(tiny_model, tiny_teacher, tok, batch, signal, kd_where, chunk):
    top_k = None if signal == "dense" else 8
    method = build_method("distill", {"teacher": {"path": str(tiny_teacher), "dtype": "fp32"}, "kd_weight": 0.3,
                                      "temperature": 2.0, "divergence": "jsd", "divergence_params": {"beta": 0.3},
                                      "top_k": top_k, "kd_positions": kd_where}, RunSettings(loss_chunk=chunk))
    teacher_model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    teacher = OnlineSignal(teacher_model, len(tok), top_k, 2.0)
    teacher_rows = HeadRows(teacher_model)
    model = method.adapt(fresh(tiny_model))
    got = method.loss(model, batch, {"teacher": teacher})
    got.loss.backward()
    positions = kd_positions(batch, kd_where)
    assert teacher_rows.rows == [int(positions.sum())]  # the teacher's head ran on the KD positions only

    reference = fresh(tiny_model)
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        t_logits = teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    t_logits = t_logits[:, :-1][positions]
    if top_k:
        t_logp = torch.log_softmax(t_logits.float() / 2.0, -1)
        vals, ids = t_logp.topk(top_k, -1)
        kd = distill_loss("jsd", logits[:, :-1][positions], teacher_topk=(ids, vals), temperature=2.0, beta=0.3)
    else:
        kd = distill_loss("jsd", logits[:, :-1][positions], teacher_logits=t_logits, temperature=2.0, beta=0.3)
    ce, _ = causal_lm_loss(logits, batch["labels"])
    want = 0.7 * ce + 0.3 * kd
    want.backward()
    assert got.metrics["kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert got.metrics["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert got.loss.item() == pytest.approx(want.item(), rel=1e-5)
    for n, g in grads(reference).items():
        torch.testing.assert_close(grads(model)[n], g, rtol=1e-4, atol=1e-6)
    agree = (logits[:, :-1][positions].argmax(-1) == t_logits.argmax(-1)).float().mean()
    assert got.metrics["top1_agreement"].item() == pytest.approx(agree.item())


def test_head_left_alone_when_its_input_is_not_the_indexed_sequence(tiny_model, batch):
    """A model that calls its head on something else (here: a shorter sequence) gets the full logits, picked."""
    model = fresh(tiny_model)
    positions = batch["labels"][:, 1:] != -100
    cut = {"input_ids": batch["input_ids"][:, :-2], "attention_mask": batch["attention_mask"][:, :-2]}
    with head_at(model, positions) as sel:
        out = model(**cut)
    assert not sel.applied and out.logits.shape[:2] == cut["input_ids"].shape
