"""A third-party method, installed as a distribution with a `distune.methods` entry point, runs on Ray."""

import importlib

from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import throwaway_plugin
from distune.cluster.trainer import fit


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
