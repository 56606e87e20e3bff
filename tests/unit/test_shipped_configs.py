"""Every shipped config loads and opens with the command that runs it."""

from pathlib import Path

import pytest

from distune.config import load_config
from distune.pipeline import is_pipeline, load_pipeline, load_report

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    first = path.read_text().splitlines()[0]
    assert first == f"# distune run configs/{path.name}", first
    if is_pipeline(path):
        stages = load_pipeline(path)
        load_report(path, stages)
        configs = [s.cfg for s in stages]
    else:
        configs = [load_config(path)]
    for cfg in configs:
        cfg.grad_accum_steps()
        cfg.method_config()


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_plans_on_this_machine(path, capsys):
    """`distune plan` on the real model (the quickstart's GGUF, dequantised once): every training stage fits
    (slow: ~1 min with the conversion; the recipes are planned with stand-in models in test_recipes.py)."""
    from distune.cli import main

    cfg = None if is_pipeline(path) else load_config(path, resolve=False)
    # A config whose teacher is another run's export is planned with the base model as its teacher.
    teacher = ["method.teacher.path=" + cfg.model.path] if cfg is not None and cfg.method.name == "distill" else []
    assert main(["plan", str(path), *teacher]) == 0
    out = capsys.readouterr().out
    # A pipeline plans the stages whose inputs exist: before it has run, the quickstart's teacher and student.
    assert out.count("(fits") >= (2 if cfg is None else 1), out[-2000:]
