"""The data layer's options reach the Ray workers intact: a two-task mixture from JSONL + parquet, alpaca rows,
instruction phrasings, length grouping, ZeRO-2 with 2 workers."""

import json

import pyarrow as pa
import pyarrow.parquet as pq

import tiny
from distune.training import fit
from distune.validate import validate


def test_mixture_of_two_formats_trains_on_ray(ray_cluster, make_config, tiny_data, tmp_path):
    rows = [json.loads(line) for line in tiny_data.read_text().splitlines()]
    alpaca = [{"instruction": "Label the sentiment.", "input": r["text"], "output": r["label"]} for r in rows[:40]]
    pq.write_table(pa.Table.from_pylist(alpaca), tmp_path / "alpaca.parquet")
    cfg = make_config(
        run={"name": "mix"}, deepspeed={"stage": 2}, cluster={"num_workers": 2},
        train={"max_steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3},
        data={"group_by_length": True, "mixture_temperature": 2.0, "tasks": [
            {"name": "plain", "design": {"instruction": ["Sentiment?", "How does it feel?"]}},
            {"name": "alpaca", "path": str(tmp_path / "alpaca.parquet"), "format": "alpaca", "prompt": "{prompt}",
             "response": "{response}", "eval_size": 4, "weight": 2.0}]})
    summary = validate(cfg)
    tasks = summary["tasks"]
    assert tasks["plain"]["rows"] == 88 and tasks["alpaca"]["rows"] == 36
    # T=2: shares ∝ sqrt(1·88) : sqrt(2·36) -> 0.525 : 0.475 of 124 training samples
    assert (tasks["plain"]["drawn"], tasks["alpaca"]["drawn"]) == (65, 59)
    assert summary["eval_rows"] == 12
    fit(cfg, str(cfg.model.path), show_progress=False)
    res = json.loads((cfg.run_dir / "results.json").read_text())
    assert res["step"] == 4 and "eval/loss" in res["after"]


def test_ray_data_prepares_the_same_store_as_a_local_process(ray_cluster, tiny_model, tiny_data, tmp_path,
                                                              monkeypatch):
    """The prepare step as a Ray Data job on the local cluster writes the local process's store byte for byte."""
    from transformers import AutoTokenizer

    from distune.cluster.prepare import ray_data_runner
    from distune.data import rendering
    from distune.data.prepare import prepare
    from distune.config import load_config
    from distune.data.rendering import process_pool

    monkeypatch.setattr(rendering, "CHUNK_ROWS", 16)  # several chunks over two Ray Data actors
    dec_tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = load_config(tiny.base_config(tiny_model, tiny_data, tmp_path / "runs"))
    local = prepare(cfg, dec_tok, process_pool(1), tmp_path / "local")
    on_ray = prepare(cfg, dec_tok, ray_data_runner(2, least=0), tmp_path / "ray")
    assert tiny.tree_bytes(local) == tiny.tree_bytes(on_ray)
