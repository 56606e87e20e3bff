import subprocess
import sys

import pytest

from distune.config import ConfigError, load_config
from distune.engine.ds_config import build_ds_config


def _raw(**sections):
    raw = {"model": {"path": "/m"}, "data": {"path": "/d.jsonl"}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return raw


def test_unknown_key_names_path_and_closest_key():
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key; did you mean 'train\.lr'"):
        load_config(_raw(train={"learning_rate": 1e-4}))


def test_unknown_top_level_section():
    with pytest.raises(ConfigError, match=r"trian: unknown key; did you mean 'train'"):
        load_config({**_raw(), "trian": {}})


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size: .*integer.*'four'"):
        load_config(_raw(train={"micro_batch_size": "four"}))


def test_out_of_range_value():
    with pytest.raises(ConfigError, match=r"train\.lr: Input should be greater than 0"):
        load_config(_raw(train={"lr": -1}))


def test_missing_required_section():
    with pytest.raises(ConfigError, match=r"data: required key is missing"):
        load_config({"model": {"path": "/m"}})


def test_method_keys_validated_by_plugin_with_suggestion():
    with pytest.raises(ConfigError, match=r"method\.rank: unknown key; did you mean 'method\.r'"):
        load_config(_raw(method={"name": "lora", "rank": 8}))


def test_unknown_method_name_suggests():
    with pytest.raises(ConfigError, match=r"method\.name: unknown method 'lroa' \(did you mean 'lora'\?\)"):
        load_config(_raw(method={"name": "lroa"}))


def test_overrides_parse_yaml_values_and_nest():
    cfg = load_config(_raw(), ["train.lr=1e-4", "deepspeed.stage=3", "method.name=lora", "method.r=4",
                               "deepspeed.extra.zero_optimization.reduce_bucket_size=1000", "eval.choices=[a, b]"])
    assert cfg.train.lr == 1e-4 and cfg.deepspeed.stage == 3 and cfg.method_config().r == 4
    assert cfg.eval.choices == ["a", "b"]


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(_raw(), ["train.lr"])


def test_deepspeed_extra_is_merged_last():
    cfg = load_config(_raw(deepspeed={"stage": 3, "offload_param": True,
                                      "extra": {"zero_optimization": {"stage3_max_live_parameters": 5},
                                                "gradient_clipping": 0.5}}))
    ds = build_ds_config(cfg, grad_accum=2)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_optimization"]["stage3_max_live_parameters"] == 5
    assert ds["gradient_clipping"] == 0.5 and ds["gradient_accumulation_steps"] == 2


def test_offload_param_needs_stage3():
    with pytest.raises(ConfigError, match="deepspeed: .*offload_param needs stage: 3"):
        load_config(_raw(deepspeed={"stage": 2, "offload_param": True}))


def test_batch_arithmetic():
    cfg = load_config(_raw(train={"global_batch_size": 10, "micro_batch_size": 4}, cluster={"num_workers": 2}))
    with pytest.raises(ConfigError, match=r"global_batch_size=10 is not a multiple of .* 4 x 2 = 8"):
        cfg.grad_accum_steps()
    ok = load_config(_raw(train={"global_batch_size": 16, "micro_batch_size": 4}, cluster={"num_workers": 2}))
    assert ok.grad_accum_steps() == 2


def test_secrets_refused_in_config():
    with pytest.raises(ConfigError, match="WANDB_API_KEY looks like a secret"):
        load_config(_raw(cluster={"env": {"WANDB_API_KEY": "x"}}))


def test_yaml_syntax_error_names_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  path: /m\ndata: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c\.yaml line \d+: not valid YAML"):
        load_config(f)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "distune", *args], capture_output=True, text=True, timeout=300)


def test_cli_validate_reports_one_line_no_traceback(tmp_path, tiny_model, tiny_data, capsys):
    """End to end in a subprocess once each way (exit code, no traceback); the other errors through the same
    `main` in this process (the catalogue in tests/reliability has more)."""
    import yaml

    import tiny
    from distune.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny.base_config(tiny_model, tiny_data, tmp_path / "runs")))
    ok = _cli("validate", str(cfg))
    assert ok.returncode == 0, ok.stderr
    assert "ok: " in ok.stdout and "grad_accum=2" in ok.stdout
    bad = _cli("validate", str(cfg), "model.dtype=fp16")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "model.dtype: fp16 is not supported on CPU workers" in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr

    for override, message in [
        ("data.path=/nope.jsonl", "data.path: /nope.jsonl does not exist"),
        ("model.path=/nope", "model.path: /nope does not exist"),
        ("train.global_batch_size=3", "train.global_batch_size=3 is not a multiple"),
        ("train.lr=oops", "train.lr: Input should be a valid number"),
    ]:
        rc = main(["validate", str(cfg), override])
        err = capsys.readouterr().err
        assert rc == 2, (override, err)
        assert message in err and len(err.strip().splitlines()) == 1, (override, err)
