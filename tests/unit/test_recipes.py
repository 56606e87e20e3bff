"""The shipped configs load, and every recipe in configs/recipes/ fits its GPUs by `distune plan`.

A recipe names hub models and a hub dataset, which tests cannot download. `distune plan` needs no weights (it
builds the model on the meta device), so each hub model is replaced by a config-only folder with the family's
published config.json (tests/recipe_shapes.py) and a small stand-in tokenizer, and the hub dataset by a local
JSONL in the recipe's format (messages), through the same `key=value` overrides a user would give. The plan is
then the real model's: its parameter count must match the published size, the per-GPU peak must fit an H100's
80 GB with the verdict "fits", and the recipe's header must state the command and the peak it predicts.
The plan does not depend on the stand-in data: every recipe sets train.loss_chunk (the head's rows are the
chunk, not the data's trained fraction of micro-batch x data.max_length) and the distillation recipes
kd_positions: all (the teacher's logits cover every position).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from recipe_shapes import PUBLISHED_PARAMS, SHAPES, model_dir  # tests/ is on sys.path (conftest.py)
from tiny import build_tokenizer, sentiment_rows, write_jsonl

from distune.config import load_config

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
RECIPES_DIR = CONFIGS_DIR / "recipes"
CONFIGS = sorted(p for p in CONFIGS_DIR.rglob("*.yaml") if not p.name.startswith("_"))
RECIPES = sorted(p for p in RECIPES_DIR.glob("*.yaml") if not p.name.startswith("_"))
BASES = sorted(RECIPES_DIR.glob("_*.yaml"))
H100_BYTES = 80 * 10**9  # the card's 80 GB (74.5 GiB); distune.scale compares with the 79.65 GiB nvidia-smi reports
GIB = 2**30


def header(path: Path) -> dict:
    """The recipe's header comment: its first line, the `distune plan` command and the stated peak (GiB)."""
    lines = path.read_text().splitlines()
    plan = next((ln.lstrip("# ").strip() for ln in lines if ln.lstrip("# ").startswith("distune plan ")), None)
    peak = next((re.search(r"Predicted peak per GPU: ([\d.]+) GiB", ln) for ln in lines
                 if "Predicted peak per GPU" in ln), None)
    return {"first": lines[0], "plan": plan, "peak": float(peak.group(1)) if peak else None}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Config-only model folders (one per hub id, made on first use) and a messages-format JSONL."""
    root = tmp_path_factory.mktemp("recipes")
    tok = root / "tokenizer"
    build_tokenizer(tok)
    rows = [{"messages": [{"role": "user", "content": r["text"]},
                          {"role": "assistant", "content": f"{r['text']} {r['label']} " * 6 + r["label"]}]}
            for r in sentiment_rows(200, seed=3)]
    data = write_jsonl(root / "chat.jsonl", rows)
    made: dict[str, Path] = {}

    def model(hub_id: str) -> Path:
        if hub_id not in made:
            made[hub_id] = model_dir(hub_id, root / hub_id.replace("/", "--"), tok)
        return made[hub_id]

    return {"model": model, "data": data, "out": root / "runs", "root": root}


def test_there_are_recipes_and_bases():
    assert len(RECIPES) >= 11 and BASES


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS_DIR)))
def test_config_loads(path):
    from distune.pipeline import is_pipeline, load_pipeline

    for cfg in [s.cfg for s in load_pipeline(path)] if is_pipeline(path) else [load_config(path)]:
        cfg.grad_accum_steps()
        cfg.method_config()
    rel = path.relative_to(CONFIGS_DIR.parent)
    assert path.read_text().splitlines()[0] == f"# distune run {rel}"


@pytest.mark.parametrize("base", BASES, ids=lambda p: p.name)
def test_every_base_is_used(base):
    users = [p.name for p in RECIPES if re.search(rf"^base:.*\b{re.escape(base.name)}", p.read_text(), re.M)]
    assert users, f"{base.name} is no recipe's base"


def test_adapting_a_recipe_through_base():
    """docs/recipes.md's example: a file beside configs/ includes a recipe and changes the model and the data."""
    cfg = load_config({"base": "recipes/llama-3.1-8b-lora.yaml", "run": {"name": "my-llama-sft"},
                       "model": {"path": "/models/my-llama"},
                       "data": {"path": "hf:HuggingFaceTB/smoltalk:all", "split": "train"}},
                      base_dir=CONFIGS_DIR)
    assert (cfg.run.name, cfg.model.path, cfg.data.path, cfg.data.split) == (
        "my-llama-sft", "/models/my-llama", "hf:HuggingFaceTB/smoltalk:all", "train")
    # everything else is the recipe's, its bases' included
    assert cfg.method.name == "lora" and cfg.method.model_extra["r"] == 16 and cfg.deepspeed.stage == 2
    assert cfg.data.format == "messages" and cfg.data.max_length == 4096 and cfg.model.dtype == "bf16"
    assert cfg.model.gradient_checkpointing and cfg.train.loss_chunk == 1024 and cfg.cluster.num_workers == 8


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_shape(path):
    """Hub ids the tests know the shapes of, a hub dataset in messages format with the chat template, bf16."""
    cfg = load_config(path, resolve=False)
    assert cfg.model.path in SHAPES, cfg.model.path
    teacher = getattr(cfg.method_config(), "teacher", None)
    assert teacher is None or teacher.path in SHAPES
    assert cfg.data.path.startswith("hf:") and cfg.data.format == "messages" and cfg.data.use_chat_template
    assert cfg.model.dtype == "bf16" and (teacher is None or teacher.dtype == "bf16")
    assert cfg.cluster.use_gpu is True and cfg.wandb.mode in ("online", "offline")
    assert cfg.train.loss_chunk  # keeps the plan independent of the data (see the module docstring)
    if teacher is not None:
        assert cfg.method_config().kd_positions == "all"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_fits_by_plan(path, stand_ins, capsys):
    from distune.cli import main

    head = header(path)
    assert head["first"] == f"# distune run configs/recipes/{path.name}"
    assert head["plan"], "the header must give the `distune plan` command that checks the recipe"
    args = shlex.split(head["plan"])
    assert args[:3] == ["distune", "plan", f"configs/recipes/{path.name}"], head["plan"]
    flags = dict(zip(args[3::2], args[4::2]))
    assert flags.get("--gpu") == "h100" and set(flags) == {"--gpu", "--nodes", "--gpus-per-node"}, flags
    cfg = load_config(path, resolve=False)
    assert int(flags["--nodes"]) * int(flags["--gpus-per-node"]) == cfg.cluster.num_workers

    overrides = [f"model.path={stand_ins['model'](cfg.model.path)}", f"data.path={stand_ins['data']}",
                 "data.limit=null", "data.eval_size=8", f"run.output_dir={stand_ins['out']}"]
    teacher = getattr(cfg.method_config(), "teacher", None)
    if teacher is not None:
        overrides.append(f"method.teacher.path={stand_ins['model'](teacher.path)}")
    out = stand_ins["root"] / f"{path.stem}.json"
    rc = main(["plan", str(path), *overrides, *args[3:], "--json", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err + printed.out
    verdict = re.search(r"GPU per rank: ([\d.]+) GiB of ([\d.]+) GiB .*: (.+)$", printed.out, re.M)
    assert verdict and verdict.group(3) == "fits", printed.out
    cp = json.loads(out.read_text())
    assert cp["fits"] and not cp["near"] and cp["gpu_need"] < H100_BYTES
    assert cp["num_workers"] == cfg.cluster.num_workers

    # The meta model is the published model, student and teacher.
    params = cp["plan"]["params"]
    base = params["frozen"] or params["trainable"]  # LoRA freezes the base; full trains it all
    assert base == pytest.approx(PUBLISHED_PARAMS[cfg.model.path], rel=0.02)
    if teacher is not None:
        assert params["teacher"]["params"] == pytest.approx(PUBLISHED_PARAMS[teacher.path], rel=0.02)

    # The header states what this command predicts.
    assert head["peak"] == pytest.approx(cp["gpu_need"] / GIB, abs=0.01), (
        f"{path.name}: header says {head['peak']} GiB, distune plan predicts {cp['gpu_need'] / GIB:.2f} GiB")
