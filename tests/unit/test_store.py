"""The tokenized store: the micro-batches a rank reads from it are byte-identical to the in-memory loader's (each
task head, packing, length grouping, mixtures, skipped rows), resume, the key (rebuilt on a template change,
reused otherwise), one tokenizer call per chunk, bad rows named by file and line."""

import json
import os

import pytest
import torch
from transformers import AutoTokenizer

import tiny
from distune.config import load_config
from distune.data import DataError, load_splits
from distune.data.prepare import open_splits, prepare, store_path
from distune.data import rendering
from distune.data.rendering import in_process, process_pool
from distune.data.store import StoredSamples
from distune.feeds import build_feeds

WORLD, BATCHES = 2, 100
NER_COLUMNS = {"tokens": "words", "tags": "ner"}


def _cfg(model_dir, data_file, tmp_path, model=None, **data):
    return load_config(tiny.base_config(model_dir, data_file, tmp_path / "runs", model=model or {},
                                        data={"store_dir": str(tmp_path / "stores"), **data}))


def _batches(cfg, splits, rank: int, n: int = BATCHES) -> list[dict]:
    feeds, _ = build_feeds(cfg, splits, None, cfg.grad_accum_steps(), rank, WORLD, 0)
    out = []
    for epoch, b, batch in feeds[0].batches.iterate(0, 0):
        out.append({k: (v.dtype, tuple(v.shape), v.numpy().tobytes()) for k, v in batch.items()})
        if len(out) == n:
            return out


def _same_splits(cfg, tok, runner=in_process):
    today = load_splits(cfg.data, tok, cfg.run.seed, cfg.eval.choices, cfg.model.task)
    stored = open_splits(prepare(cfg, tok, runner))
    for rank in range(WORLD):
        assert _batches(cfg, stored, rank) == _batches(cfg, today, rank), f"rank {rank}"
    assert list(stored.eval) == list(today.eval)
    assert (stored.labels, stored.truncated, stored.warnings) == (today.labels, today.truncated, today.warnings)
    calls = stored.stats.pop("tokenizer_calls", None)
    assert stored.stats == json.loads(json.dumps(today.stats))
    return stored, calls


@pytest.fixture(scope="module")
def dec_tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def enc_tok(tiny_encoder):
    return AutoTokenizer.from_pretrained(tiny_encoder)


@pytest.mark.parametrize("data", [{}, {"packing": True}, {"group_by_length": True}],
                         ids=["plain", "packed", "grouped"])
def test_causal_lm_batches_from_the_store_equal_the_loaders(tiny_model, tiny_data, tmp_path, dec_tok, data):
    cfg = _cfg(tiny_model, tiny_data, tmp_path, **data)
    stored, calls = _same_splits(cfg, dec_tok)
    assert isinstance(stored.train, StoredSamples)
    rows = len(stored.train) + len(stored.eval)
    assert calls <= rows  # batched: a call per chunk, not two per row
    if data.get("packing"):
        assert stored.train.packed_groups() is not None  # packed once, by the prepare step


def test_classifier_head_batches_equal(tiny_model, tiny_data, tmp_path, dec_tok):
    cfg = _cfg(tiny_model, tiny_data, tmp_path, model={"task": "sequence_classification"})
    stored, _ = _same_splits(cfg, dec_tok)
    assert stored.labels == ["negative", "positive"]


def test_token_and_span_head_batches_equal(tiny_encoder, tmp_path, enc_tok):
    ner = tiny.write_jsonl(tmp_path / "ner.jsonl", tiny.ner_rows(48))
    _same_splits(_cfg(tiny_encoder, ner, tmp_path, model={"task": "token_classification"}, columns=NER_COLUMNS,
                      prompt="", response=""), enc_tok)
    qa = tiny.write_jsonl(tmp_path / "qa.jsonl", tiny.qa_rows(48))
    _same_splits(_cfg(tiny_encoder, qa, tmp_path, model={"task": "question_answering"}, prompt="", response=""),
                 enc_tok)


def test_mixture_and_its_task_splits_equal(tiny_model, tmp_path, dec_tok):
    a = tiny.write_jsonl(tmp_path / "a.jsonl", tiny.sentiment_rows(40, seed=1))
    b = tiny.write_jsonl(tmp_path / "b.jsonl", tiny.sentiment_rows(16, seed=2))
    cfg = _cfg(tiny_model, a, tmp_path, path=None, packing=True, mixture_temperature=3.0,
               tasks=[{"name": "big", "path": str(a)}, {"name": "small", "path": str(b), "eval_size": 4}])
    stored, _ = _same_splits(cfg, dec_tok)
    assert {s.task for s in stored.train} == {"big", "small"}
    today = load_splits(cfg.data, dec_tok, 0)
    for name in ("big", "small"):
        assert list(stored.tasks[name].train) == list(today.tasks[name].train)


