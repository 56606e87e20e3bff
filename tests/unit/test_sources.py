"""Data sources and row formats: JSONL / CSV / parquet / datasets folders, column renames, alpaca and sharegpt,
and the bad-row policy (fail naming file and line, or skip and count)."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from distune.config import DataSection
from distune.data import IGNORE, DataError, Renderer, load_splits, read_rows

ROWS = [{"q": f"question {i}", "a": "yes" if i % 2 else "no"} for i in range(12)]


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def _trained(tok, s):
    return tok.decode([t for t in s.labels if t != IGNORE])


def test_parquet_and_datasets_folder_give_the_same_samples_as_jsonl(tmp_path, tok):
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "flat"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:3])}).save_to_disk(str(tmp_path / "dict"))
    common = dict(prompt="{q}", response="{a}", eval_size=2)
    want = load_splits(DataSection(path=str(jl), **common), tok, seed=3)
    for path in ("d.parquet", "flat", "dict"):
        got = load_splits(DataSection(path=str(tmp_path / path), **common), tok, seed=3)
        assert [s.input_ids for s in got.train] == [s.input_ids for s in want.train], path
        assert [s.labels for s in got.eval] == [s.labels for s in want.eval], path
    assert len(list(read_rows(tmp_path / "dict", split="test"))) == 3
    with pytest.raises(DataError, match="data.split: .* has splits \\['test', 'train'\\], not 'dev'"):
        list(read_rows(tmp_path / "dict", split="dev"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="written by save_to_disk"):
        list(read_rows(tmp_path / "empty"))


def test_parquet_errors_name_the_row(tmp_path, tok):
    pq.write_table(pa.Table.from_pylist([{"q": "a", "b": "x"}, {"q": "b", "b": "y"}]), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d.parquet row 1: data.response uses column 'a'"):
        load_splits(DataSection(path=str(tmp_path / "d.parquet"), prompt="{q}", response="{a}", eval_size=1),
                    tok, seed=0)


def test_column_renames(tmp_path, tok):
    r = Renderer(tok, DataSection(path="x", columns={"prompt": "q", "response": "a"}), "f.jsonl")
    assert _trained(tok, r.render(1, {"q": "is it?", "a": "yes"})).startswith("yes")
    with pytest.raises(DataError, match="f.jsonl line 5: data.columns.prompt names column 'q'"):
        r.render(5, {"question": "is it?", "a": "yes"})


def test_alpaca_rows(tok):
    r = Renderer(tok, DataSection(path="x", format="alpaca", use_chat_template=False), "f.jsonl")
    s = r.render(1, {"instruction": "Translate to French.", "input": "cat", "output": "chat"})
    assert tok.decode(s.prompt_ids) == "Translate to French.\n\ncat" and s.response == "chat"
    assert tok.decode(r.render(2, {"instruction": "Say hi.", "input": "", "output": "hi"}).prompt_ids) == "Say hi."
    with pytest.raises(DataError, match="f.jsonl line 3: alpaca rows need a string 'output'"):
        r.render(3, {"instruction": "x"})


def test_sharegpt_trains_assistant_turns_only(tok):
    r = Renderer(tok, DataSection(path="x", format="sharegpt"), "f.jsonl")
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"},
            {"from": "gpt", "value": "four"}, {"from": "human", "value": "and 3+3?"}, {"from": "gpt", "value": "six"}]
    trained = _trained(tok, r.render(1, {"conversations": conv}))
    assert "four" in trained and "six" in trained and "2+2" not in trained and "Be brief" not in trained
    with pytest.raises(DataError, match=r"f.jsonl line 2: conversations\[0\] needs 'from'"):
        r.render(2, {"conversations": [{"from": "robot", "value": "x"}]})


def _bad_file(tmp_path):
    f = tmp_path / "d.jsonl"
    lines = [json.dumps({"prompt": f"p{i}", "response": "r"}) for i in range(10)]
    lines[3] = "{not json"
    lines[6] = json.dumps({"prompt": "p6"})  # no response column
    lines[8] = json.dumps(["a", "list"])
    f.write_text("\n".join(lines) + "\n")
    return f


def test_bad_rows_fail_by_default_naming_the_line(tmp_path, tok):
    with pytest.raises(DataError, match=r"d.jsonl line 4: not valid JSON .*data.bad_rows: skip"):
        load_splits(DataSection(path=str(_bad_file(tmp_path)), eval_size=2), tok, seed=0)


def test_bad_rows_skip_counts_and_names_them(tmp_path, tok):
    splits = load_splits(DataSection(path=str(_bad_file(tmp_path)), eval_size=2, bad_rows="skip"), tok, seed=0)
    assert splits.stats["skipped_rows"] == 3 and len(splits.train) + len(splits.eval) == 7
    assert splits.warnings[0].startswith("skipped 3 bad rows")
    for where in ("line 4: not valid JSON", "line 7: data.response uses column 'response'",
                  "line 9: expected a JSON object"):
        assert where in splits.warnings[0]


def test_csv_row_with_missing_or_extra_cells(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("prompt,response\na,b\nonly-one\nx,y,z\nc,d\n")
    with pytest.raises(DataError, match="d.csv line 3: 1 cells, header has 2"):
        list(read_rows(f))
    bad = []
    assert [n for n, _ in read_rows(f, on_bad=bad.append)] == [2, 5]
    assert "line 4: 3 cells" in bad[1]


def test_warns_when_samples_train_on_every_token(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r"}) + "\n" for i in range(6)))
    quiet = load_splits(DataSection(path=str(f), eval_size=1), tok, seed=0)
    assert not quiet.warnings
    loud = load_splits(DataSection(path=str(f), eval_size=1, train_on_inputs=True), tok, seed=0)
    assert loud.warnings == ["5 of 5 training samples train on every token (data.train_on_inputs: true): the model "
                             "learns to write prompts too"]
