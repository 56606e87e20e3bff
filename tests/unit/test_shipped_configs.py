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
