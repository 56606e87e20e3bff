"""A catalogue of bad inputs, each through the real `distune` entry point: exit code 2, one stderr line starting
`error:` that names the problem (the key path, the file and line, or the address), no traceback, and nothing
the run directory already held is touched (its checkpoint, export and recorded config stay byte-identical).

Most cases call `distune.cli.main` in-process (seconds for the whole catalogue); three go through a real
`python -m distune` subprocess to show the exit code and the absence of a traceback end to end.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import tiny
from distune.cli import main


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: nothing listens there


@pytest.fixture(scope="module")
def w(tmp_path_factory, tiny_model, tiny_data):
    """Files every case reads: the base config (valid), a run directory that already holds a checkpoint, an
    export and its recorded config, and the bad files the cases point at."""
    from distune.config import dump_config, load_config

    root = tmp_path_factory.mktemp("bad")
    cfg = tiny.base_config(tiny_model, tiny_data, root / "runs")
    base = root / "base.yaml"
    base.write_text(yaml.safe_dump(cfg))
    run_dir = root / "runs" / "t"
    (run_dir / "step_2").mkdir(parents=True)
    (run_dir / "step_2" / "meta.json").write_text(json.dumps({"world_size": 1, "step": 2}))
    (run_dir / "step_2" / "mp_rank_00_model_states.pt").write_bytes(os.urandom(4096))
    (run_dir / "export").mkdir()
    (run_dir / "export" / "model.safetensors").write_bytes(os.urandom(4096))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(dump_config(load_config(cfg))))

    rows = tiny.sentiment_rows(40)
    no_text = [dict(r) for r in rows]
    no_text[17] = {"txt": no_text[17]["text"], "label": no_text[17]["label"]}  # file line 18
    other_vocab = root / "other-vocab"
    shutil.copytree(tiny_model, other_vocab)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(other_vocab)
    tok.add_tokens(["<only-in-teacher>"])
    tok.save_pretrained(other_vocab)
    (root / "not-a-model").mkdir()
    (root / "empty-cache").mkdir()
    files = {
        "malformed.yaml": "model:\n  path: /m\ndata: [unclosed\ntrain: {}\n",
        "duplicate.yaml": base.read_text() + "train:\n  lr: 0.1\n",
        "empty.yaml": "",
        "list.yaml": "- model\n- data\n",
        "unknown-section.yaml": base.read_text() + "trainer:\n  lr: 0.1\n",
        "empty.jsonl": "",
        "bad-row.jsonl": json.dumps(rows[0]) + "\n{'text': 'single quotes'}\n",
        "data.txt": "great movie\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "latin1.yaml").write_bytes("model:\n  path: caf\xe9\n".encode("latin-1"))
    (root / "latin1.jsonl").write_bytes('{"text": "caf\xe9 was great", "label": "positive"}\n'.encode("latin-1"))
    tiny.write_jsonl(root / "no-text.jsonl", no_text)
    return SimpleNamespace(root=root, base=base, run_dir=run_dir, model=tiny_model, other_vocab=other_vocab)


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


# id -> (argv after `distune`, text (or texts) the one error line must contain); `{x}` fields come from `w`.
CASES = {
    # the config file itself
    "config_missing": (["run", "{root}/nope.yaml"], "config file not found: {root}/nope.yaml"),
    "yaml_malformed": (["run", "{root}/malformed.yaml"], "malformed.yaml line 4: not valid YAML"),
    "yaml_duplicate_key": (["run", "{root}/duplicate.yaml"], "duplicate key 'train', first given on line"),
    "config_empty": (["run", "{root}/empty.yaml"], "empty.yaml: the file is empty"),
    "config_is_a_list": (["run", "{root}/list.yaml"], "list.yaml: the top level must be a mapping"),
    "config_not_utf8": (["run", "{root}/latin1.yaml"], "latin1.yaml: not valid UTF-8"),
    "unknown_section": (["run", "{root}/unknown-section.yaml"], "trainer: unknown key; did you mean 'train'?"),
    # keys, types and values (through overrides, which go through the same schema)
    "misspelled_key": (["run", "{base}", "train.micro_batch_sise=2"],
                       "train.micro_batch_sise: unknown key; did you mean 'train.micro_batch_size'?"),
    "override_unknown_key": (["run", "{base}", "train.learning_rate=1e-4"],
                             "train.learning_rate: unknown key; did you mean 'train.lr'?"),
    "override_without_value": (["run", "{base}", "train.lr"], "override 'train.lr': expected key.path=value"),
    "override_into_a_value": (["run", "{base}", "train.lr.x=1"], "override 'train.lr.x=1': lr is not a section"),
    "wrong_type": (["run", "{base}", "train.micro_batch_size=four"],
                   "train.micro_batch_size: Input should be a valid integer"),
    "yaml_yes_is_a_bool": (["run", "{base}", "eval.choices=[yes, no]"],
                           "eval.choices.0: Input should be a valid string (got True: YAML reads unquoted yes/no"),
    "negative_size": (["run", "{base}", "train.global_batch_size=-4"],
                      "train.global_batch_size: Input should be greater than 0 (got -4)"),
    "zero_size": (["run", "{base}", "train.micro_batch_size=0"], "train.micro_batch_size: Input should be greater "
                                                                 "than 0 (got 0)"),
    "zero_workers": (["run", "{base}", "cluster.num_workers=0"], "cluster.num_workers: Input should be greater than 0"),
    "negative_lr": (["run", "{base}", "train.lr=-0.1"], "train.lr: Input should be greater than 0 (got -0.1)"),
    "eval_fraction_out_of_range": (["run", "{base}", "data.eval_size=1.5"], "data.eval_size: a fraction must lie in"),
    "run_name_with_slash": (["run", "{base}", "run.name=a/b"], "run.name: must be a plain folder name"),
    "secret_in_config": (["run", "{base}", "cluster.env={{WANDB_API_KEY: x}}"],
                         "cluster.env: WANDB_API_KEY looks like a secret"),
    "unknown_method": (["run", "{base}", "method.name=lroa"], "method.name: unknown method 'lroa' (did you mean 'lora'?)"),
    "unknown_divergence": (["run", "{base}", "method.name=distill", "method.teacher.path={model}",
                            "method.divergence=kl2"], "method.divergence: unknown divergence 'kl2'"),
    # checks that need the model, the data or the hardware
    "batch_not_divisible": (["run", "{base}", "train.global_batch_size=6", "train.micro_batch_size=4"],
                            "train.global_batch_size=6 is not a multiple of train.micro_batch_size x "
                            "cluster.num_workers = 4 x 1 = 4"),
    "fp16_on_cpu": (["run", "{base}", "model.dtype=fp16"], "model.dtype: fp16 is not supported on CPU workers"),
    "flash_attention_on_cpu": (["run", "{base}", "model.attn_implementation=flash_attention_2"],
                               "model.attn_implementation: flash_attention_2 runs on CUDA GPUs only"),
    "loss_chunk_zero": (["run", "{base}", "train.loss_chunk=0"], "train.loss_chunk"),
    "model_missing": (["run", "{base}", "model.path={root}/no-model"], "model.path: {root}/no-model does not exist"),
    "model_dir_without_model": (["run", "{base}", "model.path={root}/not-a-model"],
                                "model.path: cannot load '{root}/not-a-model'"),
    "layers_out_of_range": (["run", "{base}", "model.layers=[0, 7]"], "model.layers: [0, 7] must pick increasing "
                                                                      "block indices within 0..1"),
    "data_missing": (["run", "{base}", "data.path={root}/no-data.jsonl"], "data.path: {root}/no-data.jsonl does "
                                                                          "not exist"),
    "data_unsupported_type": (["run", "{base}", "data.path={root}/data.txt"], "data.txt: unsupported data file type"),
    "dataset_empty": (["run", "{base}", "data.path={root}/empty.jsonl"], "{root}/empty.jsonl: no rows"),
    "row_without_column": (["run", "{base}", "data.path={root}/no-text.jsonl"],
                           "no-text.jsonl line 18: data.prompt uses column 'text'"),
    "mapped_column_absent": (["run", "{base}", "data.columns={{text: review}}"],
                             ["sentiment.jsonl line ", ": data.columns.text names column 'review', row has 'text'"]),
    "row_not_json": (["run", "{base}", "data.path={root}/bad-row.jsonl"], "bad-row.jsonl line 2: not valid JSON"),
    "data_not_utf8": (["run", "{base}", "data.path={root}/latin1.jsonl"], "latin1.jsonl: not valid utf-8"),
    "eval_size_larger_than_data": (["run", "{base}", "data.eval_size=500"],
                                   "data.eval_size=500 leaves no training rows out of 96"),
    "max_length_too_small": (["run", "{base}", "data.max_length=4"], "no trained tokens after truncation to "
                                                                     "data.max_length"),
    "warmup_beyond_the_run": (["run", "{base}", "train.warmup_steps=10"],
                              "train.warmup_steps=10 is more than the run's 4 optimizer steps"),
    "teacher_vocab_differs": (["run", "{base}", "method.name=distill", "method.teacher.path={other_vocab}"],
                              "method.teacher: teacher and student tokenizers differ (401 vs 400 tokens; first "
                              "differing token: '<only-in-teacher>')"),
    "cache_dir_without_cache": (["run", "{base}", "method.name=distill", "method.teacher.path={model}",
                                 "method.signal=cached", "method.cache_dir={root}/empty-cache"],
                                "method.cache_dir: {root}/empty-cache holds no complete teacher cache"),
    "checkpoint_from_other_config": (["run", "{base}", "model.layers=1", "train.lr=0.5"],
                                     "run.name: {run_dir} holds checkpoint step_2 written by another config: "
                                     "model.layers is None there, 1 here; train.lr is 0.001 there, 0.5 here"),
    "strict_spread_on_one_node": (["run", "{base}", "cluster.placement=STRICT_SPREAD", "cluster.num_workers=2",
                                   "train.global_batch_size=4"],
                                  "cluster.placement: STRICT_SPREAD puts each of the 2 workers on its own node"),
    "placement_unknown": (["run", "{base}", "cluster.placement=EVERYWHERE"], "cluster.placement: Input should be"),
    # cluster addresses
    "address_closed_port": (["run", "{base}", "--address", "127.0.0.1:{closed}"],
                            "--address 127.0.0.1:{closed}: nothing answers at 127.0.0.1:{closed}"),
    "address_malformed": (["run", "{base}", "--address", "head-node"], "--address head-node: expected HOST:PORT"),
    "address_is_the_dashboard": (["run", "{base}", "--address", "http://127.0.0.1:8265"],
                                 "--address http://127.0.0.1:8265: that is a dashboard (Jobs API) address"),
}


def _fill(w, text: str | list[str], closed: int) -> str | list[str]:
    if isinstance(text, list):
        return [_fill(w, t, closed) for t in text]
    return text.format(root=w.root, base=w.base, model=w.model, other_vocab=w.other_vocab, run_dir=w.run_dir,
                       closed=closed)


def _assert_one_line_error(rc, out: str, err: str, expected: str | list[str]) -> None:
    assert "Traceback" not in out + err, err
    assert rc == 2, (rc, out[-1000:], err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for part in [expected] if isinstance(expected, str) else expected:
        assert part in lines[0], lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, w, capsys):
    before = _snapshot(w.run_dir)
    closed = _closed_port()
    argv, expected = CASES[case]
    rc = main([_fill(w, a, closed) for a in argv])
    out, err = capsys.readouterr()
    _assert_one_line_error(rc, out, err, _fill(w, expected, closed))
    assert _snapshot(w.run_dir) == before  # checkpoint, export and recorded config untouched


def test_same_config_with_new_stop_point_is_accepted(w, capsys):
    """The checkpoint check refuses only what changes the recipe: stopping or logging differently resumes."""
    rc = main(["validate", str(w.base), "train.stop_after_steps=2", "wandb.mode=offline", "eval.every=2",
               "cluster.num_workers=1"])  # a resize resumes too: the shards are re-sharded
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.splitlines()[-1].startswith("ok: ")


@pytest.mark.parametrize("case", ["address_closed_port", "yaml_malformed", "row_not_json"])
def test_bad_input_end_to_end_in_a_subprocess(case, w):
    before = _snapshot(w.run_dir)
    closed = _closed_port()
    argv, expected = CASES[case]
    done = subprocess.run([sys.executable, "-m", "distune", *[_fill(w, a, closed) for a in argv]],
                          capture_output=True, text=True, timeout=300)
    _assert_one_line_error(done.returncode, done.stdout, done.stderr, _fill(w, expected, closed))
    assert _snapshot(w.run_dir) == before
