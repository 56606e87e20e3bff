"""Every shipped config loads and opens with the command that runs it."""

from pathlib import Path

import pytest

from distune.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    first = path.read_text().splitlines()[0]
    assert first == f"# distune run configs/{path.name}", first
    cfg = load_config(path)
    cfg.grad_accum_steps()
    cfg.method_config()