def test_skipped_bad_rows_in_the_eval_rows_keep_the_order(tiny_model, tmp_path, dec_tok):
    rows = tiny.sentiment_rows(60)
    for i in (3, 5, 40):
        rows[i] = {"text": "no label column"}
    path = tiny.write_jsonl(tmp_path / "bad.jsonl", rows)
    # Several instructions: an eval row renders with the first, a training row with a seeded one.
    design = {"instruction": ["Classify:", "Which sentiment?", "Label it:"]}
    cfg = _cfg(tiny_model, path, tmp_path, bad_rows="skip", eval_size=12, design=design)
    stored, _ = _same_splits(cfg, dec_tok)
    assert stored.stats["skipped_rows"] == 3


def test_a_process_pool_prepares_the_same_store(tiny_model, tiny_data, tmp_path, dec_tok, monkeypatch):
    monkeypatch.setattr(rendering, "CHUNK_ROWS", 16)  # several chunks, finished out of order by two workers
    cfg = _cfg(tiny_model, tiny_data, tmp_path)
    one = prepare(cfg, dec_tok, in_process, tmp_path / "one")
    two = prepare(cfg, dec_tok, process_pool(2, least=0), tmp_path / "two")
    assert tiny.tree_bytes(one) == tiny.tree_bytes(two)


def test_resume_mid_epoch_from_the_store_equals_an_uninterrupted_run(tiny_model, tiny_data, tmp_path, dec_tok):
    cfg = _cfg(tiny_model, tiny_data, tmp_path)
    feeds, _ = build_feeds(cfg, open_splits(prepare(cfg, dec_tok, in_process)), None, 1, 1, WORLD, 0)
    stream = feeds[0].batches.iterate(0, 0)
    straight = [next(stream) for _ in range(30)]
    epoch, b, _ = straight[17]
    resumed = feeds[0].batches.iterate(epoch, b)
    for want in straight[17:]:
        got = next(resumed)
        assert got[:2] == want[:2] and all(torch.equal(got[2][k], want[2][k]) for k in want[2])


def test_the_store_is_reused_until_a_template_the_data_or_the_tokenizer_changes(tiny_model, tmp_path, dec_tok):
    data = tiny.write_jsonl(tmp_path / "d.jsonl", tiny.sentiment_rows(40))
    cfg = _cfg(tiny_model, data, tmp_path)
    first = prepare(cfg, dec_tok, in_process)
    built = (first / "meta.json").stat().st_mtime_ns
    assert prepare(cfg, dec_tok, in_process) == first and (first / "meta.json").stat().st_mtime_ns == built
    dec_tok(["a b c"], truncation=True, max_length=2)  # leaves truncation state in the tokenizer: not a new store
    assert store_path(cfg, dec_tok) == first
    other = _cfg(tiny_model, data, tmp_path, prompt="Review: {text}")
    assert store_path(other, dec_tok) != first
    assert open_splits(prepare(other, dec_tok, in_process)).train[0].input_ids != open_splits(first).train[0].input_ids
    changed = AutoTokenizer.from_pretrained(tiny_model)
    changed.chat_template = changed.chat_template + "{{ eos_token }}"
    assert store_path(cfg, changed) != first
    tiny.write_jsonl(data, tiny.sentiment_rows(40, seed=5))
    os.utime(data, ns=(built + 10**9, built + 10**9))
    assert store_path(cfg, dec_tok) != first


def test_bad_rows_name_file_and_line_and_leave_no_store(tiny_model, tmp_path, dec_tok):
    rows = [json.dumps(r) for r in tiny.sentiment_rows(30)]
    rows[6] = '{"text": "cut off'
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(rows) + "\n")
    cfg = _cfg(tiny_model, path, tmp_path)
    with pytest.raises(DataError, match=r"broken.jsonl line 7: not valid JSON"):
        prepare(cfg, dec_tok, in_process)
    rows[6] = json.dumps({"text": "no label"})
    path.write_text("\n".join(rows) + "\n")
    cfg = _cfg(tiny_model, path, tmp_path)
    with pytest.raises(DataError, match=r"broken.jsonl line 7: data.response uses column 'label'"):
        prepare(cfg, dec_tok, in_process)
    assert not list((tmp_path / "stores").glob("*")), "a failed prepare leaves nothing behind"


