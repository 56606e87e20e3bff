"""The adapter store (list / export / merge) and switching inference on tiny models: merged LoRA, rsLoRA and DoRA
give the unmerged logits; one base serves several adapters, each exactly as if loaded alone."""

import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from distune.adapters import store, switching
from distune.adapters.store import AdapterError
from distune.cli import main

IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


def _adapter(base, out, seed, **lora):
    """A LoRA adapter with random (non-zero) B, so it changes the outputs."""
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def run_export(tiny_model, tmp_path_factory):
    """A run folder as method `adapters` leaves it: export/<name>/ per adapter, the tokenizer once in export/."""
    run = tmp_path_factory.mktemp("run") / "multi"
    _adapter(tiny_model, run / "export" / "sent", 1)
    _adapter(tiny_model, run / "export" / "mood", 2, use_rslora=True)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(run / "export")
    return run


def test_list_names_types_bases_sizes_params(run_export, tiny_model, capsys):
    rows = {r["name"]: r for r in store.list_adapters(run_export)}
    assert set(rows) == {"export/sent", "export/mood"}
    expected = sum(p.numel() for n, p in PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), run_export / "export" / "sent").named_parameters() if "lora_" in n)
    assert rows["export/sent"]["params"] == expected
    assert rows["export/sent"]["peft_type"] == "LORA" and rows["export/sent"]["base_model"] == str(tiny_model)
    assert rows["export/sent"]["bytes"] > expected * 4  # fp32 weights + config
    assert main(["adapters", "list", str(run_export / "export")]) == 0
    assert "sent" in capsys.readouterr().out


def test_export_copies_one_adapter_with_tokenizer(run_export, tmp_path, tiny_model):
    out = store.export_adapter(run_export, "mood", tmp_path / "mood")
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".tmp-*"))  # no debris
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)  # loads on its own
    with pytest.raises(AdapterError, match="exists"):
        store.export_adapter(run_export, "mood", tmp_path / "mood")
    with pytest.raises(AdapterError, match="found: mood, sent"):
        store.export_adapter(run_export, "nope", tmp_path / "x")
    assert main(["adapters", "export", str(run_export), "nope", "--out", str(tmp_path / "y")]) == 2


@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}, {"use_dora": True}], ids=["lora", "rslora", "dora"])
def test_merged_equals_unmerged(tiny_model, tmp_path, variant):
    adapter = _adapter(tiny_model, tmp_path / "adapter", 3, **variant)
    merged_dir = store.merge_adapter(adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)  # a plain model: no PEFT needed
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (merged_dir / "tokenizer.json").is_file()
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, unmerged(IDS).logits, atol=1e-5, rtol=1e-5)
        assert (merged(IDS).logits - base(IDS).logits).abs().max() > 1e-3  # the adapter mattered


def test_prompt_learning_has_nothing_to_merge(tiny_model, tmp_path):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.save_pretrained(tmp_path / "prompt")
    with pytest.raises(AdapterError, match="nothing to merge"):
        store.merge_adapter(tmp_path / "prompt", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_switching_equals_each_adapter_alone_base_loaded_once(run_export, tiny_model, monkeypatch, capsys):
    loads = []
    real = switching.load_base
    monkeypatch.setattr(switching, "load_base", lambda *a: loads.append(a) or real(*a))
    paths = {"sent": run_export / "export" / "sent", "mood": run_export / "export" / "mood"}
    served = switching.AdapterSet(paths)
    prompts = ["great movie", "so sad today"]
    # Interleaved requests: mood, sent, mood ...
    answers = {name: (served.generate(prompts, name, 6), served.score(prompts[0], ["positive", "negative"], name))
               for name in ["mood", "sent", "mood"]}
    assert len(loads) == 1  # the base is read once for all adapters
    for name, path in paths.items():
        alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), path).eval()
        tok = AutoTokenizer.from_pretrained(run_export / "export")
        text = tok.apply_chat_template([{"role": "user", "content": prompts[0]}], tokenize=False,
                                       add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            served.use(name)
            torch.testing.assert_close(served.model(input_ids=ids).logits, alone(input_ids=ids).logits, atol=0, rtol=0)
            gen = alone.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        assert answers[name][0][0] == tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    assert answers["sent"][1] != answers["mood"][1]  # different adapters, different scores

    assert main(["adapters", "generate", "-", "--adapter", f"sent={paths['sent']}", "--adapter",
                 f"mood={paths['mood']}", "--prompt", "great movie", "--choices", "positive,negative"]) == 0
    out = capsys.readouterr().out
    assert "[sent]" in out and "[mood]" in out
    assert main(["adapters", "generate", "-", "--adapter", f"sent={paths['sent']}", "--prompt", "x",
                 "--use", "nope"]) == 2
