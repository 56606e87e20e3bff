"""`dtype: auto`: bf16 where the hardware computes it natively, fp32 elsewhere; resolved once where the config
loads, so the workers get a concrete dtype; an explicit bf16 on an emulating CPU gets a warning."""

import pytest
import yaml

import distune.hardware as hardware
from distune.config import dump_config, load_config
from distune.validate import validate

import tiny


def _distill(path) -> dict:
    return {"name": "distill", "student": {"name": "full"}, "teacher": {"path": str(path)}}


def test_auto_follows_the_cpu(make_config):
    expected = "bf16" if hardware.cpu_has_native_bf16() else "fp32"
    cfg = make_config(model={"dtype": "auto"}, cluster={"use_gpu": False})
    assert cfg.model.dtype == expected


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_picks_bf16_only_where_native(make_config, monkeypatch, native, expected):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    assert make_config(model={"dtype": "auto"}, cluster={"use_gpu": False}).model.dtype == expected


@pytest.mark.parametrize("seen, expected", [
    (hardware.Facts(gpus=8, gpu_name="NVIDIA H100", gpu_bf16=True, gpu_tf32=True), "bf16"),
    (hardware.Facts(gpus=1, gpu_name="Tesla V100", gpu_bf16=False), "fp32"),  # Volta: no bf16
    (hardware.Facts(known=False), "bf16"),  # nobody looked: every data-centre GPU since the A100 has it
])
def test_a_gpu_target_decides_by_what_its_worker_sees(seen, expected):
    assert hardware.auto_dtype(True, seen) == expected


def test_resolving_fixes_use_gpu_too(tiny_model, tiny_data, tmp_path):
    from distune.config import resolve_for_hardware

    raw = tiny.base_config(tiny_model, tiny_data, tmp_path / "runs", model={"dtype": "auto"},
                           cluster={"use_gpu": "auto"})
    cfg = load_config(raw, resolve=False)
    resolve_for_hardware(cfg, hardware.Facts(gpus=2, gpu_bf16=True), gpu=True)
    assert (cfg.cluster.use_gpu, cfg.model.dtype) == (True, "bf16")
    assert dump_config(cfg)["cluster"]["use_gpu"] is True  # the workers get no `auto`


def test_a_submit_leaves_the_hardware_checks_to_the_cluster(tiny_model, tiny_data, tmp_path):
    """Unresolved `auto`s (validate with local_cluster=False, as submit does): no verdict from this machine's
    hardware, the rest of the config is still checked."""
    from distune.config import ConfigError

    raw = tiny.base_config(tiny_model, tiny_data, tmp_path / "runs", model={"dtype": "auto"},
                           cluster={"use_gpu": "auto"})
    cfg = load_config(raw, resolve=False)
    assert validate(cfg, local_cluster=False)["total_steps"] == 4
    assert (cfg.cluster.use_gpu, cfg.model.dtype) == ("auto", "auto")  # shipped as written
    bad = load_config({**raw, "train": {**raw["train"], "global_batch_size": 3}}, resolve=False)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        validate(bad, local_cluster=False)


def test_flash_attention_with_fp32_is_refused_naming_the_key(make_config):
    from distune.config import ConfigError

    cfg = make_config(model={"attn_implementation": "flash_attention_2", "dtype": "fp32"}, cluster={"use_gpu": True})
    with pytest.raises(ConfigError, match=r"^model.attn_implementation: flash_attention_2 computes in bf16/fp16 only"):
        validate(cfg, local_cluster=False)


def test_the_teacher_defaults_to_auto_and_is_resolved_with_the_student(make_config, tiny_teacher, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    cfg = make_config(method=_distill(tiny_teacher), model={"dtype": "auto"}, cluster={"use_gpu": False})
    assert (cfg.model.dtype, cfg.method_config().teacher.dtype) == ("fp32", "fp32")
    # The record the workers load: no `auto` left in it, so every rank agrees.
    dumped = dump_config(cfg)
    assert dumped["model"]["dtype"] == "fp32" and dumped["method"]["teacher"]["dtype"] == "fp32"
    assert load_config(dumped).model.dtype == "fp32"


def test_resolve_false_keeps_auto_for_the_machine_that_runs_it(tiny_model, tiny_data, tmp_path):
    raw = tiny.base_config(tiny_model, tiny_data, tmp_path / "runs", model={"dtype": "auto"})
    assert load_config(raw, resolve=False).model.dtype == "auto"


def test_explicit_bf16_on_an_emulating_cpu_is_a_warning_naming_the_key(make_config, tiny_teacher, monkeypatch):
    import distune.validate as v

    monkeypatch.setattr(v, "cpu_has_native_bf16", lambda: False)
    cfg = make_config(method={**_distill(tiny_teacher), "teacher": {"path": str(tiny_teacher), "dtype": "bf16"}},
                      model={"dtype": "bf16"}, cluster={"use_gpu": False})
    warnings = validate(cfg)["warnings"]
    assert [w.split(":")[0] for w in warnings if "emulates" in w] == ["model.dtype", "method.teacher.dtype"]
    monkeypatch.setattr(v, "cpu_has_native_bf16", lambda: True)
    assert not [w for w in validate(cfg)["warnings"] if "emulates" in w]


def test_unknown_dtype_names_the_key(make_config):
    from distune.config import ConfigError

    with pytest.raises(ConfigError, match="model.dtype"):
        make_config(model={"dtype": "bf17"})


def test_the_quickstart_leaves_the_choice_to_the_hardware():
    from pathlib import Path

    from distune.pipeline import load_pipeline

    configs = Path(__file__).resolve().parents[2] / "configs"
    for name in ("sentiment-distill.yaml", "sentiment-teacher.yaml"):
        raw = yaml.safe_load((configs / name).read_text())
        assert raw["model"]["dtype"] == "auto", name
        assert raw["method"].get("teacher", {}).get("dtype", "auto") == "auto", name
    for stage in load_pipeline(configs / "quickstart.yaml", resolve=False):
        assert stage.cfg.model.dtype == "auto", stage.name
        if stage.cfg.method.name == "distill":
            assert stage.cfg.method_config().teacher.dtype == "auto", stage.name
