import json

import pytest
from transformers import AutoTokenizer

from distune.config import DataSection
from distune.data import IGNORE, DataError, Renderer, ShardedBatches, collate, load_splits, read_rows
from distune.data.render import Sample


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def _trained_text(tok, sample):
    return tok.decode([t for t in sample.labels if t != IGNORE])


def test_chat_template_trains_only_the_response(tok):
    r = Renderer(tok, DataSection(path="x", prompt="Sentiment: {text}", response="{label}"), "x")
    s = r.render(3, {"text": "great day", "label": "positive"})
    assert _trained_text(tok, s) == "positive<|end|>\n"
    assert tok.decode(s.input_ids) == "<|user|>Sentiment: great day<|end|>\n<|assistant|>positive<|end|>\n"
    assert s.labels[: len(s.prompt_ids)] == [IGNORE] * len(s.prompt_ids)


def test_train_on_inputs_trains_everything(tok):
    r = Renderer(tok, DataSection(path="x", prompt="{text}", response="{label}", train_on_inputs=True), "x")
    s = r.render(1, {"text": "sad movie", "label": "negative"})
    assert s.labels == s.input_ids


def test_plain_template_appends_eos_when_chat_template_off(tok):
    r = Renderer(tok, DataSection(path="x", prompt="Q: {text}\nA: ", response="{label}", use_chat_template=False),
                 "x")
    s = r.render(1, {"text": "fun trip", "label": "positive"})
    assert s.input_ids[-1] == tok.eos_token_id
    assert _trained_text(tok, s) == "positive<|end|>"


def test_plain_template_keeps_the_response_templates_leading_space(tok):
    """'A: positive' continues the prompt: the space is part of the response (as eval.choices scores it), while
    the chat template, which starts a new turn, takes the answer stripped."""
    plain = Renderer(tok, DataSection(path="x", prompt="A:", response=" {label}", use_chat_template=False), "x")
    s = plain.render(1, {"text": "fun trip", "label": "positive"})
    assert s.input_ids == s.prompt_ids + plain.pair("", " positive")[1]  # what eval scores for choice " positive"
    assert _trained_text(tok, s) == " positive<|end|>"
    chat = Renderer(tok, DataSection(path="x", prompt="{text}", response=" {label}"), "x")
    assert chat.render(1, {"text": "fun trip", "label": "positive"}).response == "positive"


def test_messages_train_assistant_turns_only(tok):
    r = Renderer(tok, DataSection(path="x", format="messages"), "x")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "good"},
            {"role": "user", "content": "and"}, {"role": "assistant", "content": "bad"}]
    s = r.render(1, {"messages": msgs})
    assert _trained_text(tok, s) == "good<|end|>\nbad<|end|>\n"
    assert tok.decode(s.input_ids).count("<|user|>") == 2


def test_messages_row_errors_name_line(tok):
    r = Renderer(tok, DataSection(path="x", format="messages"), "f.jsonl")
    with pytest.raises(DataError, match="f.jsonl line 7: no assistant turn"):
        r.render(7, {"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(DataError, match=r"f.jsonl line 8: messages\[0\] needs role"):
        r.render(8, {"messages": [{"role": "bot", "content": "hi"}]})


def test_missing_column_names_line_and_columns(tok):
    r = Renderer(tok, DataSection(path="x", prompt="{review}"), "f.csv")
    with pytest.raises(DataError, match="f.csv line 4: data.prompt uses column 'review', row has 'text'"):
        r.render(4, {"text": "a"})


def test_bad_json_line_reported(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"d.jsonl line 3: not valid JSON"):
        list(read_rows(f))


def test_csv_rows_carry_line_numbers_and_extra_cells_fail(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('prompt,response\n"multi\nline",x\nb,y\nc,z,extra\n')
    rows = read_rows(f)
    assert next(rows) == (2, {"prompt": "multi\nline", "response": "x"})
    assert next(rows) == (4, {"prompt": "b", "response": "y"})
    with pytest.raises(DataError, match=r"d.csv line 5: 3 cells, header has 2"):
        next(rows)


def test_undecodable_bytes_error_or_replace(tmp_path):
    f = tmp_path / "d.csv"
    f.write_bytes(b"prompt,response\ncaf\xe9,x\n")
    with pytest.raises(DataError, match="not valid utf-8.*encoding_errors: replace"):
        list(read_rows(f))
    assert list(read_rows(f, errors="replace"))[0][1]["prompt"] == "caf\ufffd"


def test_truncation_to_empty_loss_mask_fails_fast_naming_line(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"prompt": "word " * n, "response": "ok"}) + "\n" for n in (1, 40, 1, 1)))
    cfg = DataSection(path=str(f), max_length=16, eval_size=1)
    with pytest.raises(DataError, match=r"d.jsonl line 2: no trained tokens after truncation"):
        load_splits(cfg, tok, seed=0)


