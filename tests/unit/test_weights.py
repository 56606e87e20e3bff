"""The slice reader behind partitioned loads (distune/weights.py) and the blueprint's checks (distune/models.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from distune.config import ConfigError, load_config
from distune.models import blueprint, load_model, partitioned_blueprint
from distune.weights import WeightReader


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return tiny.build_model_dir(tmp_path_factory.mktemp("w") / "model", tied=True, max_shard_size="40KB")


def _whole(folder) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_read_flat_returns_exactly_the_asked_elements_in_the_asked_dtype(sharded):
    reader = WeightReader(sharded, "model.path")
    whole = _whole(sharded)
    gen = torch.Generator().manual_seed(0)
    for key in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        flat = whole[key].reshape(-1)
        for _ in range(5):  # ranges that start and end mid-row, and a single element
            a = int(torch.randint(0, flat.numel(), (1,), generator=gen))
            b = int(torch.randint(a + 1, flat.numel() + 1, (1,), generator=gen))
            got = reader.read_flat(key, a, b, torch.bfloat16)
            assert got.dtype == torch.bfloat16 and torch.equal(got, flat[a:b].to(torch.bfloat16))
        assert torch.equal(reader.read_flat(key, 0, flat.numel(), torch.float32), flat)


def test_names_follow_layers_and_a_heads_base_prefix(sharded):
    reader = WeightReader(sharded, "model.path", layer_map=[1])
    assert reader.locate("model.layers.0.mlp.up_proj.weight", "model") == "model.layers.1.mlp.up_proj.weight"
    # LlamaForQuestionAnswering names its base `transformer`; the checkpoint says `model`.
    assert reader.locate("transformer.norm.weight", "transformer") == "model.norm.weight"
    assert reader.locate("qa_outputs.weight", "transformer") is None  # a new head: initialised, not read
    assert reader.locate("lm_head.weight", "model") is None  # tied: the checkpoint stores the embedding only


def test_lora_update_is_merged_row_by_row_as_peft_merges_it(tmp_path, sharded):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(sharded),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    merged = load_model(str(tmp_path / "adapter"))  # PEFT's merge_and_unload of the whole model
    reader = WeightReader(sharded, "method.teacher.path", adapter=tmp_path / "adapter")
    for name, param in merged.named_parameters():
        key = reader.locate(name, "model")
        got = reader.read_flat(key, 0, param.numel(), torch.float32)
        torch.testing.assert_close(got, param.detach().reshape(-1), rtol=0, atol=1e-6, msg=name)
    assert torch.count_nonzero(merged.model.layers[0].self_attn.q_proj.weight
                               - _whole(sharded)["model.layers.0.self_attn.q_proj.weight"]) > 0


def test_what_cannot_be_read_partitioned_is_refused_naming_the_key(tmp_path, sharded):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    bin_only = tmp_path / "bin"  # a pickled (pytorch_model.bin) checkpoint: no slices to read
    bin_only.mkdir()
    torch.save(_whole(sharded), bin_only / "pytorch_model.bin")
    (bin_only / "config.json").write_text((sharded / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"^model.path: .* has no safetensors weights .*model.load: whole"):
        blueprint(str(bin_only))
    assert partitioned_blueprint(str(bin_only), strict=False)[1].startswith("model.path:")

    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(sharded),
                          LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(ConfigError, match=r"^method.teacher.path: .* use_dora; a partitioned load merges plain LoRA"):
        blueprint(str(tmp_path / "dora"), key="method.teacher.path")

    # A checkpoint whose base names do not match the model's (here: one block's weights missing).
    broken = tmp_path / "broken"
    broken.mkdir()
    weights = {k: v for k, v in _whole(sharded).items() if not k.startswith("model.layers.1.mlp")}
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    (broken / "config.json").write_text((sharded / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"no weight for model.layers.1.mlp.+model.load: whole"):
        blueprint(str(broken)).check()
    blueprint(str(sharded), layers=[0]).check()  # the block it lacks is not asked for


def test_model_load_partitioned_needs_stage_3(tiny_model, tiny_data, tmp_path):
    raw = tiny.base_config(tiny_model, tiny_data, tmp_path, model={"path": str(tiny_model), "load": "partitioned"},
                           deepspeed={"stage": 2})
    with pytest.raises(ConfigError, match=r": model.load: partitioned needs deepspeed.stage: 3"):
        load_config(raw)
    raw["deepspeed"]["stage"] = 3
    cfg = load_config(raw)
    assert cfg.loads_partitioned()
    assert load_config({**raw, "model": {"path": str(tiny_model)}}).loads_partitioned()  # auto at stage 3
    assert not load_config({**raw, "model": {"path": str(tiny_model), "load": "whole"}}).loads_partitioned()
    assert json.loads(json.dumps(cfg.model_dump(mode="json")))["model"]["load"] == "partitioned"


def test_validate_falls_back_to_a_whole_load_under_auto_and_refuses_under_partitioned(tmp_path, sharded, tiny_data):
    from distune.validate import validate

    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    torch.save(_whole(sharded), bin_only / "pytorch_model.bin")
    for f in sharded.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            (bin_only / f.name).write_bytes(f.read_bytes())
    raw = tiny.base_config(bin_only, tiny_data, tmp_path, deepspeed={"stage": 3})
    warnings = validate(load_config(raw))["warnings"]
    assert any(w.startswith("model.load: auto loads this model whole on every rank") for w in warnings), warnings
    raw["model"]["load"] = "partitioned"
    with pytest.raises(ConfigError, match=r"^model.path: .* has no safetensors weights"):
        validate(load_config(raw))
    assert not any("model.load" in w for w in validate(load_config(
        tiny.base_config(sharded, tiny_data, tmp_path, deepspeed={"stage": 3})))["warnings"])


def test_a_node_that_cannot_see_the_drivers_copy_prepares_its_own(tiny_model, tmp_path):
    """Shared-nothing nodes: the driver's prepared source (e.g. a GGUF converted into its own cache) is used where
    this node sees it; elsewhere the configured path is prepared on this node; a path no node-local copy of exists
    is one error naming the key."""
    from distune.models import source_on_this_node

    assert source_on_this_node(str(tiny_model), str(tiny_model)) == str(tiny_model)
    assert source_on_this_node("org/some-model", "org/some-model") == "org/some-model"  # a hub id: each node fetches
    drivers_cache = str(tmp_path / "driver-cache" / "gguf" / "m-0123")  # not on this node
    assert source_on_this_node(str(tiny_model), drivers_cache) == str(tiny_model)
    with pytest.raises(ConfigError, match=r"^method.teacher.path: /nowhere/m.gguf is not on node "):
        source_on_this_node("/nowhere/m.gguf", drivers_cache, key="method.teacher.path")