def test_prepare_command_builds_then_reuses_the_store(tiny_model, tiny_data, tmp_path, capsys):
    import yaml

    from distune.cli import main

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny.base_config(tiny_model, tiny_data, tmp_path / "runs",
                                                    data={"store_dir": str(tmp_path / "stores")})))
    assert main(["prepare", str(path), "--local", "--workers", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "88 training / 8 eval samples" in out and "tokenizer calls" in out
    assert main(["prepare", str(path), "--local"]) == 0
    assert "(complete; --force rebuilds it)" in capsys.readouterr().out
    assert main(["prepare", str(path), "--local", "--workers", "1", 'data.prompt="Say {missing}"']) == 2
    assert "data.prompt uses column 'missing'" in capsys.readouterr().err
    pipeline = tmp_path / "pipe.yaml"
    pipeline.write_text(yaml.safe_dump({"stages": {"one": {"base": str(path)}}}))
    assert main(["prepare", str(pipeline), "--local"]) == 2
    assert "is a pipeline (it has stages:)" in capsys.readouterr().err


def test_validate_on_a_sample_reads_every_row_renders_a_few_and_estimates(tiny_model, tmp_path):
    from distune.validate import validate

    rows = [json.dumps(r) for r in tiny.sentiment_rows(3000)]
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(rows) + "\n")
    cfg = _cfg(tiny_model, path, tmp_path, eval_size=None)
    sampled = validate(cfg, sample=300)
    assert sampled["sampled_rows"] == 300 and not list((tmp_path / "stores").glob("*")), "no store built"
    assert any("checked a sample of 300 rows" in w for w in sampled["warnings"])
    full = validate(cfg)  # builds the store; from then on validate reads its exact figures
    assert (sampled["train_rows"], sampled["eval_rows"]) == (full["train_rows"], full["eval_rows"]) == (2700, 300)
    assert sampled["total_steps"] == full["total_steps"]
    assert validate(cfg, sample=300).get("sampled_rows") is None
    rows[2900] = '{"text": "cut'
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"big.jsonl line 2901: not valid JSON"):
        validate(_cfg(tiny_model, path, tmp_path, eval_size=None), sample=300)


def test_parquet_and_datasets_folders_are_read_as_arrow_and_render_as_jsonl_does(tiny_model, tmp_path, dec_tok):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distune.data.dataset import sampled_rows
    from distune.data.sources import TableRows

    rows = tiny.sentiment_rows(60)
    jsonl = tiny.write_jsonl(tmp_path / "d.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "folder"))
    held = tiny.sentiment_rows(10, seed=3)
    pq.write_table(pa.Table.from_pylist(held), tmp_path / "held.parquet")
    tiny.write_jsonl(tmp_path / "held.jsonl", held)

    def samples(path, **data):
        cfg = _cfg(tiny_model, path, tmp_path, **data)
        splits = load_splits(cfg.data, dec_tok, 0)
        return [(s.input_ids, s.labels, s.line) for s in list(splits.train) + list(splits.eval)]

    want = samples(jsonl)
    for arrow in (tmp_path / "d.parquet", tmp_path / "folder"):
        assert isinstance(sampled_rows(_cfg(tiny_model, arrow, tmp_path).data, 0)[1], TableRows)  # no dict per row
        assert samples(arrow) == want
    with_eval = samples(jsonl, eval_size=None, eval_path=str(tmp_path / "held.jsonl"))
    assert samples(tmp_path / "d.parquet", eval_size=None, eval_path=str(tmp_path / "held.parquet")) == with_eval
    assert min(line for _, _, line in with_eval) == -10  # the eval file's rows, numbered negatively


def test_a_killed_prepare_leaves_nothing_the_next_one_keeps(tiny_model, tiny_data, tmp_path, dec_tok):
    import socket
    import subprocess

    cfg = _cfg(tiny_model, tiny_data, tmp_path)
    path = store_path(cfg, dec_tok)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    abandoned = path.parent / f".{path.name}.{socket.gethostname()}-{gone.pid}-0000"
    (abandoned / "train").mkdir(parents=True)
    prepare(cfg, dec_tok, in_process)
    assert not abandoned.exists() and [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_split_lets_go_of_the_pages_it_read(tmp_path):
    """The loader releases what it read (madvise DONTNEED): the store's pages leave the rank's resident set."""
    from distune.data import Sample
    from distune.data.store import SplitWriter

    writer = SplitWriter(tmp_path / "train")
    writer.add([Sample(list(range(i, i + 2048)), [-100] * 2048, i + 1) for i in range(256)])  # 2 MiB of ids
    view = StoredSamples(tmp_path / "train", writer.close())

    def resident() -> int:  # kB of input_ids.values mapped in this process
        lines = open("/proc/self/smaps").read().split("\n")
        at = [i for i, line in enumerate(lines) if line.endswith("input_ids.values")]
        return sum(int(lines[j].split()[1]) for i in at for j in range(i, i + 20) if lines[j].startswith("Rss:"))

    assert sum(len(s.input_ids) for s in view) == 256 * 2048
    assert resident() >= 2048  # every page was read
    view.release()
    assert resident() == 0 and view[255].input_ids[-1] == 255 + 2047  # and still readable


def test_an_empty_eval_split_is_stored_and_read(tiny_model, tiny_data, tmp_path, dec_tok):
    cfg = _cfg(tiny_model, tiny_data, tmp_path, eval_size=0)
    stored, _ = _same_splits(cfg, dec_tok)
    assert len(stored.eval) == 0 and len(stored.eval.lengths) == 0 and list(stored.eval) == []