def test_eval_choices_must_cover_labels(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"prompt": "p", "response": r}) + "\n" for r in ["yes", "no", "maybe", "no"]))
    with pytest.raises(DataError, match="is not one of eval.choices"):
        load_splits(DataSection(path=str(f), eval_size=3), tok, seed=0, choices=["yes", "no"])


def test_collate_refuses_batch_without_trained_tokens():
    s = Sample([1, 2, 3], [IGNORE] * 3, line=9)
    with pytest.raises(DataError, match="no trained tokens .*source lines 9"):
        collate([s], pad_id=0)
    ok = collate([Sample([1, 2, 3], [IGNORE, 2, 3], 1), Sample([5], [IGNORE], 2)], pad_id=0)
    assert ok["input_ids"].tolist() == [[1, 2, 3], [5, 0, 0]]
    assert ok["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ok["labels"].tolist() == [[IGNORE, 2, 3], [IGNORE] * 3]


def _samples(n):
    return [Sample([i, i + 1], [i, i + 1], i) for i in range(n)]


def test_sharded_batches_are_disjoint_across_ranks_and_resume_exactly():
    samples = _samples(21)
    ranks = [ShardedBatches(samples, 2, r, 2, seed=3, pad_id=0) for r in range(2)]
    assert ranks[0].per_epoch == 5  # 21 // 2 = 10 per rank, 5 batches of 2
    seen = [set(ranks[r].order(0)) for r in range(2)]
    assert not seen[0] & seen[1]
    continuous = ranks[0].iterate(0, 0)
    first = [next(continuous) for _ in range(12)]  # crosses into epoch 2
    resumed = ranks[0].iterate(1, 1)  # position after 6 batches = (epoch 1, batch 1)
    for (e, b, batch), (e2, b2, batch2) in zip(first[6:], [next(resumed) for _ in range(6)]):
        assert (e, b) == (e2, b2) and batch["input_ids"].equal(batch2["input_ids"])
    assert ranks[0].order(0) != ranks[0].order(1)  # a new order every epoch


def _rows(path, responses, start=0):
    path.write_text("".join(json.dumps({"prompt": f"p{start + i}", "response": r}) + "\n"
                            for i, r in enumerate(responses)))
    return path


def test_eval_path_holds_every_eval_row_and_train_file_only_trains(tmp_path, tok):
    train = _rows(tmp_path / "train.jsonl", ["yes", "no"] * 5)
    held = _rows(tmp_path / "held.jsonl", ["no", "yes", "no"], start=100)
    splits = load_splits(DataSection(path=str(train), eval_path=str(held), limit=6), tok, seed=0,
                         choices=["yes", "no"])
    assert [s.line for s in splits.eval] == [-1, -2, -3]  # the held file's lines, negated, in file order
    assert [tok.decode(s.prompt_ids).count("p10") for s in splits.eval] == [1, 1, 1]
    assert len(splits.train) == 6 and all(s.line > 0 for s in splits.train)  # data.limit cuts training rows only
    assert splits.stats["eval_rows"] == 3


def test_eval_path_errors_name_the_eval_file_and_key(tmp_path, tok):
    train = _rows(tmp_path / "train.jsonl", ["yes", "no"] * 3)
    held = _rows(tmp_path / "held.jsonl", ["yes", "maybe"])
    with pytest.raises(DataError, match=r"held.jsonl line 2: response 'maybe' is not one of eval.choices"):
        load_splits(DataSection(path=str(train), eval_path=str(held)), tok, seed=0, choices=["yes", "no"])
    with pytest.raises(DataError, match=r"data.eval_path: .*nope.jsonl does not exist"):
        load_splits(DataSection(path=str(train), eval_path=str(tmp_path / "nope.jsonl")), tok, seed=0)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"data.eval_path: .*empty.jsonl has no rows"):
        load_splits(DataSection(path=str(train), eval_path=str(tmp_path / "empty.jsonl")), tok, seed=0)


