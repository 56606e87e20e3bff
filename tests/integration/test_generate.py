"""`distune generate` through the real CLI on the session's Ray cluster: the teacher writes a dataset, a
student trains on it."""

import json

import pytest
import yaml

import tiny
from distune.cli import main

MAX_NEW = "8"  # short responses keep every generate call to a few seconds


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _meta(path):
    return json.loads(path.with_name(path.name + ".meta.json").read_text())


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, tiny_model, tiny_data):
    folder = tmp_path_factory.mktemp("generate")
    path = folder / "teacher.yaml"
    path.write_text(yaml.safe_dump(tiny.base_config(tiny_model, tiny_data, folder / "runs")))
    return path


@pytest.fixture(scope="module")
def greedy(ray_cluster, config_file):
    """One greedy dataset, shared by the tests that only read it."""
    out = config_file.parent / "greedy.jsonl"
    assert main(["generate", str(config_file), "--out", str(out), "--max-new-tokens", MAX_NEW,
                 "--shards", "2", "--no-progress"]) == 0
    return out


def test_greedy_rows_are_deterministic_and_match_model_generate(greedy, config_file, tiny_model, tiny_data, capsys):
    source = [json.loads(line) for line in tiny_data.read_text().splitlines()]
    rows, meta = _rows(greedy), _meta(greedy)
    assert meta["prompts"] == len(source) and meta["rows"] == len(rows)
    assert len(rows) + meta["empty_responses"] == len(source)
    assert len(rows) >= 0.9 * len(source)
    assert all(isinstance(r["response"], str) and r["response"] for r in rows)
    assert all({"text", "label"} <= r.keys() for r in rows)
    assert meta["generated_tokens"] > 0 and meta["settings"]["temperature"] == 0.0

    # Another sharding and batch size (other left padding) gives the same greedy responses.
    again = config_file.parent / "again.jsonl"
    capsys.readouterr()
    assert main(["generate", str(config_file), "--out", str(again), "--max-new-tokens", MAX_NEW,
                 "--shards", "1", "--batch-size", "5"]) == 0
    assert _rows(again) == rows
    # One shard: its bar counts prompts as their batches finish, not the single shard.
    err = capsys.readouterr().err
    assert "generate: 100%" in err and f"{len(source)}/{len(source)}" in err and "prompt" in err

    # The first row equals a plain model.generate of its chat-rendered prompt (no padding, no Ray).
    import torch

    from distune.config import load_config
    from distune.data import Renderer
    from distune.models import load_model, load_tokenizer

    cfg = load_config(config_file)
    tok, model = load_tokenizer(str(tiny_model)), load_model(str(tiny_model))
    ids = Renderer(tok, cfg.data, "x").pair(f"Sentiment: {source[0]['text']}", "")[0]
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=int(MAX_NEW), do_sample=False,
                             pad_token_id=tok.pad_token_id, use_cache=True)
    expected = tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    first = [r for r in rows if r["text"] == source[0]["text"]]
    assert expected and first and first[0]["response"] == expected


def test_sampling_several_per_prompt(ray_cluster, config_file, tiny_data):
    out = config_file.parent / "sampled.jsonl"
    assert main(["generate", str(config_file), "--out", str(out), "--max-new-tokens", MAX_NEW,
                 "--temperature", "1.0", "--top-p", "0.9", "--num-samples", "2", "--seed", "3",
                 "--no-progress"]) == 0
    rows, meta = _rows(out), _meta(out)
    assert len(rows) + meta["empty_responses"] == 2 * meta["prompts"]
    assert meta["settings"]["num_samples"] == 2 and meta["settings"]["seed"] == 3
    assert len({r["response"] for r in rows}) > meta["prompts"]  # samples differ


def test_rationale_drops_unparsed_answers(ray_cluster, config_file):
    out = config_file.parent / "rationale.jsonl"
    assert main(["generate", str(config_file), "--out", str(out), "--max-new-tokens", MAX_NEW,
                 "--rationale", "--rationale-instruction", "Reason, then: Answer: <label>", "--no-progress"]) == 0
    rows, meta = _rows(out), _meta(out)
    # A random tiny model almost never writes an "Answer:" line: those rows are counted and dropped.
    assert meta["unparsed_answers"] > 0.5 * meta["prompts"]
    assert len(rows) == meta["prompts"] - meta["unparsed_answers"] - meta["empty_responses"]
    assert meta["settings"]["rationale_instruction"] == "Reason, then: Answer: <label>"
    assert all({"rationale", "answer", "response"} <= r.keys() for r in rows)


def test_answer_line_parsing():
    from distune.generate import _columns

    got = _columns("It says great.\nSo positive.\nanswer:  positive \nextra", rationale=True)
    assert got == {"rationale": "It says great.\nSo positive.", "answer": "positive",
                   "response": "It says great.\nSo positive.\nAnswer: positive"}
    assert _columns("Answer: a\nAnswer: b", rationale=True)["answer"] == "b"
    assert _columns("no answer here", rationale=True) is None
    assert _columns("Answer:", rationale=True) is None


def test_refuses_to_overwrite_without_force(greedy, config_file, capsys):
    before = greedy.read_bytes()
    argv = ["generate", str(config_file), "--out", str(greedy), "--max-new-tokens", "2", "--no-progress"]
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err
    assert greedy.read_bytes() == before
    assert not list(greedy.parent.glob(".*.tmp"))


def test_missing_prompt_column_names_the_line(ray_cluster, config_file, capsys):
    rows = tiny.sentiment_rows(40)
    rows[4] = {"review": rows[4]["text"], "label": rows[4]["label"]}  # line 5 lacks the prompt's column
    data = tiny.write_jsonl(config_file.parent / "holes.jsonl", rows)
    out = config_file.parent / "never.jsonl"
    assert main(["generate", str(config_file), f"data.path={data}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "line 5: data.prompt uses column 'text'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_prompts_only_file_with_empty_response_template(ray_cluster, config_file):
    prompts = [{"text": r["text"]} for r in tiny.sentiment_rows(24)]  # no reference column at all
    data = tiny.write_jsonl(config_file.parent / "prompts.jsonl", prompts)
    out = config_file.parent / "from_prompts.jsonl"
    assert main(["generate", str(config_file), f"data.path={data}", "data.response=", "--out", str(out),
                 "--max-new-tokens", "2", "--batch-size", "1", "--no-progress"]) == 0
    assert _meta(out)["prompts"] == 24 and all(r.keys() == {"text", "response"} for r in _rows(out))


def test_student_trains_on_generated_data(greedy, tiny_model, tmp_path):
    from distune.training import fit
    from distune.config import load_config

    cfg = load_config(tiny.base_config(tiny_model, greedy, tmp_path / "runs", data={"response": "{response}"},
                                       method={"name": "full"}, train={"max_steps": 2},
                                       cluster={"num_workers": 1}))
    fit(cfg, str(tiny_model), show_progress=False)
    assert json.loads((cfg.run_dir / "results.json").read_text())["step"] == 2
