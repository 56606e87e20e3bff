"""`base:` includes: a config over the files it names, the including side winning."""

import pytest
import yaml

import tiny
from distune.config import ConfigError, load_config


def write(path, raw):
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def common(tmp_path, tiny_model, tiny_data):
    raw = tiny.base_config(tiny_model, tiny_data, tmp_path / "runs", method={"name": "lora", "r": 4})
    (tmp_path / "shared").mkdir()
    return write(tmp_path / "shared" / "common.yaml", raw)


def test_including_side_wins_key_by_key(tmp_path, common):
    cfg = load_config(write(tmp_path / "run.yaml", {"base": "shared/common.yaml", "train": {"lr": 0.5},
                                                    "method": {"r": 16}}))
    base = load_config(common)
    assert cfg.train.lr == 0.5 and cfg.train.max_steps == base.train.max_steps  # merged, not replaced
    assert cfg.method.name == "lora" and cfg.method_config().r == 16
    assert cfg.model.path == base.model.path


def test_bases_chain_and_list_merge_in_order(tmp_path, common):
    write(tmp_path / "shared" / "short.yaml", {"base": "common.yaml", "train": {"max_steps": 3, "lr": 0.1}})
    write(tmp_path / "shared" / "slow.yaml", {"train": {"lr": 0.01}})
    cfg = load_config(write(tmp_path / "run.yaml", {"base": ["shared/short.yaml", "shared/slow.yaml"]}),
                      ["train.max_steps=5"])
    assert (cfg.train.max_steps, cfg.train.lr) == (5, 0.01)


def test_another_method_replaces_the_bases_method(tmp_path, common, tiny_teacher):
    cfg = load_config(write(tmp_path / "kd.yaml", {"base": "shared/common.yaml", "method": {
        "name": "distill", "teacher": {"path": str(tiny_teacher)}}}))
    assert cfg.method.name == "distill" and "r" not in cfg.method.model_extra


def test_a_dict_finds_bases_under_base_dir(tmp_path, common):
    assert load_config({"base": "common.yaml"}, base_dir=common.parent).model.path == load_config(common).model.path


@pytest.mark.parametrize("base, message", [
    ("missing.yaml", "base: missing.yaml: file not found"),
    (7, "base: expected a config file name or a list of them"),
    ("loop.yaml", "includes itself"),
])
def test_bad_bases_are_one_line(tmp_path, base, message):
    write(tmp_path / "loop.yaml", {"base": "run.yaml"})
    run = write(tmp_path / "run.yaml", {"base": base})
    with pytest.raises(ConfigError, match=message) as e:
        load_config(run)
    assert "\n" not in str(e.value) and str(run) in str(e.value)
