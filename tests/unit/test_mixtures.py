"""Multi-task mixtures (data.tasks): temperature sampling counts, upsampling, determinism, per-task rendering,
the eval split, classification over the union of classes, and config errors that name data.tasks.<i>.<key>."""

import json
from collections import Counter

import pytest
from transformers import AutoTokenizer

from distune.config import ConfigError, DataSection, load_config
from distune.data import DataError, load_splits


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def two_files(tmp_path):
    """Task `big`: 45 rows (40 train + 5 eval); task `small`: 15 rows (10 train + 5 eval)."""
    big = _write(tmp_path / "big.jsonl", [{"q": f"big {i}", "a": "yes"} for i in range(45)])
    small = _write(tmp_path / "small.jsonl", [{"text": f"small {i}", "label": "no"} for i in range(15)])
    return big, small


def mixture(two_files, **data) -> DataSection:
    big, small = two_files
    tasks = [{"name": "big", "path": big, "prompt": "Q: {q}", "response": "{a}"},
             {"name": "small", "path": small, "prompt": "Review: {text}", "response": "{label}"}]
    return DataSection(tasks=tasks, eval_size=5, use_chat_template=False, **data)


def _by_task(samples):
    out = {}
    for s in samples:
        out.setdefault(s.task, []).append(s)
    return out


def test_temperature_one_draws_in_proportion_to_size(two_files, tok):
    splits = load_splits(mixture(two_files), tok, seed=0)
    assert splits.stats["tasks"] == {"big": {"rows": 40, "share": 0.8, "drawn": 40},
                                     "small": {"rows": 10, "share": 0.2, "drawn": 10}}
    by_task = _by_task(splits.train)
    assert len(splits.train) == 50 and len(by_task["big"]) == 40 and len(by_task["small"]) == 10
    assert len({id(s) for s in splits.train}) == 50  # without replacement: every training row exactly once
    assert splits.stats["train_rows"] == 50 and splits.stats["eval_rows"] == 10


def test_weights_scale_a_task_share(two_files, tok):
    cfg = mixture(two_files)
    cfg.tasks[1].weight = 4.0  # 4 x 10 = 40: as heavy as `big`
    splits = load_splits(cfg, tok, seed=0)
    assert splits.stats["tasks"]["small"] == {"rows": 10, "share": 0.5, "drawn": 25}
    assert splits.stats["tasks"]["big"] == {"rows": 40, "share": 0.5, "drawn": 25}


def test_high_temperature_is_uniform_and_upsamples_the_small_task(two_files, tok):
    single = load_splits(DataSection(path=two_files[1], prompt="Review: {text}", response="{label}", eval_size=5,
                                     use_chat_template=False), tok, seed=0)
    splits = load_splits(mixture(two_files, mixture_temperature=1000.0), tok, seed=0)
    tasks = splits.stats["tasks"]
    assert tasks["big"]["drawn"] == 25 and tasks["small"]["drawn"] == 25
    assert tasks["big"]["share"] == pytest.approx(0.5, abs=1e-3)
    by_task = _by_task(splits.train)
    assert len(by_task["big"]) == 25 and len({id(s) for s in by_task["big"]}) == 25  # a subset, no repeats
    small = by_task["small"]
    # All 10 of its training rows, then 15 repeats of those same rows (never its eval rows).
    own = {tuple(s.input_ids) for s in single.train}
    assert len(small) == 25 and {tuple(s.input_ids) for s in small} == own
    assert not own & {tuple(s.input_ids) for s in single.eval}


def test_upsampling_takes_every_row_before_any_repeat(two_files, tok):
    cfg = mixture(two_files)
    cfg.tasks[1].weight = 1.13  # share 11.3 / 51.3: 11 draws from 10 rows
    splits = load_splits(cfg, tok, seed=0)
    assert splits.stats["tasks"]["small"]["drawn"] == 11 and splits.stats["tasks"]["big"]["drawn"] == 39
    repeats = Counter(tuple(s.input_ids) for s in _by_task(splits.train)["small"])
    assert sorted(repeats.values()) == [1] * 9 + [2]


def test_same_seed_same_lists_other_seed_other_order(two_files, tok):
    def lists(seed):
        splits = load_splits(mixture(two_files, mixture_temperature=3.0), tok, seed=seed)
        return [(s.task, s.input_ids) for s in splits.train], [(s.task, s.input_ids) for s in splits.eval]

    assert lists(0) == lists(0)
    assert lists(0)[0] != lists(1)[0]
    assert {t for t, _ in lists(0)[0][:20]} == {"big", "small"}  # shuffled together, not task after task


