"""`method: adapters` is checked before scheduling: every message names method.adapters.<i>.<key>."""

import pytest

import tiny
from distune.config import ConfigError
from distune.validate import validate


@pytest.fixture
def two_tasks(tmp_path):
    return [{"name": "sent", "path": str(tiny.write_jsonl(tmp_path / "a.jsonl", tiny.sentiment_rows(40, seed=1)))},
            {"name": "mood", "path": str(tiny.write_jsonl(tmp_path / "b.jsonl", tiny.sentiment_rows(40, seed=2))),
             "prompt": "Mood: {text}"}]


def _cfg(make_config, tasks, adapters, **sections):
    return make_config(method={"name": "adapters", "adapters": adapters}, data={"tasks": tasks}, **sections)


def test_valid_config_summary(make_config, two_tasks):
    cfg = _cfg(make_config, two_tasks, [{"name": "sent", "task": "sent", "max_steps": 7}, {"name": "mood", "task": "mood"}])
    summary = validate(cfg)
    assert summary["total_steps"] == 7  # the longest adapter; "mood" trains train.max_steps = 4


@pytest.mark.parametrize("adapters, message", [
    ([{"name": "a", "task": "sent"}, {"name": "a", "task": "mood"}], "method.adapters.1.name: 'a' is already"),
    ([{"name": "a", "task": "sent", "lr": -1}], "method.adapters.0.lr"),
    ([{"name": "a", "task": "sent", "rank": 4}], "method.adapters.0.rank: unknown key"),
    ([{"name": "a", "task": "sent"}, {"name": "b", "task": "mood", "method": {"name": "lora", "r": 0}}],
     "method.adapters.1.method.r"),
    ([{"name": "a", "task": "sent", "method": {"name": "full"}}], "method.adapters.0.method.name: 'full' is not an "
                                                                   "adapter method"),
    ([{"name": "default", "task": "sent"}], "method.adapters.0.name"),
    ([], "at least one adapter"),
])
def test_config_errors_name_the_key(make_config, two_tasks, adapters, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        _cfg(make_config, two_tasks, adapters)


def test_unknown_task_mixed_types_and_missing_tasks(make_config, two_tasks):
    cfg = _cfg(make_config, two_tasks, [{"name": "first", "task": "sent"}, {"name": "second", "task": "topics"}])
    with pytest.raises(ConfigError, match=r"method\.adapters\.1\.task: unknown task 'topics'; data\.tasks has: sent, mood"):
        validate(cfg)
    cfg = _cfg(make_config, two_tasks, [{"name": "first", "task": "sent"},
                                        {"name": "second", "task": "mood", "method": {"name": "ia3"}}])
    with pytest.raises(ConfigError, match=r"method\.adapters\.1\.method: a IA3 adapter next to .* LORA"):
        validate(cfg)
    cfg = _cfg(make_config, two_tasks, [{"name": "first", "task": "sent", "method": {"name": "prompt_tuning"}}])
    with pytest.raises(ConfigError, match=r"method\.adapters\.0\.method: PROMPT_TUNING adapters train one per job"):
        validate(cfg)
    cfg = make_config(method={"name": "adapters", "adapters": [{"name": "first", "task": "sent"}]})
    with pytest.raises(ConfigError, match=r"data\.tasks: method 'adapters' trains one stream per data task"):
        validate(cfg)
    cfg = _cfg(make_config, two_tasks, [{"name": "lora", "task": "sent"}])
    with pytest.raises(ConfigError, match=r"method\.adapters\.0\.name: 'lora' is part of PEFT's key prefix"):
        validate(cfg)
    cfg = _cfg(make_config, two_tasks, [{"name": "first", "task": "sent"}], train={"global_batch_size": 64})
    with pytest.raises(ConfigError, match=r"of task 'sent' \(method\.adapters\.0\.task\) can fill once"):
        validate(cfg)
