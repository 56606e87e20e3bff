"""A third-party method and a third-party task, each installed as a distribution with an entry point (`distune.methods`,
`distune.tasks`), run on Ray."""

import importlib

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import throwaway_plugin
from distune.training import fit


def test_third_party_method_trains_through_ray(ray_cluster, make_config, tiny_model, tmp_path, monkeypatch):
    site = throwaway_plugin.install(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))  # the driver validates the method name
    importlib.invalidate_caches()
    cfg = make_config(method={"name": "norm_tuning"}, cluster={"num_workers": 2, "env": {"PYTHONPATH": str(site)}},
                      deepspeed={"stage": 2}, train={"max_steps": 3, "lr": 5e-2})
    fit(cfg, str(tiny_model), show_progress=False)
    norms = load_file(cfg.run_dir / "export" / "norms.safetensors")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert norms.keys() == {n for n, _ in base.named_parameters() if "norm" in n}
    assert all(not norms[k].equal(base.get_parameter(k)) for k in norms)


@pytest.mark.slow  # 22 s; the task interface is in the default run through tests/unit/test_architecture_examples.py
def test_third_party_task_trains_through_ray(ray_cluster, tiny_model, tmp_path, monkeypatch):
    """A new task is one module and one registration: a score-regression task from an installed distribution
    renders its own samples, collates, trains (full, ZeRO-2, 2 Ray workers), evaluates and exports its head."""
    import json

    import throwaway_task
    import tiny
    from distune.config import load_config
    from distune.validate import validate

    site = throwaway_task.install(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    rows = [{"text": f"{'good ' * (i % 4)}day {i}", "score": float(i % 4)} for i in range(72)]
    data = tiny.write_jsonl(tmp_path / "scores.jsonl", rows)
    cfg = load_config(tiny.base_config(
        tiny_model, data, tmp_path / "runs", model={"task": "score_regression"},
        data={"prompt": "{text}", "response": "{score}", "eval_size": 8},
        train={"max_steps": 6, "lr": 5e-3}, eval={"before_training": True, "micro_batch_size": 4},
        deepspeed={"stage": 2}, cluster={"num_workers": 2, "use_gpu": False, "env": {"PYTHONPATH": str(site)}}))
    summary = validate(cfg)
    assert summary["train_rows"] == 64 and summary["eval_rows"] == 8
    fit(cfg, str(tiny_model), show_progress=False)
    results = json.loads((cfg.run_dir / "results.json").read_text())
    assert results["after"]["eval/mse"] < results["before"]["eval/mse"]
    exported = json.loads((cfg.run_dir / "export" / "config.json").read_text())
    assert exported["problem_type"] == "regression" and exported["architectures"] == ["LlamaForSequenceClassification"]