def test_eval_path_with_skipped_bad_rows_keeps_training_rows_out_of_eval(tmp_path, tok):
    train = _rows(tmp_path / "train.jsonl", ["yes", "no"] * 3)
    held = tmp_path / "held.jsonl"
    held.write_text('{"prompt": "a", "response": "yes"}\n{"prompt": oops}\n')
    splits = load_splits(DataSection(path=str(train), eval_path=str(held), bad_rows="skip"), tok, seed=0)
    assert [s.line for s in splits.eval] == [-1] and len(splits.train) == 6
    assert "held.jsonl line 2" in splits.warnings[0]


def test_eval_path_and_eval_size_together_are_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="data.eval_size: not used with data.eval_path"):
        DataSection(path="a.jsonl", eval_path="b.jsonl", eval_size=5)
    with pytest.raises(ValidationError, match="data.eval_path: a hub id is not read here"):
        DataSection(path="a.jsonl", eval_path="hf:org/set")


def test_eval_path_config_survives_the_dump_the_workers_load(tmp_path):
    from distune.config import dump_config, load_config

    cfg = load_config({"model": {"path": "m"}, "data": {"path": "a.jsonl", "eval_path": "b.jsonl"}})
    again = load_config(dump_config(cfg))  # what every Ray worker does with the driver's config
    assert again.data.eval_path == cfg.data.eval_path and again.data.eval_size is None
    assert load_config(cfg.model_dump(mode="json")).data.eval_path == cfg.data.eval_path


def test_skip_takes_rows_past_another_runs_sample(tmp_path):
    from distune.data.dataset import sampled_rows

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r"}) + "\n" for i in range(50)))
    _, everything = sampled_rows(DataSection(path=str(path)), seed=3)
    _, first = sampled_rows(DataSection(path=str(path), limit=20), seed=3)
    _, after = sampled_rows(DataSection(path=str(path), skip=20, limit=25), seed=3)
    assert first == everything[:20] and after == everything[20:45]  # the same order, disjoint
    with pytest.raises(DataError, match="data.skip: 50 passes over all 50 rows"):
        sampled_rows(DataSection(path=str(path), skip=50), seed=3)


def test_default_eval_split_is_a_tenth_at_most_a_thousand_rows(tmp_path):
    """data.eval_size unset: 10 % of the rows, but no more than 1,000 (a 12,000-row file holds out 1,000)."""
    import tiny
    from distune.data.dataset import split_rows

    for n, held in ((500, 50), (12_000, 1_000)):
        path = tiny.write_jsonl(tmp_path / f"{n}.jsonl", [{"text": f"row {i}", "label": "positive"} for i in range(n)])
        assert split_rows(DataSection(path=str(path), prompt="{text}", response="{label}"), 0)[2] == held
        assert split_rows(DataSection(path=str(path), prompt="{text}", response="{label}", eval_size=0.2), 0)[2] == n // 5
