import importlib
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import throwaway_plugin
from distune.methods import build_method, get_method, known_methods, register_method
from distune.methods.base import Method
from distune.tasks.causal_lm import causal_lm_loss


def test_builtin_methods_registered():
    assert {"full", "lora"} <= set(known_methods())


def test_full_trains_everything_and_can_freeze_embeddings(tiny_model):
    model = build_method("full", {}).adapt(AutoModelForCausalLM.from_pretrained(tiny_model))
    assert all(p.requires_grad for p in model.parameters())
    model = build_method("full", {"freeze_embeddings": True}).adapt(AutoModelForCausalLM.from_pretrained(tiny_model))
    assert not model.get_input_embeddings().weight.requires_grad
    assert model.model.layers[0].self_attn.q_proj.weight.requires_grad


@pytest.mark.parametrize("opts", [{}, {"use_rslora": True}, {"use_dora": True, "target_modules": ["q_proj", "v_proj"]}])
def test_lora_trains_only_adapters(tiny_model, opts):
    method = build_method("lora", {"r": 4, **opts})
    model = method.adapt(AutoModelForCausalLM.from_pretrained(tiny_model))
    trainable = method.export_keys(model)
    assert trainable and all("lora_" in n for n in trainable)
    cfg = model.peft_config["default"]
    assert cfg.use_rslora == opts.get("use_rslora", False) and cfg.use_dora == opts.get("use_dora", False)
    if "target_modules" in opts:
        assert {n.split(".")[-4] for n in trainable if "lora_A" in n} == {"q_proj", "v_proj"}


def test_causal_lm_loss_matches_hand_math():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 2.0  # predicts token at position 1
    labels = torch.tensor([[-100, 2, -100]])
    loss, n = causal_lm_loss(logits, labels)
    expected = -torch.log_softmax(torch.tensor([0.0, 0.0, 2.0, 0.0]), 0)[2]
    assert n.item() == 1 and torch.isclose(loss, expected)


def test_duplicate_registration_refused():
    with pytest.raises(ValueError, match="already registered"):
        @register_method("lora")
        class Other(Method):
            def adapt(self, model):
                return model

            def export(self, model, state_dict, out_dir):
                pass


def test_third_party_method_found_through_entry_point(tmp_path, monkeypatch, tiny_model):
    site = throwaway_plugin.install(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    assert "norm_tuning" in known_methods()
    cls = get_method("norm_tuning")
    assert cls.__module__ == "throwaway_norm_method"
    model = build_method("norm_tuning", {}).adapt(AutoModelForCausalLM.from_pretrained(tiny_model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "norm" in n}
    sys.modules.pop("throwaway_norm_method", None)


def test_worker_refuses_frozen_models_of_an_unknown_kind(world_of_one, tiny_model, tiny_data, tmp_path):
    import os

    import tiny
    from distune.config import load_config
    from distune.reporting import LocalReporter
    from distune.worker import run

    @register_method("needs_teacher_test")
    class NeedsTeacher(Method):
        def adapt(self, model):
            return model

        def frozen_models(self):
            return {"teacher": str(tiny_model)}

        def export(self, model, state_dict, out_dir):
            pass

    cfg = load_config(tiny.base_config(tiny_model, tiny_data, tmp_path, method={"name": "needs_teacher_test"}))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # The runner builds TeacherSpecs; anything else is refused by name rather than trained without it.
    with pytest.raises(ValueError, match=r"frozen model 'teacher' of unknown kind str"):
        run(cfg, LocalReporter(cfg.run_dir, 1, 0, show_progress=False))
