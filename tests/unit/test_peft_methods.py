"""PEFT methods beyond plain LoRA, without Ray: what trains, the loss lines up with the input, export reloads.

Prompt tuning / P-tuning prepend virtual tokens: the tests pin that our loss equals PEFT's own loss (which
pads the labels itself) and that exports give the trained model's logits back after PeftModel.from_pretrained.
"""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from distune.config import ConfigError, load_config
from distune.methods import build_method
from distune.models import load_model

import tiny

PROMPT_METHODS = [("prompt_tuning", {"num_virtual_tokens": 4}),
                  ("prompt_tuning", {"num_virtual_tokens": 5, "init": "text", "init_text": "the movie was"}),
                  ("p_tuning", {"num_virtual_tokens": 4, "encoder_hidden_size": 16}),
                  ("p_tuning", {"num_virtual_tokens": 3, "encoder": "lstm", "encoder_hidden_size": 8}),
                  ("prefix_tuning", {"num_virtual_tokens": 4}),
                  ("prefix_tuning", {"num_virtual_tokens": 2, "projection": True, "encoder_hidden_size": 16})]
ALL_METHODS = PROMPT_METHODS + [("ia3", {}), ("lora", {"use_rslora": True}), ("lora", {"lr_ratio": 16.0})]
IDS = [f"{n}-{i}" for i, (n, _) in enumerate(ALL_METHODS)]


def _batch():
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 8, 9, 10], [-100, -100, 13, 14, -100, -100]])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _train_a_little(method, model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(steps):
        out = method.loss(model, _batch(), {})
        out.loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize(("name", "options"), ALL_METHODS, ids=IDS)
def test_loss_aligns_with_input_positions_and_export_reloads(tiny_model, tmp_path, name, options):
    torch.manual_seed(0)
    method = build_method(name, options)
    model = method.adapt(load_model(str(tiny_model)))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("base_layer" not in n and ".embed_tokens." not in n for n in trained)
    batch = _batch()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert out.logits.shape[:2] == batch["input_ids"].shape  # virtual positions cut off
    ours = method.loss(model, batch, {}).loss
    theirs = model(**batch).loss  # PEFT pads the labels for its virtual tokens itself
    assert torch.allclose(ours, theirs, atol=1e-5)

    _train_a_little(method, model)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    state = {n: p.detach().clone() for n, p in model.named_parameters() if n in method.export_keys(model)}
    method.export(model, state, tmp_path / "export")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "export").eval()
    with torch.no_grad():
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    n = got.shape[1] - expected.shape[1]  # a plain PeftModel still returns the virtual positions
    assert torch.allclose(got[:, n:], expected, atol=1e-5)
    # The loader the rest of distune uses (eval, teachers) aligns it again: merged LoRA/IA3, or aligned prompts.
    again = load_model(str(tmp_path / "export")).eval()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              expected, atol=1e-5)


def test_export_does_not_read_the_live_prompt_encoder(tiny_model, tmp_path):
    """Under ZeRO-3 the live encoder holds empty partitions: the export must come from the gathered weights."""
    method = build_method("p_tuning", {"num_virtual_tokens": 3, "encoder_hidden_size": 16})
    model = method.adapt(load_model(str(tiny_model)))
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        expected = model.get_prompt_embedding_to_save("default")
        for p in model.prompt_encoder["default"].parameters():
            p.zero_()  # what a rank would see without the gather
    method.export(model, state, tmp_path / "export")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "export" / "adapter_model.safetensors")
    assert torch.allclose(saved["prompt_embeddings"], expected)
    assert all(p.abs().sum() == 0 for p in model.prompt_encoder["default"].parameters())  # live one put back


def test_lora_plus_puts_b_matrices_in_a_faster_group(tiny_model):
    method = build_method("lora", {"lr_ratio": 16.0})
    model = method.adapt(load_model(str(tiny_model)))
    groups = method.optimizer_groups(model)
    assert [g.get("lr_scale", 1.0) for g in groups] == [1.0, 16.0]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("lora_A" in names[id(p)] for p in groups[0]["params"])
    assert all("lora_B" in names[id(p)] for p in groups[1]["params"])
    assert build_method("lora", {}).optimizer_groups(model) is None


def test_lora_plus_ratio_and_own_schedules_reach_the_optimizer(tiny_model, make_config):
    from distune.engine.runtime import build_optimizer

    cfg = make_config(train={"lr": 1e-3, "warmup_steps": 0})
    method = build_method("lora", {"lr_ratio": 4.0})
    model = method.adapt(load_model(str(tiny_model)))
    optimizer, scheduler = build_optimizer(model, cfg.train, 4, method.optimizer_groups(model))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 4e-3])
    # A group with a schedule of its own (one adapter of several) stops at its own end: lr 0 after step 2.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(model, cfg.train, 4, [
        {"params": params[:2], "lr": 1e-2, "warmup_steps": 1, "total_steps": 2}, {"params": params[2:]}])
    seen = []
    for _ in range(4):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert [s[0] for s in seen] == pytest.approx([1e-2, 1e-2, 0.0, 0.0])
    assert seen[0][1] == pytest.approx(1e-3) and seen[3][1] < seen[1][1]  # the run's cosine


@pytest.mark.parametrize(("options", "match"), [
    ({"init": "text"}, r"method.init_text: required"),
    ({"num_virtual_tokens": 0}, r"method.num_virtual_tokens"),
    ({"init": "vocab"}, r"method.init"),
])
def test_bad_prompt_tuning_options_name_the_key(make_config, options, match):
    with pytest.raises(ConfigError, match=match):
        make_config(method={"name": "prompt_tuning", **options})


def test_packing_is_refused_for_prompt_learning(make_config):
    from distune.validate import validate

    cfg = make_config(method={"name": "prefix_tuning"}, data={"packing": True})
    with pytest.raises(ConfigError, match=r"data.packing: method 'prefix_tuning' prepends virtual tokens"):
        validate(cfg)


@pytest.mark.parametrize(("name", "options"), PROMPT_METHODS[::2], ids=[n for n, _ in PROMPT_METHODS[::2]])
def test_generation_with_virtual_tokens_equals_greedy_decoding_of_the_aligned_logits(tiny_model, name, options):
    """distune's batched, left-padded generation (eval, GKD, `generate`) against step-by-step argmax."""
    from distune.generate import complete
    from distune.models import load_tokenizer

    torch.manual_seed(0)
    model = build_method(name, options).adapt(load_model(str(tiny_model))).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 1.0)  # far from the init, so the virtual tokens change what is generated
    tok = load_tokenizer(str(tiny_model))
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]  # different lengths: the shorter one is left-padded
    texts, _ = complete(model, tok, prompts, {"max_new_tokens": 5, "temperature": 0, "top_p": 1.0,
                                              "num_samples": 1, "batch_size": 2}, "cpu")
    for prompt, got in zip(prompts, texts):
        ids = list(prompt)
        for _ in range(5):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids))).logits
            ids.append(int(logits[0, -1].argmax()))
        stop = next((i for i, t in enumerate(ids[len(prompt):]) if t == tok.eos_token_id), 5)
        assert got == [tok.decode(ids[len(prompt):len(prompt) + stop + 1], skip_special_tokens=True).strip()]


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning"])
def test_virtual_tokens_on_a_decoder_classifier_are_refused(make_config, name):
    """PEFT passes them as embeddings: the decoder's classifier would read a pad as the last token."""
    from distune.validate import validate

    cfg = make_config(method={"name": name}, model={"task": "sequence_classification"})
    with pytest.raises(ConfigError, match=rf"method.name: {name} on a decoder's sequence classifier"):
        validate(cfg)
