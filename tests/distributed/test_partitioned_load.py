"""Loading partitioned under ZeRO-3 (model.load / method.teacher.placement) gives the run a whole load gives:
the same per-step losses and the same export, on 2 gloo ranks (torchrun, the real worker, real DeepSpeed).

The tiny checkpoint is SmolLM2-shaped where it matters here: tied input/output embeddings, and saved in several
safetensors files with an index, so the reader resolves names through the index and a tied head."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tiny
import wandb_records


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory) -> Path:
    out = tiny.build_model_dir(tmp_path_factory.mktemp("sharded") / "model", tied=True, max_shard_size="40KB")
    assert len(list(out.glob("model-*.safetensors"))) > 2 and (out / "model.safetensors.index.json").is_file()
    return out


@pytest.fixture(scope="module")
def lora_teacher(tmp_path_factory, tiny_teacher) -> Path:
    """A PEFT LoRA adapter folder over tiny_teacher, with non-zero updates (as a trained teacher exports)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_teacher),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter") / "teacher-lora"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(out)  # as a `lora` run's export carries it
    return out


def _run(tmp_path: Path, name: str, raw: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    raw = {**raw, "run": {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 0}}
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "distune.worker", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return tmp_path / "runs" / name


def _losses(run_dir: Path, key: str = "train/loss") -> list[float]:
    return [row[key] for row in wandb_records.logged(run_dir)["history"] if key in row]


def _export(run_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted((run_dir / "export").glob("*.safetensors")) for k, v in load_file(f).items()}


def _same_run(a: Path, b: Path, key: str = "train/loss") -> None:
    la, lb = _losses(a, key), _losses(b, key)
    assert len(la) == len(lb) == 3
    assert la == pytest.approx(lb, abs=1e-6), (la, lb)
    ea, eb = _export(a), _export(b)
    assert ea.keys() == eb.keys() and ea
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=0, atol=1e-6, msg=k)


def _config(model_dir: Path, data_file: Path, runs: Path, **sections) -> dict:
    base = {"deepspeed": {"stage": 3}, "cluster": {"num_workers": 2},
            "train": {"max_steps": 3, "lr": 2e-2, "log_every": 1}, "wandb": {"mode": "offline"}}
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return tiny.base_config(model_dir, data_file, runs, **base)


CASES = {
    # A LoRA student made of some blocks of a tied, sharded checkpoint: layer renumbering, the tied head, the index.
    "lora-layers": dict(method={"name": "lora", "r": 4}, model={"layers": [1]}),
    "full": dict(method={"name": "full"}),
    # A new classification head: initialised the same way by both loads, trained with LoRA on top.
    "head": dict(method={"name": "lora", "r": 4}, model={"task": "sequence_classification"},
                 data={"labels": ["positive", "negative"]}),
}


@pytest.mark.parametrize("case", ["lora-layers", pytest.param("full", marks=pytest.mark.slow),
                                  pytest.param("head", marks=pytest.mark.slow)])
def test_partitioned_load_trains_as_whole_load(tmp_path, sharded_model, tiny_data, case):
    sections = CASES[case]
    runs = {}
    for load in ("whole", "partitioned"):
        model = dict(sections.get("model", {}), path=str(sharded_model), load=load)
        raw = _config(sharded_model, tiny_data, tmp_path / "runs", **{**sections, "model": model})
        runs[load] = _run(tmp_path, f"{case}-{load}", raw)
    _same_run(runs["whole"], runs["partitioned"])


@pytest.mark.parametrize("student_stage,placements", [
    (2, ("replicated", "partitioned")),  # a ZeRO-2 student with a ZeRO-3 teacher: its KD term is the replicated one's
    pytest.param(3, ("replicated", "partitioned"), marks=pytest.mark.slow),
], ids=["zero2-student", "zero3-student"])
def test_partitioned_teacher_gives_the_replicated_teachers_kd(tmp_path, tiny_model, tiny_data, lora_teacher,
                                                              student_stage, placements):
    """The teacher is an adapter folder: partitioned, its LoRA update is merged slice by slice as each rank reads
    its rows; replicated, PEFT merges it whole. kd_weight 1: the loss is the KD term alone."""
    runs = {}
    for placement in placements:
        method = {"name": "distill", "student": {"name": "lora", "r": 4}, "kd_weight": 1.0, "temperature": 2.0,
                  "teacher": {"path": str(lora_teacher), "dtype": "fp32", "placement": placement}}
        raw = _config(tiny_model, tiny_data, tmp_path / "runs", method=method, deepspeed={"stage": student_stage})
        runs[placement] = _run(tmp_path, f"teacher-{placement}", raw)
    _same_run(runs["replicated"], runs["partitioned"], key="train/kd")
    kd = _losses(runs["partitioned"], "train/kd")
    assert kd[-1] < kd[0]  # and the student learns from it