def test_eval_is_every_task_eval_split_concatenated(two_files, tok):
    big, small = two_files
    alone = [load_splits(DataSection(path=path, prompt=p, response=r, eval_size=5, use_chat_template=False),
                         tok, seed=0) for path, p, r in ((big, "Q: {q}", "{a}"), (small, "Review: {text}", "{label}"))]
    splits = load_splits(mixture(two_files, mixture_temperature=1000.0), tok, seed=0)
    assert [s.input_ids for s in splits.eval] == [s.input_ids for s in alone[0].eval + alone[1].eval]
    assert [s.task for s in splits.eval] == ["big"] * 5 + ["small"] * 5


def test_each_task_renders_with_its_own_templates(two_files, tok):
    splits = load_splits(mixture(two_files), tok, seed=0)
    for s in splits.train + splits.eval:
        prompt = tok.decode(s.prompt_ids)
        if s.task == "big":
            assert prompt.startswith("Q: big ") and s.response == "yes"
        else:
            assert prompt.startswith("Review: small ") and s.response == "no"


def test_tasks_inherit_top_level_keys_and_override_them(tmp_path, two_files, tok):
    big, small = two_files
    cfg = DataSection(path=big, prompt="Q: {q}", response="{a}", eval_size=5, use_chat_template=False,
                      design={"instruction": "Answer."},
                      tasks=[{"name": "plain"}, {"name": "other", "path": small, "prompt": "{text}",
                                                 "response": "{label}", "design": {}, "limit": 12, "eval_size": 2}])
    (_, _, plain), (_, _, other) = cfg.task_sections()
    assert (plain.path, plain.prompt, plain.design.instruction) == (big, "Q: {q}", "Answer.")
    assert (other.path, other.prompt, other.design.instruction, other.limit) == (small, "{text}", None, 12)
    splits = load_splits(cfg, tok, seed=0)
    assert splits.stats["tasks"]["other"]["rows"] == 10 and len(_by_task(splits.eval)["other"]) == 2
    assert tok.decode(_by_task(splits.eval)["plain"][0].prompt_ids).startswith("Answer.\n\nQ: big ")


def test_warnings_and_errors_name_the_task(tmp_path, two_files, tok):
    big, small = two_files
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"q": f"x{i}", "a": "y"}) + "\n" for i in range(8)) + "{oops\n")
    cfg = DataSection(tasks=[{"name": "big", "path": big, "prompt": "{q}", "response": "{a}"},
                             {"name": "messy", "path": str(bad), "prompt": "{q}", "response": "{a}",
                              "bad_rows": "skip"}], eval_size=2, use_chat_template=False)
    splits = load_splits(cfg, tok, seed=0)
    assert splits.warnings[0].startswith("[task messy] skipped 1 bad rows: ") and "bad.jsonl line 9" in splits.warnings[0]
    assert splits.stats["skipped_rows"] == 1
    cfg.tasks[1].bad_rows = "fail"
    with pytest.raises(DataError, match=r"^\[task messy\] .*bad.jsonl line 9: not valid JSON"):
        load_splits(cfg, tok, seed=0)


def test_choices_are_checked_on_every_task(two_files, tok):
    assert load_splits(mixture(two_files), tok, seed=0, choices=["yes", "no"]).eval
    with pytest.raises(DataError, match=r"\[task small\] .*small.jsonl line \d+: response 'no' is not one of"):
        load_splits(mixture(two_files), tok, seed=0, choices=["yes", "maybe"])


def test_classification_labels_are_the_union_over_tasks(tmp_path, tok):
    a = _write(tmp_path / "a.jsonl", [{"text": f"a {i}", "label": ["pos", "neg"][i % 2]} for i in range(10)])
    b = _write(tmp_path / "b.jsonl", [{"text": f"b {i}", "label": ["neg", "neutral"][i % 2]} for i in range(10)])
    cfg = DataSection(prompt="{text}", response="{label}", eval_size=2,
                      tasks=[{"name": "a", "path": a}, {"name": "b", "path": b}])
    splits = load_splits(cfg, tok, seed=0, task="sequence_classification")
    assert splits.labels == ["neg", "neutral", "pos"] and splits.stats["classes"] == 3
    assert {splits.labels[s.label] for s in _by_task(splits.train)["b"]} == {"neg", "neutral"}
    fixed = load_splits(cfg.model_copy(update={"labels": ["pos", "neg", "neutral"]}), tok, seed=0,
                        task="sequence_classification")
    assert fixed.labels == ["pos", "neg", "neutral"]
    assert [fixed.labels[s.label] for s in fixed.train] == [splits.labels[s.label] for s in splits.train]


