"""Shared fixtures: project-local caches, one Ray cluster for the session, tiny model + data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
# Before ray / deepspeed / wandb are imported anywhere: everything they write stays inside the project.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(CACHE / "torch_extensions"))
os.environ.setdefault("RAY_TMPDIR", str(CACHE / "ray"))
os.environ.setdefault("DISTUNE_CACHE", str(CACHE / "distune"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["DS_ACCELERATOR"] = "cpu"
# A sentinel key, visible to every worker: tests check it never lands in logs, configs or run files.
SECRET = "distune-test-secret-9f3a7c"
os.environ["WANDB_API_KEY"] = SECRET
for d in ("torch_extensions", "ray", "distune"):
    (CACHE / d).mkdir(parents=True, exist_ok=True)
sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny.build_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A wider, deeper model with the same tokenizer as tiny_model: a teacher for distillation tests."""
    return tiny.build_teacher_dir(tmp_path_factory.mktemp("tiny") / "teacher")


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """A 2-layer BERT with its own WordPiece vocabulary (a cross-architecture student)."""
    return tiny.build_encoder_dir(tmp_path_factory.mktemp("tiny") / "encoder")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return tiny.write_jsonl(tmp_path_factory.mktemp("data") / "sentiment.jsonl", tiny.sentiment_rows(96))


@pytest.fixture
def make_config(tiny_model, tiny_data, tmp_path):
    """make_config(section={...}, ...) -> RunConfig for the tiny model and data, run dir under tmp_path."""
    from distune.config import load_config

    def make(overrides: list[str] = (), **sections):
        return load_config(tiny.base_config(tiny_model, tiny_data, tmp_path / "runs", **sections), list(overrides))

    return make


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray cluster for every test that needs one (started once: ~7 s)."""
    import ray

    from distune.cluster.session import start_ray

    start_ray(None, num_cpus=4)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def world_of_one():
    """A real gloo process group of size 1 in the test process (for code that all-reduces)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    yield