# -- config ------------------------------------------------------------------------------------------


def _load(tiny_model, data, overrides=()):
    return load_config({"model": {"path": str(tiny_model)}, "data": data}, list(overrides))


@pytest.mark.parametrize("task, message", [
    ({"name": "b", "path": "b.jsonl", "promt": "{q}"},
     r"data\.tasks\.1\.promt: unknown key; did you mean 'data\.tasks\.1\.prompt'\?"),
    ({"name": "b", "path": "b.jsonl", "packing": True},
     r"data\.tasks\.1\.packing: applies to the whole mixture; set data\.packing instead"),
    ({"name": "b", "path": "b.jsonl", "max_length": 64}, r"data\.tasks\.1\.max_length: applies to the whole"),
    ({"name": "b"}, r"data\.tasks\.1\.path: required key is missing"),
    ({"name": "a", "path": "b.jsonl"}, r"data\.tasks\.1\.name: 'a' is already data\.tasks\.0's name"),
    ({"name": "b c", "path": "b.jsonl"}, r"data\.tasks\.1\.name: must be a plain word"),
    ({"name": "b", "path": "b.jsonl", "weight": 0}, r"data\.tasks\.1\.weight: Input should be greater than 0"),
    ({"name": "b", "path": "b.jsonl", "design": {"aspect": ["x"]}},
     r"data\.tasks\.1\.design\.aspect: unknown key; did you mean 'data\.tasks\.1\.design\.aspects'\?"),
    ({"name": "b", "path": "b.jsonl", "format": "messages", "design": {"instruction": "hi"}},
     r"data\.tasks\.1\.design\.instruction: applies to single-turn formats"),
])
def test_task_config_errors_name_the_key(tiny_model, task, message):
    with pytest.raises(ConfigError, match=message):
        _load(tiny_model, {"tasks": [{"name": "a", "path": "a.jsonl"}, task]})


def test_path_is_optional_with_tasks_only(tiny_model):
    with pytest.raises(ConfigError, match=r"data\.path: required key is missing"):
        _load(tiny_model, {"prompt": "{q}"})
    with pytest.raises(ConfigError, match=r"data\.mixture_temperature: Input should be greater than 0"):
        _load(tiny_model, {"path": "a.jsonl", "mixture_temperature": 0})


def test_task_paths_are_absolute_and_survive_a_dump_and_reload(tiny_model, tmp_path, monkeypatch):
    from distune.config import dump_config

    monkeypatch.chdir(tmp_path)
    cfg = _load(tiny_model, {"path": "top.jsonl", "system": "S", "tasks": [
        {"name": "a"}, {"name": "b", "path": "sub/b.jsonl", "system": None, "weight": 2}]})
    (_, _, a), (_, wb, b) = cfg.data.task_sections()
    assert (a.path, a.system) == (str(tmp_path / "top.jsonl"), "S")
    assert (b.path, b.system, wb) == (str(tmp_path / "sub/b.jsonl"), None, 2.0)  # an explicit null overrides
    dumped = dump_config(cfg)["data"]["tasks"]
    assert dumped == [{"name": "a", "weight": 1.0},
                      {"name": "b", "weight": 2.0, "path": str(tmp_path / "sub/b.jsonl"), "system": None}]
    monkeypatch.chdir("/")
    again = load_config(dump_config(cfg))  # as a Ray worker reads it, from another directory
    assert again.data.task_sections() == cfg.data.task_sections()


def test_cached_class_teacher_is_refused_for_mixtures(tiny_model, tiny_data, tmp_path):
    """The class cache is keyed by data line, and the tasks' files share line numbers."""
    import tiny

    from distune.validate import validate

    method = {"name": "distill", "teacher": {"path": str(tiny_model), "dtype": "fp32"}, "signal": "cached",
              "cache_dir": str(tmp_path / "cache")}
    tasks = {"tasks": [{"name": "a"}, {"name": "b", "prompt": "Review: {text}"}]}
    cfg = load_config(tiny.base_config(tiny_model, tiny_data, tmp_path, method=method, data=tasks,
                                       model={"task": "sequence_classification"}))
    with pytest.raises(ConfigError, match=r"^data\.tasks: a classifier's teacher cache is keyed by data line"):
        validate(cfg)
    lm = load_config(tiny.base_config(tiny_model, tiny_data, tmp_path, method=method, data=tasks))
    with pytest.raises(ConfigError) as other:  # a causal-LM cache is keyed by content: only the missing cache
        validate(lm)
    assert "data.tasks" not in str(other.value)
